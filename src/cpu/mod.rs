//! The CPU backend: reference kernels, parallel over rows with rayon, GEMMs through `gemm`.
//!
//! Each file holds the CPU twin of one CUDA kernel family in `cuda/`, function for function.

pub mod gemm;
pub mod hard_negatives;
pub mod margin_softmax;
pub mod margin_softmax16;
pub mod normalize;
pub mod optimizer;
pub mod row_scale;
pub mod sampling;
pub mod simd;
pub mod top_k;
pub mod wire;

use crate::backend::{AdamWStep, Backend, Elem, LogitsShape, SampleArgs, StateBuf};
use crate::config::{MarginParams, ROW_MARGIN_FLOATS};
use crate::error::{PfcError, Result};
use crate::plan::Dtype;

/// The buffer-length check of every method, as the CUDA backend makes it: a typed error, not a
/// slice panic, when a caller asks for more elements than a buffer holds. The kernels in the
/// submodules trust the lengths and indices they are given; every `CpuBackend` method checks
/// them first (O(1) per buffer, O(n) over index and label arrays, never over big buffers).
fn need<T>(buf: &[T], len: usize, what: &str) -> Result<()> {
    if buf.len() < len {
        return Err(PfcError::Shape(format!(
            "{what}: buffer of {} elements, {len} needed",
            buf.len()
        )));
    }
    Ok(())
}

/// A per-row margin table, if any, holds [`ROW_MARGIN_FLOATS`] floats for each of `rows`.
fn need_row_margins(table: Option<&Vec<f32>>, rows: usize, what: &str) -> Result<()> {
    match table {
        Some(t) => need(
            t,
            elems(rows, ROW_MARGIN_FLOATS, what)?,
            &format!("{what} row_margins"),
        ),
        None => Ok(()),
    }
}

/// `a × b` elements, or a typed error when the product overflows `usize`.
fn elems(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| PfcError::Shape(format!("{what}: {a} × {b} elements overflow usize")))
}

/// `rows × (dim + extra)` elements (a packed wire row carries `extra` label words), checked.
fn packed_elems(rows: usize, dim: usize, extra: usize, what: &str) -> Result<usize> {
    let row = dim.checked_add(extra).ok_or_else(|| {
        PfcError::Shape(format!(
            "{what}: a row of {dim} + {extra} elements overflows usize"
        ))
    })?;
    elems(rows, row, what)
}

/// The kernels that split buffers into rows of `dim` need `dim >= 1`.
fn need_dim(dim: usize, what: &str) -> Result<()> {
    if dim == 0 {
        return Err(PfcError::Shape(format!("{what}: dim must be >= 1")));
    }
    Ok(())
}

/// Every entry of a row index lies in `[0, bound)`.
fn check_index(index: &[i32], bound: usize, what: &str) -> Result<()> {
    match index
        .iter()
        .position(|&r| usize::try_from(r).map_or(true, |r| r >= bound))
    {
        Some(i) => Err(PfcError::Shape(format!(
            "{what}: index[{i}] = {} is outside [0, {bound})",
            index[i]
        ))),
        None => Ok(()),
    }
}

/// The lengths and index a scatter of `count` rows into a `shard_len × dim` buffer reads and
/// writes: the index's first `count` entries (each in `[0, shard_len)`) and the dense length.
fn scatter_checks<'a>(
    rows: &[f32],
    index: &'a [i32],
    count: usize,
    dim: usize,
    dense: &[f32],
    shard_len: usize,
    what: &str,
) -> Result<(&'a [i32], usize)> {
    let (rows_what, dense_what) = (format!("{what} rows"), format!("{what} dense"));
    need(rows, elems(count, dim, &rows_what)?, &rows_what)?;
    need(index, count, &format!("{what} index"))?;
    let len = elems(shard_len, dim, &dense_what)?;
    need(dense, len, &dense_what)?;
    let index = &index[..count];
    check_index(index, shard_len, what)?;
    Ok((index, len))
}

/// Every label lies below `cols` (a column of its row, or a class of the shard) or is negative
/// (the target lives on another rank).
fn check_labels(labels: &[i32], cols: usize, what: &str) -> Result<()> {
    match labels
        .iter()
        .position(|&l| usize::try_from(l).is_ok_and(|l| l >= cols))
    {
        Some(i) => Err(PfcError::Shape(format!(
            "{what}: label {} of row {i} is not below {cols} (nor negative: elsewhere)",
            labels[i]
        ))),
        None => Ok(()),
    }
}

