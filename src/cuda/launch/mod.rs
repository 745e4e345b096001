//! `impl Backend for CudaBackend`: argument checks, launch shapes and cuBLAS calls. The kernels
//! themselves live in `cuda/*.cu` under the same names as their CPU references.
//!
//! Every buffer is checked against the length its shape needs (products checked for overflow)
//! before a kernel is queued. Index and label *values* in device buffers are not: checking them
//! would cost a download and a synchronization per call. The layer produces them itself (its
//! sampler, its label localization, after checking the user's labels on the host); a caller of
//! the `Backend` trait that passes its own must keep them in range, as the CPU backend checks.
//!
//! The glue is split as the kernels are, a file per family of `cuda/`: `sampling.rs`
//! (sampling.cu), `normalize.rs` (normalize.cu's row normalizations), `class_scores.rs`
//! (normalize.cu's reductions that score every class, around a GEMM), `margin_softmax.rs`
//! (margin_softmax.cu), `gemm.rs` (the cuBLAS GEMMs), `precision.rs` (precision.cu's operand
//! casts and the copies they fill), `wire.rs` (wire.cu) and `optimizer.rs` (optimizer.cu);
//! `common.rs` holds what they all use, as common.cuh does for the kernels. A trait impl cannot
//! be split across files, so the one below is the map: each method that queues work forwards to
//! the inherent `launch_` method of its name in its family's file, which checks the arguments
//! and launches. The methods that queue no kernel (memory, precision, capabilities) stay here.

mod class_scores;
mod common;
mod gemm;
mod margin_softmax;
mod normalize;
mod optimizer;
mod precision;
mod sampling;
mod wire;

pub(crate) use precision::GemmOperands;
pub(crate) use sampling::SampleScratch;

use super::{dev, CudaBackend, Precision};
use crate::backend::{AdamWStep, Backend, Elem, LogitsShape, SampleArgs, StateBuf};
use crate::config::MarginParams;
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use common::need;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};

impl CudaBackend {
    /// A device-to-host copy that has finished when it returns. cudarc's copy is
    /// `cuMemcpyDtoHAsync` into pageable memory, which CUDA documents as returning once the copy
    /// is complete; the stream sync states that here instead of resting on it, and costs nothing
    /// when the copy already blocked.
    fn read_back<T: DeviceRepr, S: DevicePtr<T>>(&self, src: &S) -> Result<Vec<T>> {
        let host = self.stream.clone_dtoh(src).map_err(dev("download"))?;
        self.stream.synchronize().map_err(dev("download"))?;
        Ok(host)
    }
}

