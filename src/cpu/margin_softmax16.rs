//! The margin softmax on 16-bit cosines (CPU references of the `*16` kernels of
//! `cuda/margin_softmax.cu`), used when the step's GEMMs run in bf16 or f16.
//!
//! With 16-bit GEMM operands the logits GEMM writes the cosines in the same 16-bit type (as
//! PyTorch's autocast does) and the backward GEMMs read the gradient in it, so the N·k × S matrix
//! takes 2 bytes per entry instead of 4 and needs no cast on either side. Everything in between
//! is f32: each pass widens a row's cosines, computes exactly what the f32 passes compute, and
//! only the gradient is rounded back to 16 bits (f16 saturates at ±65504 instead of overflowing).
//!
//! One difference in the passes: the f32 pass 1 stores the scaled logits for passes 2 and 3, but
//! `s · cos` rounded to 16 bits would lose up to 64·2⁻⁹ ≈ 0.125 (bf16, s = 64) of a logit, 13% in
//! its exp. So here pass 1 only reads, and passes 2 and 3 recompute the margin from the cosine
//! (which the one-kernel path does anyway). The results are bit-identical to the f32 passes run
//! on the widened cosines, with the gradient then rounded; tests/margin_softmax16.rs checks that.
//!
//! These references widen each row into a scratch row and reuse the f32 row functions, which
//! keeps them obviously equal to the f32 semantics; they are not the fast path (the CPU backend
//! multiplies in f32 and never holds 16-bit logits in a layer).

use super::margin_softmax::{
    class_columns, exp_sum_row_fast, fused_row_fast, loss_grad_row, margin_row_fast, RowStats,
};
use crate::backend::LogitsShape;
use crate::config::MarginParams;
use crate::plan::Dtype;
use half::{bf16, f16};
use rayon::prelude::*;

/// The largest finite f16; a gradient beyond it is stored as ±65504, not ±∞.
pub const F16_MAX: f32 = 65504.0;

/// A 16-bit value of `dtype` (bf16 or f16) as f32 (exact).
pub fn widen(bits: u16, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::Bf16 => bf16::from_bits(bits).to_f32(),
        _ => f16::from_bits(bits).to_f32(),
    }
}

/// `v` rounded to nearest even in `dtype`; f16 saturates at ±[`F16_MAX`] (NaN stays NaN).
pub fn narrow(v: f32, dtype: Dtype) -> u16 {
    match dtype {
        Dtype::Bf16 => bf16::from_f32(v).to_bits(),
        _ => f16::from_f32(v.clamp(-F16_MAX, F16_MAX)).to_bits(),
    }
}

fn widen_row(row: &[u16], dtype: Dtype, out: &mut Vec<f32>) {
    out.clear();
    out.extend(row.iter().map(|&b| widen(b, dtype)));
}

/// Pass 1 on 16-bit cosines: local row max of the margin logits and the raw target cosine.
/// Reads only, and not the padding columns.
#[allow(clippy::too_many_arguments)]
pub fn margin_rowmax16(
    cos: &[u16],
    shape: LogitsShape,
    dtype: Dtype,
    labels: &[i32],
    p: &MarginParams,
    row_margins: Option<&[f32]>,
    row_max: &mut [f32],
    target_cos: &mut [f32],
) {
    let LogitsShape { rows, cols, ld } = shape;
    if cols == 0 {
        row_max[..rows].fill(f32::NEG_INFINITY);
        target_cos[..rows].fill(0.0);
        return;
    }
    cos[..rows * ld]
        .par_chunks(ld)
        .zip(row_max[..rows].par_iter_mut())
        .zip(target_cos[..rows].par_iter_mut())
        .zip(labels[..rows].par_iter())
        .enumerate()
        .for_each_init(Vec::new, |z, (i, (((row, max), tcos), &label))| {
            widen_row(&row[..cols], dtype, z);
            let target = usize::try_from(label).ok();
            (*max, *tcos) = margin_row_fast(z, target, &p.for_row(row_margins, i));
        });
}

/// Pass 2 on 16-bit cosines: local `Σ exp(z − max)` with the margin logits recomputed.
#[allow(clippy::too_many_arguments)]
pub fn exp_rowsum16(
    cos: &[u16],
    shape: LogitsShape,
    dtype: Dtype,
    labels: &[i32],
    p: &MarginParams,
    row_margins: Option<&[f32]>,
    row_max: &[f32],
    row_sum: &mut [f32],
) {
    let LogitsShape { rows, cols, ld } = shape;
    if cols == 0 {
        row_sum[..rows].fill(0.0);
        return;
    }
    cos[..rows * ld]
        .par_chunks(ld)
        .zip(row_sum[..rows].par_iter_mut())
        .zip(row_max[..rows].par_iter())
        .zip(labels[..rows].par_iter())
        .enumerate()
        .for_each_init(Vec::new, |z, (i, (((row, sum), &max), &label))| {
            widen_row(&row[..cols], dtype, z);
            let target = usize::try_from(label).ok();
            margin_row_fast(z, target, &p.for_row(row_margins, i));
            *sum = exp_sum_row_fast(z, max);
        });
}

