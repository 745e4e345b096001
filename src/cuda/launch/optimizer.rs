//! Launches cuda/optimizer.cu: `scatter_rows` and `scatter_add_rows` (the sampled rows' gradient
//! into a dense buffer, or added to one) and the SGD-momentum and AdamW updates, sparse (a block
//! per updated row) or dense (grid-stride); CPU references: src/cpu/optimizer.rs. The optimizer state is f32 or bf16 ([`StateBuf`]), a
//! kernel for each; the launches of one update differ only in the kernel's name and the state
//! buffers' type, so each update names its kernels through a local macro.

use super::common::{grid_stride, i32_of, launch, need, need_product, per_row};
use crate::backend::{AdamWStep, Backend, StateBuf};
use crate::cuda::{dev, CudaBackend};
use crate::error::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

impl CudaBackend {
    /// `scatter_rows` (`add` false: `dense` zeroed, then the rows written) or `scatter_add_rows`
    /// (`add` true: the rows added to what `dense` holds).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_scatter_rows(
        &self,
        rows: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        dense: &mut CudaSlice<f32>,
        shard_len: usize,
        add: bool,
    ) -> Result<()> {
        let what = if add {
            "scatter_add_rows"
        } else {
            "scatter_rows"
        };
        need_product(rows, [count, dim], &format!("{what} rows"))?;
        need(index, count, &format!("{what} index"))?;
        need_product(dense, [shard_len, dim], &format!("{what} dense"))?;
        if !add {
            self.zero(dense, shard_len * dim)?;
        }
        if count == 0 {
            return Ok(());
        }
        let (count_i, dim_i) = (i32_of(count, "count")?, i32_of(dim, "dim")?);
        let cfg = per_row(count);
        if add {
            launch!(
                self,
                "scatter_add_rows",
                cfg,
                rows,
                index,
                &count_i,
                &dim_i,
                dense
            );
        } else {
            launch!(
                self,
                "scatter_rows",
                cfg,
                rows,
                index,
                &count_i,
                &dim_i,
                dense
            );
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_sgd_momentum_sparse(
        &self,
        weight: &mut CudaSlice<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        need_product(grad, [count, dim], "sgd_momentum_sparse grad")?;
        need(index, count, "sgd_momentum_sparse index")?;
        momentum.need(self, self.len(weight), "sgd_momentum_sparse")?;
        if count == 0 {
            return Ok(());
        }
        let (count_i, dim_i) = (i32_of(count, "count")?, i32_of(dim, "dim")?);
        let cfg = per_row(count);
        macro_rules! sparse {
            ($name:literal, $v:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    weight,
                    $v,
                    grad,
                    index,
                    &count_i,
                    &dim_i,
                    &lr,
                    &mu,
                    &weight_decay
                )
            };
        }
        match momentum {
            StateBuf::F32(v) => sparse!("sgd_momentum_sparse", v),
            StateBuf::Bf16(v) => sparse!("sgd_momentum_sparse_bf16", v),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_sgd_momentum_dense(
        &self,
        weight: &mut CudaSlice<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        len: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        need(weight, len, "sgd_momentum_dense weight")?;
        momentum.need(self, len, "sgd_momentum_dense")?;
        need(grad, len, "sgd_momentum_dense grad")?;
        if len == 0 {
            return Ok(());
        }
        let len_u = len as u64;
        let cfg = grid_stride(len);
        macro_rules! dense {
            ($name:literal, $v:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    weight,
                    $v,
                    grad,
                    &len_u,
                    &lr,
                    &mu,
                    &weight_decay
                )
            };
        }
        match momentum {
            StateBuf::F32(v) => dense!("sgd_momentum_dense", v),
            StateBuf::Bf16(v) => dense!("sgd_momentum_dense_bf16", v),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_adamw_sparse(
        &self,
        weight: &mut CudaSlice<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        step: AdamWStep,
    ) -> Result<()> {
        need_product(grad, [count, dim], "adamw_sparse grad")?;
        need(index, count, "adamw_sparse index")?;
        exp_avg.need(self, self.len(weight), "adamw_sparse exp_avg")?;
        exp_avg_sq.need(self, self.len(weight), "adamw_sparse exp_avg_sq")?;
        if count == 0 {
            return Ok(());
        }
        let (count_i, dim_i) = (i32_of(count, "count")?, i32_of(dim, "dim")?);
        let cfg = per_row(count);
        let s = step.scalars();
        macro_rules! sparse {
            ($name:literal, $m:expr, $v:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    weight,
                    $m,
                    $v,
                    grad,
                    index,
                    &count_i,
                    &dim_i,
                    &s.decay,
                    &s.beta1,
                    &s.beta2,
                    &s.step_size,
                    &s.inv_sqrt_bias2,
                    &s.eps,
                    &s.seed,
                    &s.t
                )
            };
        }
        match (exp_avg, exp_avg_sq) {
            (StateBuf::F32(m), StateBuf::F32(v)) => sparse!("adamw_sparse_f32", m, v),
            (StateBuf::Bf16(m), StateBuf::Bf16(v)) => sparse!("adamw_sparse_bf16", m, v),
            _ => return Err(crate::backend::mixed_moments()),
        }
        Ok(())
    }

    pub(super) fn launch_adamw_dense(
        &self,
        weight: &mut CudaSlice<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        len: usize,
        step: AdamWStep,
    ) -> Result<()> {
        need(weight, len, "adamw_dense weight")?;
        exp_avg.need(self, len, "adamw_dense exp_avg")?;
        exp_avg_sq.need(self, len, "adamw_dense exp_avg_sq")?;
        need(grad, len, "adamw_dense grad")?;
        if len == 0 {
            return Ok(());
        }
        let len_u = len as u64;
        let cfg = grid_stride(len);
        let s = step.scalars();
        macro_rules! dense {
            ($name:literal, $m:expr, $v:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    weight,
                    $m,
                    $v,
                    grad,
                    &len_u,
                    &s.decay,
                    &s.beta1,
                    &s.beta2,
                    &s.step_size,
                    &s.inv_sqrt_bias2,
                    &s.eps,
                    &s.seed,
                    &s.t
                )
            };
        }
        match (exp_avg, exp_avg_sq) {
            (StateBuf::F32(m), StateBuf::F32(v)) => dense!("adamw_dense_f32", m, v),
            (StateBuf::Bf16(m), StateBuf::Bf16(v)) => dense!("adamw_dense_bf16", m, v),
            _ => return Err(crate::backend::mixed_moments()),
        }
        Ok(())
    }
}
