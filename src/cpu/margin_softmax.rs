//! The fused margin softmax in three passes (CPU references of `cuda/margin_softmax.cu`).
//!
//! Between the passes the step all-reduces the row maxima (max) and the row sums (sum), so the
//! softmax is normalized over every rank's columns while each rank only holds its own. A world
//! of one needs no all-reduce and runs [`margin_softmax_fused`] instead: two sweeps per row with
//! an online softmax, same results.
//!
//! Two encodings carry information from pass 1 to pass 3 without extra memory:
//! - a filtered non-target logit is stored as −0.0 (a kept zero is stored as +0.0);
//! - a non-target cosine clipped to ±1 (|cos| > 1) is stored one ulp beyond ±s, and passes no
//!   gradient, as the published implementation's clamp; a cosine of exactly ±1.0 is inside the
//!   clamp and passes its gradient, as torch's clamp backward does (ends included). That matters
//!   for 16-bit logits, where every bf16 cosine above 1 − 2⁻⁹ is exactly 1.0: storing both as ±s
//!   took the gradient from the hardest negatives. The ulp changes that entry's exp by a factor
//!   of 1 + 2⁻¹⁷ (s = 64).

use super::simd::{self, with_avx2, LANES};
use crate::backend::LogitsShape;
use crate::config::MarginParams;
use rayon::prelude::*;

/// The target logit before scaling, `cos(m1·θ + m2) − m3` (with the optional monotonic fallback),
/// of a clamped cosine `c`.
pub fn target_logit(c: f32, p: &MarginParams) -> f32 {
    if p.fallback && c <= p.fallback_cos {
        return c - p.fallback_mm - p.m3;
    }
    if p.m1 == 1.0 && p.m2 == 0.0 {
        return c - p.m3;
    }
    margin_angle(c, p).cos() - p.m3
}

/// The angle `m1·θ + m2`, held at 0 from below: a negative per-row m2 (AdaFace) would otherwise
/// fold the cosine back down near θ = 0 (AdaFace clips the angle there too). A NaN stays NaN;
/// never below 0 for m2 >= 0.
fn margin_angle(c: f32, p: &MarginParams) -> f32 {
    let a = p.m1 * c.acos() + p.m2;
    if a < 0.0 {
        0.0
    } else {
        a
    }
}

/// d target_logit / d c for [`crate::GradMode::Exact`].
pub fn target_logit_slope(c: f32, p: &MarginParams) -> f32 {
    if (p.fallback && c <= p.fallback_cos) || (p.m1 == 1.0 && p.m2 == 0.0) {
        return 1.0;
    }
    let theta = c.acos();
    if p.m1 * theta + p.m2 < 0.0 {
        return 0.0; // held at 0 (margin_angle): flat
    }
    // (1 − c)(1 + c) as in cuda/margin_softmax.cu: 1 − c is exact near c = 1, and nothing in it
    // can be fused into an FMA by a GPU compiler, so both devices round it alike.
    let sin_theta = ((1.0 - c) * (1.0 + c)).max(0.0).sqrt().max(1e-6);
    p.m1 * (p.m1 * theta + p.m2).sin() / sin_theta
}

/// Whether pass 1 marked this logit as filtered (stored as −0.0).
pub fn is_filtered(z: f32) -> bool {
    z.to_bits() == 0x8000_0000
}

/// Pass 1 on one non-target cosine: clamp, filter (−0.0), scale, and a clipped one marked one
/// ulp beyond ±s.
#[inline(always)]
fn nontarget_logit(raw: f32, scale: f32, filter: Option<f32>) -> f32 {
    let c = raw.clamp(-1.0, 1.0);
    let z = match filter {
        Some(t) if c > t => return -0.0,
        // `+ 0.0` turns a computed −0.0 into +0.0, keeping −0.0 for "filtered".
        Some(_) => scale * c + 0.0,
        None => scale * c,
    };
    // ±s is a nonzero float, so one more in its bits is one ulp further from zero.
    f32::from_bits(z.to_bits() + u32::from(raw.abs() > 1.0))
}

/// Whether a non-target logit (as pass 1 stores it) passes no gradient: filtered, or clipped
/// (marked beyond ±s; exactly ±s is a cosine of ±1.0, inside the clamp).
#[inline(always)]
fn passes_no_gradient(z: f32, scale: f32, filter: bool) -> bool {
    (filter && is_filtered(z)) || z.abs() > scale
}

