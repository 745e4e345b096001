//! The CPU backend: reference kernels, parallel over rows with rayon, GEMMs through `gemm`.
//!
//! Each file holds the CPU twin of one CUDA kernel family in `cuda/`, function for function.

pub mod gemm;
pub mod hard_negatives;
pub mod margin_softmax;
pub mod margin_softmax16;
pub mod normalize;
pub mod optimizer;
pub mod sampling;
pub mod simd;
pub mod wire;

use crate::backend::{Backend, Elem, SampleArgs, StateBuf};
use crate::config::MarginParams;
use crate::error::Result;
use crate::plan::Dtype;

/// The buffer-length check of the buffer-moving methods, as the CUDA backend makes it: a typed
/// error, not a slice panic, when a caller asks for more elements than a buffer holds. (The
/// kernels proper trust the lengths the generic step allocated for them.)
fn need<T>(buf: &[T], len: usize, what: &str) -> Result<()> {
    if buf.len() < len {
        return Err(crate::error::PfcError::Shape(format!(
            "{what}: buffer of {} elements, {len} needed",
            buf.len()
        )));
    }
    Ok(())
}

/// The checks every 16-bit softmax pass makes: a 16-bit dtype and buffers that hold the rows.
fn check16(
    cos: &[u16],
    rows: usize,
    cols: usize,
    dtype: Dtype,
    labels: &[i32],
    what: &str,
) -> Result<()> {
    if dtype == Dtype::F32 {
        return Err(crate::error::PfcError::Shape(format!(
            "{what}: 16-bit cosines need dtype bf16 or f16, not f32"
        )));
    }
    let len = rows.checked_mul(cols).ok_or_else(|| {
        crate::error::PfcError::Shape(format!("{what}: {rows} × {cols} overflows"))
    })?;
    need(cos, len, what)?;
    need(labels, rows, what)
}

/// The 16-bit casts take f16 or bf16; f32 is no wire format to cast to (a typed error, where
/// `to_wire` would otherwise treat it as f16).
fn need_16_bit(wire: Dtype) -> Result<()> {
    if wire == Dtype::F32 {
        return Err(crate::error::PfcError::param(
            "wire",
            "f32",
            "the 16-bit casts take f16 or bf16",
        ));
    }
    Ok(())
}