/// Pass 3 on 16-bit cosines: loss per row and the gradient with respect to the clamped cosine,
/// rounded to 16 bits, in place; zeros (+0.0) in the padding columns. `row_loss` of `2·rows`:
/// the losses, then the raw target cosines (as the f32 pass 3).
#[allow(clippy::too_many_arguments)]
pub fn softmax_loss_grad16(
    cos: &mut [u16],
    shape: LogitsShape,
    dtype: Dtype,
    labels: &[i32],
    p: &MarginParams,
    row_margins: Option<&[f32]>,
    row_max: &[f32],
    row_sum: &[f32],
    target_cos: &[f32],
    grad_scale: f32,
    row_loss: &mut [f32],
) {
    let LogitsShape { rows, cols, ld } = shape;
    let (row_loss, row_target_cos) = row_loss[..2 * rows].split_at_mut(rows);
    row_loss.fill(0.0);
    for (out, (&label, &c)) in row_target_cos
        .iter_mut()
        .zip(labels[..rows].iter().zip(target_cos))
    {
        *out = if label >= 0 { c } else { 0.0 };
    }
    if ld == 0 {
        return;
    }
    cos[..rows * ld]
        .par_chunks_mut(ld)
        .zip(row_loss.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |z, (i, (row, loss))| {
            let Some(row) = class_columns(row, cols) else {
                return;
            };
            widen_row(row, dtype, z);
            let target = usize::try_from(labels[i]).ok();
            let p = p.for_row(row_margins, i);
            margin_row_fast(z, target, &p);
            let stats = RowStats {
                max: row_max[i],
                sum: row_sum[i],
                target_cos: target_cos[i],
            };
            *loss = loss_grad_row(z, target, stats, &p, grad_scale);
            for (out, &g) in row.iter_mut().zip(z.iter()) {
                *out = narrow(g, dtype);
            }
        });
}

/// The one-kernel margin softmax (world of one) on 16-bit cosines: loss per row and the 16-bit
/// gradient in place; zeros (+0.0) in the padding columns; `row_loss` of `2·rows`, as in
/// [`softmax_loss_grad16`].
#[allow(clippy::too_many_arguments)]
pub fn margin_softmax_fused16(
    cos: &mut [u16],
    shape: LogitsShape,
    dtype: Dtype,
    labels: &[i32],
    p: &MarginParams,
    row_margins: Option<&[f32]>,
    grad_scale: f32,
    row_loss: &mut [f32],
) {
    let LogitsShape { rows, cols, ld } = shape;
    let (row_loss, row_target_cos) = row_loss[..2 * rows].split_at_mut(rows);
    row_loss.fill(0.0);
    row_target_cos.fill(0.0);
    if ld == 0 {
        return;
    }
    cos[..rows * ld]
        .par_chunks_mut(ld)
        .zip(row_loss.par_iter_mut().zip(row_target_cos.par_iter_mut()))
        .zip(labels[..rows].par_iter())
        .enumerate()
        .for_each_init(Vec::new, |z, (i, ((row, (loss, cos)), &label))| {
            let Some(row) = class_columns(row, cols) else {
                return;
            };
            widen_row(row, dtype, z);
            let target = usize::try_from(label).ok();
            if let Some(t) = target {
                *cos = z[t];
            }
            *loss = fused_row_fast(z, target, &p.for_row(row_margins, i), grad_scale);
            for (out, &g) in row.iter_mut().zip(z.iter()) {
                *out = narrow(g, dtype);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_saturates_f16_and_keeps_nan() {
        assert_eq!(widen(narrow(1e6, Dtype::F16), Dtype::F16), F16_MAX);
        assert_eq!(widen(narrow(-1e6, Dtype::F16), Dtype::F16), -F16_MAX);
        assert!(widen(narrow(f32::NAN, Dtype::F16), Dtype::F16).is_nan());
        assert_eq!(widen(narrow(1e6, Dtype::Bf16), Dtype::Bf16), 999_424.0);
        assert_eq!(widen(narrow(0.1, Dtype::Bf16), Dtype::Bf16), 0.100_097_656);
    }
}