/// Pass 1 on the non-target entries of a row segment: clamp, filter, scale; returns their max.
#[inline(always)]
fn scale_segment(seg: &mut [f32], scale: f32, filter: Option<f32>) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = seg.chunks_exact_mut(LANES);
    let one = |v: &mut f32, m: &mut f32| {
        *v = nontarget_logit(*v, scale, filter);
        *m = if *v > *m { *v } else { *m };
    };
    for chunk in &mut chunks {
        for l in 0..LANES {
            one(&mut chunk[l], &mut lanes[l]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in chunks.into_remainder() {
        one(v, &mut m);
    }
    lanes.iter().fold(m, |a, &b| if b > a { b } else { a })
}

#[inline(always)]
fn margin_row(row: &mut [f32], target: Option<usize>, p: &MarginParams) -> (f32, f32) {
    match target {
        None => (scale_segment(row, p.scale, p.filter), 0.0),
        Some(t) => {
            let raw = row[t];
            let (before, rest) = row.split_at_mut(t);
            let m = scale_segment(before, p.scale, p.filter).max(scale_segment(
                &mut rest[1..],
                p.scale,
                p.filter,
            ));
            let z = p.scale * target_logit(raw.clamp(-1.0, 1.0), p);
            rest[0] = z;
            (m.max(z), raw)
        }
    }
}

with_avx2!(pub(super) fn margin_row_fast = margin_row(row: &mut [f32], target: Option<usize>, p: &MarginParams) -> (f32, f32));

/// The class columns of a padded logits row, after writing zeros (+0.0) over its padding, as
/// every pass that writes the gradient must; `None` when the row holds no class.
pub(super) fn class_columns<T: Copy + Default>(row: &mut [T], cols: usize) -> Option<&mut [T]> {
    let (classes, padding) = row.split_at_mut(cols);
    padding.fill(T::default());
    (cols > 0).then_some(classes)
}

/// Pass 1: clamp, filter, margin on the target, scale; local row max and raw target cosine.
/// The padding columns (`shape.cols..shape.ld`) are neither read nor written.
///
/// `row_margins`, in every softmax function here: a per-row margin table
/// ([`ROW_MARGIN_FLOATS`](crate::config::ROW_MARGIN_FLOATS) floats per row, [`MarginParams::for_row`])
/// whose m2 and m3 replace `p`'s on each row's target, or `None`.
pub fn margin_rowmax(
    logits: &mut [f32],
    shape: LogitsShape,
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
    logits[..rows * ld]
        .par_chunks_mut(ld)
        .zip(row_max[..rows].par_iter_mut())
        .zip(target_cos[..rows].par_iter_mut())
        .zip(labels[..rows].par_iter())
        .enumerate()
        .for_each(|(i, (((row, max), tcos), &label))| {
            let target = usize::try_from(label).ok();
            (*max, *tcos) = margin_row_fast(&mut row[..cols], target, &p.for_row(row_margins, i));
        });
}

#[inline(always)]
fn exp_sum_row(row: &[f32], max: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            lanes[l] += simd::exp(chunk[l] - max);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&z| simd::exp(z - max)).sum();
    lanes.iter().sum::<f32>() + tail
}

with_avx2!(pub(super) fn exp_sum_row_fast = exp_sum_row(row: &[f32], max: f32) -> f32);

/// Pass 2: local sum of `exp(z − max)` per row (max already all-reduced), padding columns left
/// out.
pub fn exp_rowsum(logits: &[f32], shape: LogitsShape, row_max: &[f32], row_sum: &mut [f32]) {
    let LogitsShape { rows, cols, ld } = shape;
    if cols == 0 {
        row_sum[..rows].fill(0.0);
        return;
    }
    logits[..rows * ld]
        .par_chunks(ld)
        .zip(row_sum[..rows].par_iter_mut())
        .zip(row_max[..rows].par_iter())
        .for_each(|((row, sum), &max)| *sum = exp_sum_row_fast(&row[..cols], max));
}

/// Per-row loss floor of the published implementation: `p` is clamped to 1e-30 before the log.
pub const MIN_PROBABILITY: f32 = 1e-30;

/// Pass 3 on every entry as if it were a non-target: `p · s · grad_scale`, or 0 where pass 1
/// filtered or clipped it.
#[inline(always)]
fn nontarget_grad_row(
    row: &mut [f32],
    max: f32,
    inv_sum: f32,
    slope: f32,
    scale: f32,
    filter: bool,
) {
    let one = |v: &mut f32| {
        let z = *v;
        let g = simd::exp(z - max) * inv_sum * slope;
        *v = if passes_no_gradient(z, scale, filter) {
            0.0
        } else {
            g
        };
    };
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for v in chunk.iter_mut() {
            one(v);
        }
    }
    chunks.into_remainder().iter_mut().for_each(one);
}

