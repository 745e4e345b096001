//! Launches cuda/normalize.cu's row normalizations: `normalize_rows`, its gathering
//! (`gather_normalize_rows`) and unpacking (`unpack_normalize_f32`) forms, and
//! `normalize_backward` (CPU references: src/cpu/normalize.rs). Each is checks and one launch of a
//! warp per row (`per_warp_row`; normalize.cu's header says why). normalize.cu's reductions that
//! score classes are launched from `class_scores.rs`.

use super::common::{i32_of, launch, need, need_product, per_warp_row};
use crate::cuda::{dev, CudaBackend};
use crate::error::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

impl CudaBackend {
    pub(super) fn launch_normalize_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        out: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(x, [rows, dim], "normalize_rows x")?;
        need_product(out, [rows, dim], "normalize_rows out")?;
        need(norms, rows, "normalize_rows norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "normalize_rows",
            per_warp_row(rows),
            x,
            &rows_i,
            &dim_i,
            out,
            norms
        );
        Ok(())
    }

    pub(super) fn launch_gather_normalize_rows(
        &self,
        weight: &CudaSlice<f32>,
        dim: usize,
        index: &CudaSlice<i32>,
        count: usize,
        out: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(index, count, "gather_normalize_rows index")?;
        need_product(out, [count, dim], "gather_normalize_rows out")?;
        need(norms, count, "gather_normalize_rows norms")?;
        if count == 0 {
            return Ok(());
        }
        let (dim_i, count_i) = (i32_of(dim, "dim")?, i32_of(count, "count")?);
        launch!(
            self,
            "gather_normalize_rows",
            per_warp_row(count),
            weight,
            &dim_i,
            index,
            &count_i,
            out,
            norms
        );
        Ok(())
    }

    pub(super) fn launch_unpack_normalize_f32(
        &self,
        packed: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        labels: &mut CudaSlice<i64>,
        x_hat: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(
            packed,
            [rows, dim.saturating_add(2)],
            "unpack_normalize_f32 packed",
        )?;
        need(labels, rows, "unpack_normalize_f32 labels")?;
        need_product(x_hat, [rows, dim], "unpack_normalize_f32 x_hat")?;
        need(norms, rows, "unpack_normalize_f32 norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "unpack_normalize_f32",
            per_warp_row(rows),
            packed,
            &rows_i,
            &dim_i,
            labels,
            x_hat,
            norms
        );
        Ok(())
    }

    pub(super) fn launch_normalize_backward(
        &self,
        grad: &mut CudaSlice<f32>,
        x_hat: &CudaSlice<f32>,
        norms: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        need_product(grad, [rows, dim], "normalize_backward grad")?;
        need_product(x_hat, [rows, dim], "normalize_backward x_hat")?;
        need(norms, rows, "normalize_backward norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "normalize_backward",
            per_warp_row(rows),
            grad,
            x_hat,
            norms,
            &rows_i,
            &dim_i
        );
        Ok(())
    }
}
