//! What a pass gives back per row besides the embedding gradient: each row's loss, its target
//! cosine, and the gradient of the loss with respect to the row's margins. The last is what a
//! loss whose margin depends on the embedding needs (MagFace's m(‖z‖), [`crate::MagFace`]): the
//! layer takes per-row margins as constants ([`crate::PassOptions`]), and the chain rule through
//! them is the caller's, with these slopes.

use crate::config::{MarginParams, ROW_MARGIN_FLOATS};

/// Per-row results of one pass, for this rank's rows (the order of its `labels`).
///
/// The softmax's owner of each row's target class computes the row's loss and target cosine;
/// one all-reduce of both (the loss's own) gives them to every rank, and each rank derives its
/// rows' margin gradients on the host from them: `d L / d zᵢ = c·wᵢ·(pᵢ − 1)` for the target
/// logit `zᵢ = s·f(cos θᵢ; m1, m2ᵢ, m3ᵢ)`, with `pᵢ = exp(−lossᵢ)` and `c` = [`Self::loss_scale`].
/// Like the embedding gradient (and the published implementation's), they ignore the loss's
/// clamp at `p = 10⁻³⁰`: a row below it reports a loss of 69.08 and the gradient of `p − 1 = −1`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowResults {
    /// Each row's cross-entropy `−log p(target)`, before any loss weight.
    pub loss: Vec<f32>,
    /// Each row's target cosine, clamped to [−1, 1] as the margin sees it.
    pub target_cos: Vec<f32>,
    /// `d L / d m2ᵢ`: the gradient of the pass's loss (as the embedding gradient sees it:
    /// weights and [`crate::PartialFc::set_grad_scale`] included) with respect to the row's
    /// angular margin. 0 where the angle is held at 0. A target cosine the GEMM put past ±1 is
    /// clamped before the margin applies, so the clamp stops its gradient to the cosine, not
    /// to the margin: such a row (a well-fit one, in f32) has its full margin gradient.
    pub grad_angular_margin: Vec<f32>,
    /// `d L / d m3ᵢ`: the same with respect to the row's cosine margin (`−s · d L / d zᵢ`).
    pub grad_additive_margin: Vec<f32>,
    /// `d L / d lossᵢ` of a row of weight 1: the gradient scale over the real rows of the
    /// gathered batch (the loss is their mean). A term a caller adds per row (MagFace's
    /// regularizer) takes this factor to be on the same footing as the layer's gradients.
    pub loss_scale: f32,
    /// The real rows of the gathered batch, over all ranks: the loss is their mean.
    pub gathered_rows: usize,
}

/// The per-row inputs of [`row_results`]: this rank's rows, in `labels` order.
pub(super) struct RowInputs<'a> {
    /// The all-reduced losses and raw target cosines of this rank's rows.
    pub loss: &'a [f32],
    pub target_cos: &'a [f32],
    pub labels: &'a [i64],
    /// The rows' margin table ([`ROW_MARGIN_FLOATS`] per row), or `None` for the layer's.
    pub table: Option<&'a [f32]>,
    pub weights: Option<&'a [f32]>,
}

pub(super) fn row_results(
    rows: RowInputs<'_>,
    margin: &MarginParams,
    loss_scale: f32,
    gathered_rows: usize,
) -> RowResults {
    let len = rows.labels.len();
    let mut out = RowResults {
        loss: vec![0.0; len],
        target_cos: vec![0.0; len],
        grad_angular_margin: vec![0.0; len],
        grad_additive_margin: vec![0.0; len],
        loss_scale,
        gathered_rows,
    };
    for i in 0..len {
        if rows.labels[i] < 0 {
            continue; // a padding row (no caller passes one): no target, nothing to derive
        }
        let p = margin.for_row(rows.table.map(|t| &t[..len * ROW_MARGIN_FLOATS]), i);
        let (loss, raw) = (rows.loss[i], rows.target_cos[i]);
        let c = raw.clamp(-1.0, 1.0);
        let weight = rows.weights.map_or(1.0, |w| f64::from(w[i]));
        // d L / d z (z the target logit): (p − 1) times the row's weight and the scale; p − 1
        // from the loss with expm1, exact near p = 1 where 1 − p is what matters.
        let dz = f64::from(loss_scale) * weight * (-f64::from(loss)).exp_m1();
        let s = f64::from(p.scale);
        out.loss[i] = loss;
        out.target_cos[i] = c;
        out.grad_additive_margin[i] = (-s * dz) as f32;
        // At the clamped cosine: the margin applies after the clamp (cos(m1·acos(clamp(c)) +
        // m2)), so a clipped cosine still passes its gradient to m2 (a review found 0 here).
        out.grad_angular_margin[i] = (s * dz * target_logit_angular_slope(c, &p)) as f32;
    }
    out
}