/// The checks of every f32 softmax pass: `rows × ld` logits and `rows` labels, each a column.
fn check_softmax(
    logits: &[f32],
    shape: LogitsShape,
    labels: Option<&[i32]>,
    what: &str,
) -> Result<()> {
    need(logits, shape.len()?, what)?;
    if let Some(labels) = labels {
        need(labels, shape.rows, what)?;
        check_labels(&labels[..shape.rows], shape.cols, what)?;
    }
    Ok(())
}

/// The checks every 16-bit softmax pass makes: a 16-bit dtype and buffers that hold the rows.
fn check16(
    cos: &[u16],
    shape: LogitsShape,
    dtype: Dtype,
    labels: &[i32],
    what: &str,
) -> Result<()> {
    if dtype == Dtype::F32 {
        return Err(PfcError::Shape(format!(
            "{what}: 16-bit cosines need dtype bf16 or f16, not f32"
        )));
    }
    need(cos, shape.len()?, what)?;
    need(labels, shape.rows, what)?;
    check_labels(&labels[..shape.rows], shape.cols, what)
}

/// The 16-bit casts take f16 or bf16; f32 is no wire format to cast to (a typed error, where
/// `to_wire` would otherwise treat it as f16).
fn need_16_bit(wire: Dtype) -> Result<()> {
    if wire == Dtype::F32 {
        return Err(PfcError::param(
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
            PfcError::Device(format!(
                "cannot allocate {} bytes of host memory",
                len as u128 * std::mem::size_of::<T>() as u128
            ))
        })?;
        buf.resize(len, T::default());
        Ok(buf)
    }

    fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn upload_at<T: Elem>(&self, host: &[T], dst: &mut Vec<T>, offset: usize) -> Result<()> {
        let end = offset
            .checked_add(host.len())
            .filter(|&end| end <= dst.len());
        let Some(end) = end else {
            return Err(PfcError::Shape(format!(
                "upload of {} elements at {offset} into a buffer of {}",
                host.len(),
                dst.len()
            )));
        };
        dst[offset..end].copy_from_slice(host);
        Ok(())
    }

    fn download_at<T: Elem>(&self, src: &Vec<T>, offset: usize, len: usize) -> Result<Vec<T>> {
        need(src, offset.saturating_add(len), "download_at")?;
        Ok(src[offset..offset + len].to_vec())
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
        // Local ids are i32: a larger shard would truncate them (as `sample_classes` refuses).
        if i32::try_from(shard_len).is_err() {
            return Err(PfcError::Shape(format!(
                "localize_labels: shard_len = {shard_len} exceeds i32::MAX"
            )));
        }
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
        let shard = args.shard_len;
        if i32::try_from(shard).is_err() {
            return Err(PfcError::Shape(format!(
                "sample_classes: shard_len = {shard} exceeds i32::MAX"
            )));
        }
        if args.shard_start.checked_add(shard as u64).is_none() {
            return Err(PfcError::Shape(format!(
                "sample_classes: classes {} + {shard} overflow u64",
                args.shard_start
            )));
        }
        need(labels, args.rows, "sample_classes labels")?;
        check_labels(&labels[..args.rows], shard, "sample_classes labels")?;
        if args.num_sample >= shard {
            need(sampled, shard, "sample_classes sampled")?;
        } else {
            need(keys, shard, "sample_classes keys")?;
            // Every positive is kept, so the sample may exceed `num_sample`, up to one class per
            // row (the capacity the layer allocates: `plan::buffers::sampled_capacity`).
            let most = args.num_sample.max(args.rows).min(shard);
            need(sampled, most, "sample_classes sampled")?;
            if let (Some(scores), true) = (scores, args.hard_fraction > 0.0) {
                need(scores, shard, "sample_classes scores")?;
            }
        }
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

    fn class_top_k(
        &self,
        weight: &Vec<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &Vec<f32>,
        rows: usize,
        k: usize,
        chunk_weights: &mut Vec<f32>,
        chunk_cosines: &mut Vec<f32>,
        top_scores: &mut Vec<f32>,
        top_ids: &mut Vec<i32>,
    ) -> Result<()> {
        top_k::class_top_k(
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
            return Err(PfcError::param(
                "wire",
                "f32",
                "the packed wire format is f16 or bf16; f32 embeddings are gathered unpacked",
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        need_dim(dim, "pack_embeddings")?;
        need(
            x,
            elems(rows, dim, "pack_embeddings x")?,
            "pack_embeddings x",
        )?;
        need(labels, rows, "pack_embeddings labels")?;
        let len = packed_elems(rows, dim, 4, "pack_embeddings packed")?;
        need(packed, len, "pack_embeddings packed")?;
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
        need_16_bit(wire)?;
        if rows == 0 {
            return Ok(());
        }
        need_dim(dim, "unpack_normalize")?;
        let len = packed_elems(rows, dim, 4, "unpack_normalize packed")?;
        need(packed, len, "unpack_normalize packed")?;
        need(labels, rows, "unpack_normalize labels")?;
        need(
            x_hat,
            elems(rows, dim, "unpack_normalize")?,
            "unpack_normalize x_hat",
        )?;
        need(norms, rows, "unpack_normalize norms")?;
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
        if rows == 0 {
            return Ok(());
        }
        need_dim(dim, "unpack_normalize_f32")?;
        let len = packed_elems(rows, dim, 2, "unpack_normalize_f32 packed")?;
        need(packed, len, "unpack_normalize_f32 packed")?;
        need(labels, rows, "unpack_normalize_f32 labels")?;
        let len = elems(rows, dim, "unpack_normalize_f32")?;
        need(x_hat, len, "unpack_normalize_f32 x_hat")?;
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
        if count == 0 {
            return Ok(());
        }
        need_dim(dim, "gather_normalize_rows")?;
        need(index, count, "gather_normalize_rows index")?;
        let len = elems(count, dim, "gather_normalize_rows")?;
        need(out, len, "gather_normalize_rows out")?;
        need(norms, count, "gather_normalize_rows norms")?;
        let index = &index[..count];
        check_index(index, weight.len() / dim, "gather_normalize_rows")?;
        normalize::gather_normalize_rows(weight, dim, index, out, norms);
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
        if rows == 0 {
            return Ok(());
        }
        need_dim(dim, "normalize_rows")?;
        let len = elems(rows, dim, "normalize_rows")?;
        need(x, len, "normalize_rows x")?;
        need(out, len, "normalize_rows out")?;
        need(norms, rows, "normalize_rows norms")?;
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
        shape: LogitsShape,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &mut Vec<f32>,
        target_cos: &mut Vec<f32>,
    ) -> Result<()> {
        check_softmax(logits, shape, Some(labels), "margin_rowmax")?;
        need_row_margins(row_margins, shape.rows, "margin_rowmax")?;
        need(row_max, shape.rows, "margin_rowmax row_max")?;
        need(target_cos, shape.rows, "margin_rowmax target_cos")?;
        margin_softmax::margin_rowmax(
            logits,
            shape,
            labels,
            margin,
            row_margins.map(Vec::as_slice),
            row_max,
            target_cos,
        );
        Ok(())
    }

    fn exp_rowsum(
        &self,
        logits: &Vec<f32>,
        shape: LogitsShape,
        row_max: &Vec<f32>,
        row_sum: &mut Vec<f32>,
    ) -> Result<()> {
        check_softmax(logits, shape, None, "exp_rowsum")?;
        need(row_max, shape.rows, "exp_rowsum row_max")?;
        need(row_sum, shape.rows, "exp_rowsum row_sum")?;
        margin_softmax::exp_rowsum(logits, shape, row_max, row_sum);
        Ok(())
    }

    fn softmax_loss_grad(
        &self,
        logits: &mut Vec<f32>,
        shape: LogitsShape,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &Vec<f32>,
        row_sum: &Vec<f32>,
        target_cos: &Vec<f32>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        check_softmax(logits, shape, Some(labels), "softmax_loss_grad")?;
        need_row_margins(row_margins, shape.rows, "softmax_loss_grad")?;
        for (buf, what) in [
            (row_max, "softmax_loss_grad row_max"),
            (row_sum, "softmax_loss_grad row_sum"),
            (target_cos, "softmax_loss_grad target_cos"),
        ] {
            need(buf, shape.rows, what)?;
        }
        need(row_loss, 2 * shape.rows, "softmax_loss_grad row_loss")?;
        margin_softmax::softmax_loss_grad(
            logits,
            shape,
            labels,
            margin,
            row_margins.map(Vec::as_slice),
            row_max,
            row_sum,
            target_cos,
            grad_scale,
            row_loss,
        );
        Ok(())
    }

    fn margin_softmax_fused(
        &self,
        logits: &mut Vec<f32>,
        shape: LogitsShape,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        check_softmax(logits, shape, Some(labels), "margin_softmax_fused")?;
        need_row_margins(row_margins, shape.rows, "margin_softmax_fused")?;
        need(row_loss, 2 * shape.rows, "margin_softmax_fused row_loss")?;
        margin_softmax::margin_softmax_fused(
            logits,
            shape,
            labels,
            margin,
            row_margins.map(Vec::as_slice),
            grad_scale,
            row_loss,
        );
        Ok(())
    }

    fn margin_rowmax16(
        &self,
        cos: &Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &mut Vec<f32>,
        target_cos: &mut Vec<f32>,
    ) -> Result<()> {
        check16(cos, shape, dtype, labels, "margin_rowmax16")?;
        need_row_margins(row_margins, shape.rows, "margin_rowmax16")?;
        need(row_max, shape.rows, "margin_rowmax16 row_max")?;
        need(target_cos, shape.rows, "margin_rowmax16 target_cos")?;
        margin_softmax16::margin_rowmax16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins.map(Vec::as_slice),
            row_max,
            target_cos,
        );
        Ok(())
    }

    fn exp_rowsum16(
        &self,
        cos: &Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &Vec<f32>,
        row_sum: &mut Vec<f32>,
    ) -> Result<()> {
        check16(cos, shape, dtype, labels, "exp_rowsum16")?;
        need_row_margins(row_margins, shape.rows, "exp_rowsum16")?;
        need(row_max, shape.rows, "exp_rowsum16 row_max")?;
        need(row_sum, shape.rows, "exp_rowsum16 row_sum")?;
        margin_softmax16::exp_rowsum16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins.map(Vec::as_slice),
            row_max,
            row_sum,
        );
        Ok(())
    }

    fn softmax_loss_grad16(
        &self,
        cos: &mut Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &Vec<f32>,
        row_sum: &Vec<f32>,
        target_cos: &Vec<f32>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        check16(cos, shape, dtype, labels, "softmax_loss_grad16")?;
        need_row_margins(row_margins, shape.rows, "softmax_loss_grad16")?;
        for (buf, what) in [
            (row_max, "row_max"),
            (row_sum, "row_sum"),
            (target_cos, "target_cos"),
        ] {
            need(buf, shape.rows, what)?;
        }
        need(row_loss, 2 * shape.rows, "softmax_loss_grad16 row_loss")?;
        margin_softmax16::softmax_loss_grad16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins.map(Vec::as_slice),
            row_max,
            row_sum,
            target_cos,
            grad_scale,
            row_loss,
        );
        Ok(())
    }

    fn margin_softmax_fused16(
        &self,
        cos: &mut Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        check16(cos, shape, dtype, labels, "margin_softmax_fused16")?;
        need_row_margins(row_margins, shape.rows, "margin_softmax_fused16")?;
        need(row_loss, 2 * shape.rows, "margin_softmax_fused16 row_loss")?;
        margin_softmax16::margin_softmax_fused16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins.map(Vec::as_slice),
            grad_scale,
            row_loss,
        );
        Ok(())
    }

    fn scale_rows(&self, g: &mut Vec<f32>, shape: LogitsShape, weights: &Vec<f32>) -> Result<()> {
        check_softmax(g, shape, None, "scale_rows")?;
        need(weights, shape.rows, "scale_rows weights")?;
        row_scale::scale_rows(g, shape.rows, shape.ld, weights);
        Ok(())
    }

    fn scale_rows16(
        &self,
        g: &mut Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        weights: &Vec<f32>,
    ) -> Result<()> {
        need_16_bit(dtype)?;
        need(g, shape.len()?, "scale_rows16")?;
        need(weights, shape.rows, "scale_rows16 weights")?;
        row_scale::scale_rows16(g, shape.rows, shape.ld, dtype, weights);
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
        if rows == 0 {
            return Ok(());
        }
        need_dim(dim, "normalize_backward")?;
        let len = elems(rows, dim, "normalize_backward")?;
        need(grad, len, "normalize_backward grad")?;
        need(x_hat, len, "normalize_backward x_hat")?;
        need(norms, rows, "normalize_backward norms")?;
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
        let (index, len) =
            scatter_checks(rows, index, count, dim, dense, shard_len, "scatter_rows")?;
        optimizer::scatter_rows(rows, index, dim, &mut dense[..len]);
        Ok(())
    }

    fn scatter_add_rows(
        &self,
        rows: &Vec<f32>,
        index: &Vec<i32>,
        count: usize,
        dim: usize,
        dense: &mut Vec<f32>,
        shard_len: usize,
    ) -> Result<()> {
        let (index, len) = scatter_checks(
            rows,
            index,
            count,
            dim,
            dense,
            shard_len,
            "scatter_add_rows",
        )?;
        optimizer::scatter_add_rows(rows, index, dim, &mut dense[..len]);
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
        let len = elems(count, dim, "sgd_momentum_sparse grad")?;
        need(grad, len, "sgd_momentum_sparse grad")?;
        need(index, count, "sgd_momentum_sparse index")?;
        momentum.need(self, weight.len(), "sgd_momentum_sparse")?;
        let index = &index[..count];
        check_sorted_rows(index, weight.len() / dim.max(1), "sgd_momentum_sparse")?;
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

    fn supports_adamw(&self) -> bool {
        true
    }

    fn adamw_sparse(
        &self,
        weight: &mut Vec<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &Vec<f32>,
        index: &Vec<i32>,
        count: usize,
        dim: usize,
        step: AdamWStep,
    ) -> Result<()> {
        let len = elems(count, dim, "adamw_sparse grad")?;
        need(grad, len, "adamw_sparse grad")?;
        need(index, count, "adamw_sparse index")?;
        exp_avg.need(self, weight.len(), "adamw_sparse exp_avg")?;
        exp_avg_sq.need(self, weight.len(), "adamw_sparse exp_avg_sq")?;
        let index = &index[..count];
        check_sorted_rows(index, weight.len() / dim.max(1), "adamw_sparse")?;
        let s = step.scalars();
        match (exp_avg, exp_avg_sq) {
            (StateBuf::F32(m), StateBuf::F32(v)) => {
                optimizer::adamw_sparse(weight, m, v, grad, index, dim, s)
            }
            (StateBuf::Bf16(m), StateBuf::Bf16(v)) => {
                optimizer::adamw_sparse(weight, m, v, grad, index, dim, s)
            }
            _ => return Err(crate::backend::mixed_moments()),
        }
        Ok(())
    }

    fn adamw_dense(
        &self,
        weight: &mut Vec<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &Vec<f32>,
        len: usize,
        step: AdamWStep,
    ) -> Result<()> {
        need(weight, len, "adamw_dense weight")?;
        need(grad, len, "adamw_dense grad")?;
        exp_avg.need(self, len, "adamw_dense exp_avg")?;
        exp_avg_sq.need(self, len, "adamw_dense exp_avg_sq")?;
        let (w, g, s) = (&mut weight[..len], &grad[..len], step.scalars());
        match (exp_avg, exp_avg_sq) {
            (StateBuf::F32(m), StateBuf::F32(v)) => {
                optimizer::adamw_dense(w, &mut m[..len], &mut v[..len], g, s)
            }
            (StateBuf::Bf16(m), StateBuf::Bf16(v)) => {
                optimizer::adamw_dense(w, &mut m[..len], &mut v[..len], g, s)
            }
            _ => return Err(crate::backend::mixed_moments()),
        }
        Ok(())
    }
}

/// The sparse updates walk the shard once, so the sampled rows must be sorted, unique and
/// inside it.
fn check_sorted_rows(index: &[i32], rows: usize, what: &str) -> Result<()> {
    let mut next = 0i64;
    for &r in index {
        if i64::from(r) < next || r as usize >= rows {
            return Err(PfcError::Shape(format!(
                "{what}: sampled row {r} is not sorted, unique and below {rows}"
            )));
        }
        next = i64::from(r) + 1;
    }
    Ok(())
}