/// The CPU backend. Stateless: buffers are `Vec`s, every kernel runs to completion on return.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Buf<T: Elem> = Vec<T>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        // Written, not `calloc`ed: the pages are touched now, so the first steps do not pay for
        // page faults and the process's resident memory matches the memory report at once.
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).map_err(|_| {
            crate::error::PfcError::Device(format!(
                "cannot allocate {} bytes of host memory",
                len * std::mem::size_of::<T>()
            ))
        })?;
        buf.resize(len, T::default());
        Ok(buf)
    }

    fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn upload_at<T: Elem>(&self, host: &[T], dst: &mut Vec<T>, offset: usize) -> Result<()> {
        let end = offset + host.len();
        if end > dst.len() {
            return Err(crate::error::PfcError::Shape(format!(
                "upload of {} elements at {offset} into a buffer of {}",
                host.len(),
                dst.len()
            )));
        }
        dst[offset..end].copy_from_slice(host);
        Ok(())
    }

    fn download<T: Elem>(&self, src: &Vec<T>, len: usize) -> Result<Vec<T>> {
        need(src, len, "download")?;
        Ok(src[..len].to_vec())
    }

    fn copy<T: Elem>(&self, src: &Vec<T>, dst: &mut Vec<T>, len: usize) -> Result<()> {
        need(src, len, "copy source")?;
        need(dst, len, "copy destination")?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }

    fn zero<T: Elem>(&self, buf: &mut Vec<T>, len: usize) -> Result<()> {
        need(buf, len, "zero")?;
        buf[..len].fill(T::default());
        Ok(())
    }

    fn localize_labels(
        &self,
        global: &Vec<i64>,
        rows: usize,
        shard_start: u64,
        shard_len: usize,
        local: &mut Vec<i32>,
    ) -> Result<()> {
        need(global, rows, "localize_labels global")?;
        need(local, rows, "localize_labels local")?;
        sampling::localize_labels(&global[..rows], shard_start, shard_len, &mut local[..rows]);
        Ok(())
    }

    fn sample_classes(
        &self,
        args: &SampleArgs,
        labels: &mut Vec<i32>,
        scores: Option<&Vec<f32>>,
        keys: &mut Vec<u64>,
        sampled: &mut Vec<i32>,
    ) -> Result<usize> {
        Ok(sampling::sample_classes(
            args,
            labels,
            scores.map(|s| s.as_slice()),
            keys,
            sampled,
        ))
    }

    fn class_max_cosine(
        &self,
        weight: &Vec<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &Vec<f32>,
        row_labels: &Vec<i64>,
        rows: usize,
        chunk_weights: &mut Vec<f32>,
        chunk_cosines: &mut Vec<f32>,
        scores: &mut Vec<f32>,
    ) -> Result<()> {
        hard_negatives::class_max_cosine(
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

    fn pack_embeddings(
        &self,
        x: &Vec<f32>,
        labels: &Vec<i64>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        packed: &mut Vec<u16>,
    ) -> Result<()> {
        if wire == Dtype::F32 {
            return Err(crate::error::PfcError::param(
                "wire",
                "f32",
                "the packed wire format is f16 or bf16; f32 embeddings are gathered unpacked",
            ));
        }
        wire::pack_embeddings(x, labels, rows, dim, wire, packed);
        Ok(())
    }

    fn unpack_normalize(
        &self,
        packed: &Vec<u16>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        labels: &mut Vec<i64>,
        x_hat: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> Result<()> {
        wire::unpack_normalize(packed, rows, dim, wire, labels, x_hat, norms);
        Ok(())
    }

    fn cast_to_wire(
        &self,
        x: &Vec<f32>,
        len: usize,
        wire: Dtype,
        out: &mut Vec<u16>,
    ) -> Result<()> {
        need_16_bit(wire)?;
        need(x, len, "cast_to_wire x")?;
        need(out, len, "cast_to_wire out")?;
        wire::cast_to_wire(&x[..len], wire, &mut out[..len]);
        Ok(())
    }

    fn cast_from_wire(
        &self,
        x: &Vec<u16>,
        len: usize,
        wire: Dtype,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        need_16_bit(wire)?;
        need(x, len, "cast_from_wire x")?;
        need(out, len, "cast_from_wire out")?;
        wire::cast_from_wire(&x[..len], wire, &mut out[..len]);
        Ok(())
    }

    fn unpack_normalize_f32(
        &self,
        packed: &Vec<f32>,
        rows: usize,
        dim: usize,
        labels: &mut Vec<i64>,
        x_hat: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> Result<()> {
        need(packed, rows * (dim + 2), "unpack_normalize_f32 packed")?;
        need(labels, rows, "unpack_normalize_f32 labels")?;
        need(x_hat, rows * dim, "unpack_normalize_f32 x_hat")?;
        need(norms, rows, "unpack_normalize_f32 norms")?;
        normalize::unpack_normalize_f32(packed, rows, dim, labels, x_hat, norms);
        Ok(())
    }

    fn gather_normalize_rows(
        &self,
        weight: &Vec<f32>,
        dim: usize,
        index: &Vec<i32>,
        count: usize,
        out: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> Result<()> {
        normalize::gather_normalize_rows(weight, dim, &index[..count], out, norms);
        Ok(())
    }

    fn normalize_rows(
        &self,
        x: &Vec<f32>,
        rows: usize,
        dim: usize,
        out: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> Result<()> {
        normalize::normalize_rows(x, rows, dim, out, norms);
        Ok(())
    }

    fn gemm_nt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        gemm::gemm_nt(m, n, k, a, b, c)
    }

    fn gemm_nn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        gemm::gemm_nn(m, n, k, a, b, c)
    }

    fn gemm_tn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        gemm::gemm_tn(m, n, k, a, b, c)
    }

    fn margin_rowmax(
        &self,
        logits: &mut Vec<f32>,
        rows: usize,
        cols: usize,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_max: &mut Vec<f32>,
        target_cos: &mut Vec<f32>,
    ) -> Result<()> {
        margin_softmax::margin_rowmax(logits, rows, cols, labels, margin, row_max, target_cos);
        Ok(())
    }

    fn exp_rowsum(
        &self,
        logits: &Vec<f32>,
        rows: usize,
        cols: usize,
        row_max: &Vec<f32>,
        row_sum: &mut Vec<f32>,
    ) -> Result<()> {
        margin_softmax::exp_rowsum(logits, rows, cols, row_max, row_sum);
        Ok(())
    }

    fn softmax_loss_grad(
        &self,
        logits: &mut Vec<f32>,
        rows: usize,
        cols: usize,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_max: &Vec<f32>,
        row_sum: &Vec<f32>,
        target_cos: &Vec<f32>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        margin_softmax::softmax_loss_grad(
            logits, rows, cols, labels, margin, row_max, row_sum, target_cos, grad_scale, row_loss,
        );
        Ok(())
    }

    fn margin_softmax_fused(
        &self,
        logits: &mut Vec<f32>,
        rows: usize,
        cols: usize,
        labels: &Vec<i32>,
        margin: &MarginParams,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        margin_softmax::margin_softmax_fused(
            logits, rows, cols, labels, margin, grad_scale, row_loss,
        );
        Ok(())
    }

    fn margin_rowmax16(
        &self,
        cos: &Vec<u16>,
        rows: usize,
        cols: usize,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_max: &mut Vec<f32>,
        target_cos: &mut Vec<f32>,
    ) -> Result<()> {
        check16(cos, rows, cols, dtype, labels, "margin_rowmax16")?;
        need(row_max, rows, "margin_rowmax16 row_max")?;
        need(target_cos, rows, "margin_rowmax16 target_cos")?;
        margin_softmax16::margin_rowmax16(
            cos, rows, cols, dtype, labels, margin, row_max, target_cos,
        );
        Ok(())
    }

    fn exp_rowsum16(
        &self,
        cos: &Vec<u16>,
        rows: usize,
        cols: usize,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_max: &Vec<f32>,
        row_sum: &mut Vec<f32>,
    ) -> Result<()> {
        check16(cos, rows, cols, dtype, labels, "exp_rowsum16")?;
        need(row_max, rows, "exp_rowsum16 row_max")?;
        need(row_sum, rows, "exp_rowsum16 row_sum")?;
        margin_softmax16::exp_rowsum16(cos, rows, cols, dtype, labels, margin, row_max, row_sum);
        Ok(())
    }

    fn softmax_loss_grad16(
        &self,
        cos: &mut Vec<u16>,
        rows: usize,
        cols: usize,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_max: &Vec<f32>,
        row_sum: &Vec<f32>,
        target_cos: &Vec<f32>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        check16(cos, rows, cols, dtype, labels, "softmax_loss_grad16")?;
        for (buf, what) in [
            (row_max, "row_max"),
            (row_sum, "row_sum"),
            (target_cos, "target_cos"),
        ] {
            need(buf, rows, what)?;
        }
        need(row_loss, rows, "softmax_loss_grad16 row_loss")?;
        margin_softmax16::softmax_loss_grad16(
            cos, rows, cols, dtype, labels, margin, row_max, row_sum, target_cos, grad_scale,
            row_loss,
        );
        Ok(())
    }

    fn margin_softmax_fused16(
        &self,
        cos: &mut Vec<u16>,
        rows: usize,
        cols: usize,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        check16(cos, rows, cols, dtype, labels, "margin_softmax_fused16")?;
        need(row_loss, rows, "margin_softmax_fused16 row_loss")?;
        margin_softmax16::margin_softmax_fused16(
            cos, rows, cols, dtype, labels, margin, grad_scale, row_loss,
        );
        Ok(())
    }

    fn normalize_backward(
        &self,
        grad: &mut Vec<f32>,
        x_hat: &Vec<f32>,
        norms: &Vec<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        normalize::normalize_backward(grad, x_hat, norms, rows, dim);
        Ok(())
    }

    fn scatter_rows(
        &self,
        rows: &Vec<f32>,
        index: &Vec<i32>,
        count: usize,
        dim: usize,
        dense: &mut Vec<f32>,
        shard_len: usize,
    ) -> Result<()> {
        optimizer::scatter_rows(rows, &index[..count], dim, &mut dense[..shard_len * dim]);
        Ok(())
    }

    fn sgd_momentum_sparse(
        &self,
        weight: &mut Vec<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &Vec<f32>,
        index: &Vec<i32>,
        count: usize,
        dim: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        need(grad, count * dim, "sgd_momentum_sparse grad")?;
        need(index, count, "sgd_momentum_sparse index")?;
        momentum.need(self, weight.len(), "sgd_momentum_sparse")?;
        let index = &index[..count];
        // The reference walks the shard once, so the rows must be sorted, unique and inside it.
        let rows = weight.len() / dim.max(1);
        let mut next = 0i64;
        for &r in index {
            if i64::from(r) < next || r as usize >= rows {
                return Err(crate::error::PfcError::Shape(format!(
                    "sgd_momentum_sparse: sampled row {r} is not sorted, unique and below {rows}"
                )));
            }
            next = i64::from(r) + 1;
        }
        match momentum {
            StateBuf::F32(v) => {
                optimizer::sgd_momentum_sparse(weight, v, grad, index, dim, lr, mu, weight_decay)
            }
            StateBuf::Bf16(v) => {
                optimizer::sgd_momentum_sparse(weight, v, grad, index, dim, lr, mu, weight_decay)
            }
        }
        Ok(())
    }

    fn sgd_momentum_dense(
        &self,
        weight: &mut Vec<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &Vec<f32>,
        len: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        need(weight, len, "sgd_momentum_dense weight")?;
        need(grad, len, "sgd_momentum_dense grad")?;
        momentum.need(self, len, "sgd_momentum_dense")?;
        let (w, g) = (&mut weight[..len], &grad[..len]);
        match momentum {
            StateBuf::F32(v) => {
                optimizer::sgd_momentum_dense(w, &mut v[..len], g, lr, mu, weight_decay)
            }
            StateBuf::Bf16(v) => {
                optimizer::sgd_momentum_dense(w, &mut v[..len], g, lr, mu, weight_decay)
            }
        }
        Ok(())
    }
}