with_avx2!(fn nontarget_grad_row_fast = nontarget_grad_row(row: &mut [f32], max: f32, inv_sum: f32, slope: f32, scale: f32, filter: bool) -> ());

/// Pass 3: loss per row and the gradient with respect to the clamped cosine, in place; zeros in
/// the padding columns. `row_loss` holds `2·rows`: the losses, then each row's raw target
/// cosine (0 for a row whose target is not here); shorter panics (the backend checks it).
#[allow(clippy::too_many_arguments)]
pub fn softmax_loss_grad(
    logits: &mut [f32],
    shape: LogitsShape,
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
    logits[..rows * ld]
        .par_chunks_mut(ld)
        .zip(row_loss.par_iter_mut())
        .enumerate()
        .for_each(|(i, (row, loss))| {
            let Some(row) = class_columns(row, cols) else {
                return;
            };
            let target = usize::try_from(labels[i]).ok();
            let stats = RowStats {
                max: row_max[i],
                sum: row_sum[i],
                target_cos: target_cos[i],
            };
            *loss = loss_grad_row(row, target, stats, &p.for_row(row_margins, i), grad_scale);
        });
}

/// A row's all-reduced softmax statistics and its raw target cosine (pass 1's output).
#[derive(Debug, Clone, Copy)]
pub(super) struct RowStats {
    pub max: f32,
    pub sum: f32,
    pub target_cos: f32,
}

/// Pass 3 on one row of pass-1 logits: the gradient in place; returns the row's loss.
#[inline(always)]
pub(super) fn loss_grad_row(
    row: &mut [f32],
    target: Option<usize>,
    stats: RowStats,
    p: &MarginParams,
    grad_scale: f32,
) -> f32 {
    let inv_sum = 1.0 / stats.sum;
    let z_target = target.map(|t| row[t]);
    nontarget_grad_row_fast(
        row,
        stats.max,
        inv_sum,
        p.scale * grad_scale,
        p.scale,
        p.filter.is_some(),
    );
    match (target, z_target) {
        (Some(t), Some(z)) => {
            let (loss, grad) =
                target_loss_grad(z, stats.target_cos, stats.max, inv_sum, p, grad_scale);
            row[t] = grad;
            loss
        }
        _ => 0.0,
    }
}

/// The target's loss `−log p` and gradient `(p − 1) · (d logit / d c) · grad_scale`, from its
/// logit `z`, its raw cosine and the row's (all-reduced) max and `1 / sum`.
#[inline(always)]
fn target_loss_grad(
    z: f32,
    raw: f32,
    max: f32,
    inv_sum: f32,
    p: &MarginParams,
    grad_scale: f32,
) -> (f32, f32) {
    let prob = simd::exp(z - max) * inv_sum;
    // A NaN probability (a NaN weight or embedding got in) stays NaN in the loss: `max` would
    // turn it into -ln(1e-30) = 69.08, a finite loss that hides it.
    let loss = if prob.is_nan() {
        prob
    } else {
        -prob.max(MIN_PROBABILITY).ln()
    };
    let slope = if !(-1.0..=1.0).contains(&raw) {
        0.0
    } else if p.exact_grad {
        p.scale * target_logit_slope(raw, p)
    } else {
        p.scale
    };
    (loss, (prob - 1.0) * slope * grad_scale)
}

/// Online-softmax state of a run of logits: their max and `Σ exp(z − max)`.
#[derive(Clone, Copy)]
struct Online {
    max: f32,
    sum: f32,
}

impl Online {
    const EMPTY: Online = Online {
        max: f32::NEG_INFINITY,
        sum: 0.0,
    };