impl Backend for CudaBackend {
    type Buf<T: Elem> = CudaSlice<T>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return self.stream.null().map_err(dev("alloc"));
        }
        self.stream.alloc_zeros(len).map_err(|e| {
            PfcError::Device(format!(
                "allocating {} bytes on the GPU: {e:?}",
                len * std::mem::size_of::<T>()
            ))
        })
    }

    fn len<T: Elem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn upload_at<T: Elem>(&self, host: &[T], dst: &mut CudaSlice<T>, offset: usize) -> Result<()> {
        need(dst, offset.saturating_add(host.len()), "upload")?;
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, &mut dst.slice_mut(offset..offset + host.len()))
            .map_err(dev("upload"))
    }

    fn download_at<T: Elem>(
        &self,
        src: &CudaSlice<T>,
        offset: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        need(src, offset.saturating_add(len), "download_at")?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.read_back(&src.slice(offset..offset + len))
    }

    fn copy<T: Elem>(&self, src: &CudaSlice<T>, dst: &mut CudaSlice<T>, len: usize) -> Result<()> {
        need(src, len, "copy source")?;
        need(dst, len, "copy destination")?;
        if len == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(&src.slice(..len), &mut dst.slice_mut(..len))
            .map_err(dev("copy"))
    }

    fn zero<T: Elem>(&self, buf: &mut CudaSlice<T>, len: usize) -> Result<()> {
        need(buf, len, "zero")?;
        if len == 0 {
            return Ok(());
        }
        self.stream
            .memset_zeros(&mut buf.slice_mut(..len))
            .map_err(dev("zero"))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev("synchronize"))
    }

    fn set_gemm_precision(&mut self, precision: Precision) -> Result<()> {
        self.precision = precision;
        Ok(())
    }

    /// Exactly `a_len` and `b_len` elements (the planner's sizes), replacing what was held.
    fn reserve_gemm_operands(&mut self, a_len: usize, b_len: usize) -> Result<()> {
        let a = (a_len > 0).then(|| self.alloc_operand(a_len)).transpose()?;
        let b = (b_len > 0).then(|| self.alloc_operand(b_len)).transpose()?;
        let held = self
            .gemm_operands
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *held = GemmOperands {
            a,
            b,
            forward: None,
        };
        Ok(())
    }

    fn gemm_operand_bytes(&self) -> u64 {
        match self.gemm_operands.lock() {
            Ok(held) => held.bytes(),
            Err(poisoned) => poisoned.into_inner().bytes(),
        }
    }

    fn localize_labels(
        &self,
        global: &CudaSlice<i64>,
        rows: usize,
        shard_start: u64,
        shard_len: usize,
        local: &mut CudaSlice<i32>,
    ) -> Result<()> {
        self.launch_localize_labels(global, rows, shard_start, shard_len, local)
    }

    fn sample_classes(
        &self,
        args: &SampleArgs,
        labels: &mut CudaSlice<i32>,
        scores: Option<&CudaSlice<f32>>,
        keys: &mut CudaSlice<u64>,
        sampled: &mut CudaSlice<i32>,
    ) -> Result<usize> {
        self.launch_sample_classes(args, labels, scores, keys, sampled)
    }

    fn class_max_cosine(
        &self,
        weight: &CudaSlice<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &CudaSlice<f32>,
        row_labels: &CudaSlice<i64>,
        rows: usize,
        chunk_weights: &mut CudaSlice<f32>,
        chunk_cosines: &mut CudaSlice<f32>,
        scores: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_class_max_cosine(
            weight,
            shard_len,
            dim,
            x_hat,
            row_labels,
            rows,
            chunk_weights,
            chunk_cosines,
            scores,
        )
    }

    fn class_top_k(
        &self,
        weight: &CudaSlice<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        chunk_weights: &mut CudaSlice<f32>,
        chunk_cosines: &mut CudaSlice<f32>,
        top_scores: &mut CudaSlice<f32>,
        top_ids: &mut CudaSlice<i32>,
    ) -> Result<()> {
        self.launch_class_top_k(
            weight,
            shard_len,
            dim,
            x_hat,
            rows,
            k,
            chunk_weights,
            chunk_cosines,
            top_scores,
            top_ids,
        )
    }

    fn unpack_normalize_f32(
        &self,
        packed: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        labels: &mut CudaSlice<i64>,
        x_hat: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_unpack_normalize_f32(packed, rows, dim, labels, x_hat, norms)
    }

    fn gather_normalize_rows(
        &self,
        weight: &CudaSlice<f32>,
        dim: usize,
        index: &CudaSlice<i32>,
        count: usize,
        out: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_gather_normalize_rows(weight, dim, index, count, out, norms)
    }

    fn pack_embeddings(
        &self,
        x: &CudaSlice<f32>,
        labels: &CudaSlice<i64>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        packed: &mut CudaSlice<u16>,
    ) -> Result<()> {
        self.launch_pack_embeddings(x, labels, rows, dim, wire, packed)
    }

    fn unpack_normalize(
        &self,
        packed: &CudaSlice<u16>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        labels: &mut CudaSlice<i64>,
        x_hat: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_unpack_normalize(packed, rows, dim, wire, labels, x_hat, norms)
    }

    fn cast_to_wire(
        &self,
        x: &CudaSlice<f32>,
        len: usize,
        wire: Dtype,
        out: &mut CudaSlice<u16>,
    ) -> Result<()> {
        self.launch_cast_to_wire(x, len, wire, out)
    }

    fn cast_from_wire(
        &self,
        x: &CudaSlice<u16>,
        len: usize,
        wire: Dtype,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_cast_from_wire(x, len, wire, out)
    }

    fn normalize_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        out: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_normalize_rows(x, rows, dim, out, norms)
    }

    fn gemm_nt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_gemm_nt(m, n, k, a, b, c)
    }

    fn gemm_nn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_gemm_nn(m, n, k, a, b, c)
    }

    fn gemm_tn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_gemm_tn(m, n, k, a, b, c)
    }

    fn gemm_backward(
        &self,
        rows: usize,
        cols: usize,
        dim: usize,
        grad_logits: &CudaSlice<f32>,
        w_hat: &CudaSlice<f32>,
        x_hat: &CudaSlice<f32>,
        grad_x: &mut CudaSlice<f32>,
        grad_w: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_gemm_backward(rows, cols, dim, grad_logits, w_hat, x_hat, grad_x, grad_w)
    }

    fn margin_rowmax(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &mut CudaSlice<f32>,
        target_cos: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_margin_rowmax(
            logits,
            shape,
            labels,
            margin,
            row_margins,
            row_max,
            target_cos,
        )
    }

    fn exp_rowsum(
        &self,
        logits: &CudaSlice<f32>,
        shape: LogitsShape,
        row_max: &CudaSlice<f32>,
        row_sum: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_exp_rowsum(logits, shape, row_max, row_sum)
    }

    fn softmax_loss_grad(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &CudaSlice<f32>,
        row_sum: &CudaSlice<f32>,
        target_cos: &CudaSlice<f32>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_softmax_loss_grad(
            logits,
            shape,
            labels,
            margin,
            row_margins,
            row_max,
            row_sum,
            target_cos,
            grad_scale,
            row_loss,
        )
    }

    fn margin_softmax_fused(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_margin_softmax_fused(
            logits,
            shape,
            labels,
            margin,
            row_margins,
            grad_scale,
            row_loss,
        )
    }

    fn logits_dtype(&self) -> Dtype {
        match self.precision {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::Bf16,
            Precision::F16 => Dtype::F16,
        }
    }

    fn gemm_nt16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<u16>,
    ) -> Result<()> {
        self.launch_gemm_nt16(m, n, k, a, b, c)
    }

    fn gemm_backward16(
        &self,
        rows: usize,
        cols: usize,
        dim: usize,
        grad_logits: &CudaSlice<u16>,
        alpha: f32,
        w_hat: &CudaSlice<f32>,
        x_hat: &CudaSlice<f32>,
        grad_x: &mut CudaSlice<f32>,
        grad_w: &mut CudaSlice<f32>,
        reuse_operands: bool,
    ) -> Result<()> {
        self.launch_gemm_backward16(
            rows,
            cols,
            dim,
            grad_logits,
            alpha,
            w_hat,
            x_hat,
            grad_x,
            grad_w,
            reuse_operands,
        )
    }

    fn margin_rowmax16(
        &self,
        cos: &CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &mut CudaSlice<f32>,
        target_cos: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_margin_rowmax16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins,
            row_max,
            target_cos,
        )
    }

    fn exp_rowsum16(
        &self,
        cos: &CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &CudaSlice<f32>,
        row_sum: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_exp_rowsum16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins,
            row_max,
            row_sum,
        )
    }

    fn softmax_loss_grad16(
        &self,
        cos: &mut CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &CudaSlice<f32>,
        row_sum: &CudaSlice<f32>,
        target_cos: &CudaSlice<f32>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_softmax_loss_grad16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins,
            row_max,
            row_sum,
            target_cos,
            grad_scale,
            row_loss,
        )
    }

    fn margin_softmax_fused16(
        &self,
        cos: &mut CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_margin_softmax_fused16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins,
            grad_scale,
            row_loss,
        )
    }

    fn normalize_backward(
        &self,
        grad: &mut CudaSlice<f32>,
        x_hat: &CudaSlice<f32>,
        norms: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        self.launch_normalize_backward(grad, x_hat, norms, rows, dim)
    }

    fn scale_rows(
        &self,
        g: &mut CudaSlice<f32>,
        shape: LogitsShape,
        weights: &CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_scale_rows(g, shape, weights)
    }

    fn scale_rows16(
        &self,
        g: &mut CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        weights: &CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_scale_rows16(g, shape, dtype, weights)
    }

    fn scatter_rows(
        &self,
        rows: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        dense: &mut CudaSlice<f32>,
        shard_len: usize,
    ) -> Result<()> {
        self.launch_scatter_rows(rows, index, count, dim, dense, shard_len, false)
    }

    fn scatter_add_rows(
        &self,
        rows: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        dense: &mut CudaSlice<f32>,
        shard_len: usize,
    ) -> Result<()> {
        self.launch_scatter_rows(rows, index, count, dim, dense, shard_len, true)
    }

    fn sgd_momentum_sparse(
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
        self.launch_sgd_momentum_sparse(
            weight,
            momentum,
            grad,
            index,
            count,
            dim,
            lr,
            mu,
            weight_decay,
        )
    }

    fn sgd_momentum_dense(
        &self,
        weight: &mut CudaSlice<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        len: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        self.launch_sgd_momentum_dense(weight, momentum, grad, len, lr, mu, weight_decay)
    }

    fn supports_adamw(&self) -> bool {
        true
    }

    fn adamw_sparse(
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
        self.launch_adamw_sparse(weight, exp_avg, exp_avg_sq, grad, index, count, dim, step)
    }

    fn adamw_dense(
        &self,
        weight: &mut CudaSlice<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        len: usize,
        step: AdamWStep,
    ) -> Result<()> {
        self.launch_adamw_dense(weight, exp_avg, exp_avg_sq, grad, len, step)
    }
}