/// `d f / d m2` of the target logit `f = cos(max(m1·θ + m2, 0)) − m3` (or the monotonic
/// fallback `c − m2·sin(π − m2) − m3` at and below its threshold) at the clamped cosine `c`,
/// as the kernels' `target_logit` branches. In f64: a derivative, not a replay of their bits.
pub(crate) fn target_logit_angular_slope(c: f32, p: &MarginParams) -> f64 {
    let m2 = f64::from(p.m2);
    if p.fallback && c <= p.fallback_cos {
        // d/dm2 [m2·sin(π − m2)] = sin m2 + m2·cos m2
        return -(m2.sin() + m2 * m2.cos());
    }
    let angle = f64::from(p.m1) * f64::from(c).acos() + m2;
    if angle < 0.0 {
        0.0 // held at 0 (the kernels' margin_angle): flat in m2
    } else {
        -angle.sin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Margin, TargetFallback};

    #[test]
    fn angular_slope_matches_a_central_difference_in_each_branch() {
        let mut m = Margin::combined(64.0, 1.0, 0.5, 0.0);
        m.fallback = TargetFallback::Monotonic;
        let f = |c: f32, m2: f64| {
            let p = Margin { m2, ..m }.params();
            f64::from(crate::cpu::margin_softmax::target_logit(c, &p))
        };
        // Inside (c = 0.3), in the fallback (c = −0.95, θ past π − m2), held at 0 (m2 < 0).
        for (c, m2) in [(0.3f32, 0.5), (-0.95, 0.5), (0.999, -0.2), (0.6, -0.3)] {
            let p = Margin { m2, ..m }.params();
            let h = 1e-3;
            let numeric = (f(c, m2 + h) - f(c, m2 - h)) / (2.0 * h);
            let analytic = target_logit_angular_slope(c, &p);
            assert!(
                (numeric - analytic).abs() < 2e-3,
                "c {c} m2 {m2}: numeric {numeric} analytic {analytic}"
            );
        }
    }

    /// A review: a target cosine the GEMM put just past 1 reported no margin gradient, though
    /// the margin applies after the clamp; it must equal the one at exactly 1.
    #[test]
    fn a_clipped_target_cosine_keeps_its_margin_gradient() {
        let p = Margin::arcface().params();
        let past_one = f32::from_bits(1.0f32.to_bits() + 1);
        let results = |c: &[f32]| {
            let rows = RowInputs {
                loss: &[2.0],
                target_cos: c,
                labels: &[0],
                table: None,
                weights: None,
            };
            row_results(rows, &p, 1.0, 1)
        };
        let (at_one, clipped) = (results(&[1.0]), results(&[past_one]));
        assert!(at_one.grad_angular_margin[0] > 0.0);
        assert_eq!(clipped, at_one);
    }

    #[test]
    fn a_padding_row_gets_zeros_and_a_confident_row_a_small_gradient() {
        let p = Margin::arcface().params();
        let rows = RowInputs {
            loss: &[0.0, 1e-6],
            target_cos: &[0.0, 0.8],
            labels: &[-1, 3],
            table: None,
            weights: None,
        };
        let r = row_results(rows, &p, 0.5, 2);
        assert_eq!(r.grad_angular_margin[0], 0.0);
        assert_eq!(r.grad_additive_margin[0], 0.0);
        // p − 1 = expm1(−1e-6) ≈ −1e-6: d L/d m3 = −s·0.5·(−1e-6) = 3.2e-5.
        let want = 64.0 * 0.5 * 1e-6;
        assert!((f64::from(r.grad_additive_margin[1]) - want).abs() < 1e-9);
        assert!(
            r.grad_angular_margin[1] > 0.0,
            "a larger margin raises the loss"
        );
    }
}