    /// Adds one logit, rescaling the sum when the max moves (branch-free, one `exp`).
    #[inline(always)]
    fn push(&mut self, z: f32) {
        let up = z > self.max;
        let e = simd::exp(-(z - self.max).abs());
        self.sum = if up { self.sum * e + 1.0 } else { self.sum + e };
        self.max = if up { z } else { self.max };
    }

    /// The state of both runs together. An empty run (sum 0) is skipped: rescaling it would
    /// compute `exp(−∞ + ∞)`; a run of NaN (max −∞, sum NaN) still poisons the sum, as in pass 2.
    #[inline(always)]
    fn merge(self, other: Online) -> Online {
        if other.sum == 0.0 {
            return self;
        }
        if self.sum == 0.0 {
            return other;
        }
        let max = self.max.max(other.max);
        Online {
            max,
            sum: self.sum * simd::exp(self.max - max) + other.sum * simd::exp(other.max - max),
        }
    }
}

/// Sweep 1 of the fused kernel on non-target raw cosines: pass 1's logits, never stored, folded
/// into an online max and sum with [`LANES`] independent states.
#[inline(always)]
fn online_segment(seg: &[f32], scale: f32, filter: Option<f32>) -> Online {
    let mut lanes = [Online::EMPTY; LANES];
    let mut chunks = seg.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            lanes[l].push(nontarget_logit(chunk[l], scale, filter));
        }
    }
    let mut acc = Online::EMPTY;
    for &v in chunks.remainder() {
        acc.push(nontarget_logit(v, scale, filter));
    }
    lanes.iter().fold(acc, |a, &b| a.merge(b))
}

/// Sweep 2 of the fused kernel on every raw cosine as if it were a non-target: pass 1's logit
/// recomputed, then pass 3's gradient written over the cosine.
#[inline(always)]
fn fused_grad_row(row: &mut [f32], max: f32, inv_sum: f32, slope: f32, p: &MarginParams) {
    let (scale, filter) = (p.scale, p.filter);
    let one = |v: &mut f32| {
        let z = nontarget_logit(*v, scale, filter);
        let g = simd::exp(z - max) * inv_sum * slope;
        *v = if passes_no_gradient(z, scale, filter.is_some()) {
            0.0
        } else {
            g
        };
    };
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for v in chunk.iter_mut() {
            one(v);
        }
    }
    chunks.into_remainder().iter_mut().for_each(one);
}

#[inline(always)]
fn fused_row(row: &mut [f32], target: Option<usize>, p: &MarginParams, grad_scale: f32) -> f32 {
    let (state, target) = match target {
        None => (online_segment(row, p.scale, p.filter), None),
        Some(t) => {
            let raw = row[t];
            let z = p.scale * target_logit(raw.clamp(-1.0, 1.0), p);
            let state = online_segment(&row[..t], p.scale, p.filter)
                .merge(online_segment(&row[t + 1..], p.scale, p.filter))
                .merge(Online { max: z, sum: 1.0 });
            (state, Some((t, raw, z)))
        }
    };
    let inv_sum = 1.0 / state.sum;
    fused_grad_row(row, state.max, inv_sum, p.scale * grad_scale, p);
    match target {
        None => 0.0,
        Some((t, raw, z)) => {
            let (loss, grad) = target_loss_grad(z, raw, state.max, inv_sum, p, grad_scale);
            row[t] = grad;
            loss
        }
    }
}

with_avx2!(pub(super) fn fused_row_fast = fused_row(row: &mut [f32], target: Option<usize>, p: &MarginParams, grad_scale: f32) -> f32);

/// The whole margin softmax for a world of one (CPU reference of the `margin_softmax_fused`
/// kernel): per row, one sweep over the raw cosines keeps an online max and rescaled sum of
/// `exp`, a second recomputes each logit from its cosine and writes the gradient over it. Same
/// encodings, loss and gradient as [`margin_rowmax`], [`exp_rowsum`] and [`softmax_loss_grad`]
/// with nothing all-reduced between them; only the sum's rounding differs. Zeros in the padding
/// columns; `row_loss` of `2·rows` as in [`softmax_loss_grad`].
#[allow(clippy::too_many_arguments)]
pub fn margin_softmax_fused(
    logits: &mut [f32],
    shape: LogitsShape,
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
    logits[..rows * ld]
        .par_chunks_mut(ld)
        .zip(row_loss.par_iter_mut().zip(row_target_cos.par_iter_mut()))
        .zip(labels[..rows].par_iter())
        .enumerate()
        .for_each(|(i, ((row, (loss, cos)), &label))| {
            if let Some(row) = class_columns(row, cols) {
                let target = usize::try_from(label).ok();
                if let Some(t) = target {
                    *cos = row[t];
                }
                *loss = fused_row_fast(row, target, &p.for_row(row_margins, i), grad_scale);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Margin;

    #[test]
    fn arcface_target_logit_is_cos_theta_plus_m() {
        let p = Margin::arcface().params();
        let c = 0.3f32;
        let want = (c.acos() + 0.5).cos();
        assert!((target_logit(c, &p) - want).abs() < 1e-6);
    }

    #[test]
    fn monotonic_fallback_applies_past_pi() {
        let mut m = Margin::arcface();
        m.fallback = crate::config::TargetFallback::Monotonic;
        let p = m.params();
        let c = -0.95f32; // θ ≈ 2.82 > π − 0.5
        let want = c - 0.5 * (std::f32::consts::PI - 0.5).sin();
        assert!((target_logit(c, &p) - want).abs() < 1e-6);
        assert_eq!(target_logit_slope(c, &p), 1.0);
    }

    /// torch's clamp backward passes the gradient at exactly ±1 and not beyond: a non-target
    /// cosine of 1.0 gets p·s, one of next_up(1.0) gets nothing (both were 0 when a clipped entry
    /// was stored as exactly ±s), in the three passes and the one-kernel path alike.
    #[test]
    fn a_cosine_of_exactly_one_passes_its_gradient_and_a_clipped_one_does_not() {
        let p = Margin::arcface().params();
        let over = f32::from_bits(1.0f32.to_bits() + 1);
        let under = -over;
        let raw = [0.2f32, 1.0, over, 0.5, -1.0, under];
        let shape = LogitsShape::dense(1, raw.len());
        let labels = [0];
        let (mut max, mut sum, mut tcos) = ([0.0f32], [0.0f32], [0.0f32]);
        let mut three = raw.to_vec();
        margin_rowmax(&mut three, shape, &labels, &p, None, &mut max, &mut tcos);
        exp_rowsum(&three, shape, &max, &mut sum);
        let mut loss3 = [0.0f32; 2];
        softmax_loss_grad(
            &mut three, shape, &labels, &p, None, &max, &sum, &tcos, 1.0, &mut loss3,
        );
        let mut fused = raw.to_vec();
        let mut loss1 = [0.0f32; 2];
        margin_softmax_fused(&mut fused, shape, &labels, &p, None, 1.0, &mut loss1);
        for g in [&three, &fused] {
            // the probability of a logit of s among these is about 1/2
            assert!(g[1] > 0.4 * p.scale && g[1] < 0.6 * p.scale, "{g:?}");
            assert_eq!(g[2], 0.0, "clipped above: {g:?}");
            assert_eq!(g[5], 0.0, "clipped below: {g:?}");
        }
        assert!((loss3[0] - loss1[0]).abs() < 1e-5, "{loss3:?} vs {loss1:?}");
        for (a, b) in three.iter().zip(&fused) {
            assert!((a - b).abs() <= 1e-5 * p.scale, "{three:?} vs {fused:?}");
        }
    }

    /// In bf16 every cosine above 1 − 2⁻⁹ is exactly 1.0: such a hard negative keeps its
    /// gradient.
    #[test]
    fn a_bf16_cosine_that_rounds_to_one_keeps_its_gradient() {
        use crate::plan::Dtype;
        let p = Margin::arcface().params();
        let bits = |v: f32| half::bf16::from_f32(v).to_bits();
        assert_eq!(bits(0.999), bits(1.0));
        let mut cos = vec![bits(0.2), bits(0.999), bits(0.5), bits(0.1)];
        let shape = LogitsShape::dense(1, 4);
        let mut loss = [0.0f32; 2];
        crate::cpu::margin_softmax16::margin_softmax_fused16(
            &mut cos,
            shape,
            Dtype::Bf16,
            &[0],
            &p,
            None,
            1.0,
            &mut loss,
        );
        let g = half::bf16::from_bits(cos[1]).to_f32();
        assert!(g > 0.4 * p.scale, "{g}");
    }
}
