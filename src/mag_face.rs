//! MagFace's margin and regularizer on the embedding's norm (Meng et al., "MagFace: A Universal
//! Representation for Face Recognition and Quality Assessment", CVPR 2021). The formulas are the
//! paper's; the layer applies the margin per row ([`crate::PassOptions`]) and reports each row's
//! margin gradient ([`crate::RowResults`]), from which [`MagFace::backward`] takes the chain rule
//! back to the norm.

use crate::error::{PfcError, Result};
use crate::layer::{PassOptions, RowResults};
use crate::row_margins::row_norms;

/// MagFace: each row's angular margin grows with its embedding's norm `a = ‖z‖`,
/// `m(a) = l_m + (u_m − l_m)·(a − l_a)/(u_a − l_a)`, and a regularizer
/// `λ·g(a)`, `g(a) = a/u_a² + 1/a`, added to each row's loss pulls the norm up, so that at the
/// optimum an easy (high-quality) face gets a large norm and a hard one a small norm: the norm
/// becomes a quality score. The norm is clamped to `[l_a, u_a]` for both, and past the clamp
/// neither passes a gradient (torch's clamp backward, as in the paper's code).
///
/// Unlike AdaFace's, the margin is differentiated: the paper's analysis (a unique optimal norm
/// per sample) needs the margin's gradient with respect to the norm, which the layer cannot see
/// (it takes per-row margins as constants). So a MagFace step is: [`margins`](Self::margins)
/// from the un-normalized embeddings; the layer's pass with them ([`MagFaceMargins::options`]);
/// then [`backward`](Self::backward), which adds `dL/da · z/a` to the pass's embedding gradient,
/// with `dL/da = (dL/dm)·m'(a) + λ·c·g'(a)` from the pass's
/// [`RowResults::grad_angular_margin`] and its loss scale `c`. The regularizer is averaged over
/// the gathered batch like the loss (and weighed by the layer's gradient scale), so the paper's
/// λ keeps its meaning for any number of ranks.
///
/// The paper trains with s = 64 and differentiates through the margin: a layer
/// `Margin::arcface()` (s = 64) with `grad_mode = GradMode::Exact` (its own m2 is replaced per
/// row). The official code applies the margin with ArcFace's "easy margin" (the target logit is
/// plain cos θ where cos θ <= 0), which this crate does not have; `TargetFallback::None` (the
/// published PartialFC_V2's) or `Monotonic` (a logit that keeps falling past θ + m = π) are the
/// choices here, and they differ from it only on rows whose target cosine is negative, rare once
/// training starts. Defaults: the paper's l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ = 35.
///
/// ```
/// use partial_fc::{collective::SingleRank, CpuBackend, LayerConfig, MagFace, PartialFc};
/// let mut layer = PartialFc::new(LayerConfig::new(1000, 16, 4), CpuBackend, SingleRank).unwrap();
/// let magface = MagFace::default();
/// let x: Vec<f32> = (0..4 * 16).map(|i| ((i * 7 % 13) as f32 - 6.0) * 4.0).collect();
/// let margins = magface.margins(&x, 16).unwrap();
/// let mut out = layer.forward_backward_with(&x, &[1, 2, 3, 4], margins.options()).unwrap();
/// let regularizer = magface.backward(&x, 16, &out.rows, &mut out.grad_embeddings).unwrap();
/// assert!(regularizer > 0.0); // this rank's share of λ·mean g(a), to log beside out.loss
/// layer.step(0.1).unwrap();
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MagFace {
    /// l_a: the norm at which the margin is `lower_margin` (and below which it stays so).
    pub lower_norm: f64,
    /// u_a: the norm at which the margin is `upper_margin`.
    pub upper_norm: f64,
    /// l_m.
    pub lower_margin: f64,
    /// u_m.
    pub upper_margin: f64,
    /// λ_g: the regularizer's weight.
    pub lambda: f64,
}

impl Default for MagFace {
    fn default() -> Self {
        MagFace {
            lower_norm: 10.0,
            upper_norm: 110.0,
            lower_margin: 0.45,
            upper_margin: 0.8,
            lambda: 35.0,
        }
    }
}

/// One batch's MagFace margins, per row of this rank ([`MagFace::margins`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MagFaceMargins {
    /// m(aᵢ), the angular margin m2ᵢ of each row.
    pub angular: Vec<f32>,
}

impl MagFaceMargins {
    /// The pass options that apply them (add weights or accumulation to the result as needed).
    pub fn options(&self) -> PassOptions<'_> {
        PassOptions::new().angular_margins(&self.angular)
    }
}

impl MagFace {
    /// Each row's margin m(aᵢ), `aᵢ` the norm of row i of `embeddings` (this rank's rows,
    /// un-normalized, `dim` columns: what the layer's pass takes) clamped to `[l_a, u_a]`.
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] for settings outside their ranges (`0 < l_a < u_a`, finite;
    /// `0 <= l_m <= u_m < π/2`; `λ >= 0`, finite) or a row whose norm is past f64's range;
    /// [`PfcError::Shape`] for a length that is not a multiple of `dim` (or `dim` = 0);
    /// [`PfcError::NonFinite`] for a row with a NaN or infinite value.
    pub fn margins(&self, embeddings: &[f32], dim: usize) -> Result<MagFaceMargins> {
        self.validate()?;
        let angular = row_norms("MagFace", embeddings, dim)?
            .into_iter()
            .map(|a| self.margin(self.clamp(a)) as f32)
            .collect();
        Ok(MagFaceMargins { angular })
    }

    /// Adds the norm's gradient to `grad` (the pass's `grad_embeddings` for the same rows):
    /// `(dL/dmᵢ·m'(aᵢ) + λ·c·g'(aᵢ)) · zᵢ/aᵢ` for each row whose norm lies in `[l_a, u_a]`,
    /// with `dL/dmᵢ` and `c` from the pass's `rows`. Returns this rank's share of the
    /// regularizer term, `λ/R · Σᵢ g(aᵢ)` over its rows (R the gathered batch's rows): the ranks'
    /// shares sum to the term, which adds to the pass's `loss` (unweighted by the gradient
    /// scale, as `loss` is).
    ///
    /// `embeddings` must be the ones the margins were computed from and the pass took.
    ///
    /// # Errors
    ///
    /// Those of [`margins`](Self::margins), and [`PfcError::Shape`] when `rows` or `grad` do not
    /// match the embeddings' rows. Nothing is added on an error.
    pub fn backward(
        &self,
        embeddings: &[f32],
        dim: usize,
        rows: &RowResults,
        grad: &mut [f32],
    ) -> Result<f64> {
        self.validate()?;
        let norms = row_norms("MagFace", embeddings, dim)?;
        if rows.grad_angular_margin.len() != norms.len() || grad.len() != embeddings.len() {
            return Err(PfcError::Shape(format!(
                "MagFace: {} rows of embeddings, but the pass's results have {} rows and the \
                 gradient {} values ({} expected)",
                norms.len(),
                rows.grad_angular_margin.len(),
                grad.len(),
                embeddings.len()
            )));
        }
        let (l_a, u_a) = (self.lower_norm, self.upper_norm);
        let slope = (self.upper_margin - self.lower_margin) / (u_a - l_a);
        let c = f64::from(rows.loss_scale);
        let mut regularizer = 0.0;
        for (i, &a) in norms.iter().enumerate() {
            let clamped = self.clamp(a);
            regularizer += clamped / (u_a * u_a) + 1.0 / clamped;
            if !(l_a..=u_a).contains(&a) {
                continue; // the clamp passes no gradient
            }
            let g_slope = 1.0 / (u_a * u_a) - 1.0 / (a * a);
            let d_norm = f64::from(rows.grad_angular_margin[i]) * slope + self.lambda * c * g_slope;
            let row = i * dim..(i + 1) * dim;
            for (g, &z) in grad[row.clone()].iter_mut().zip(&embeddings[row]) {
                *g = (f64::from(*g) + d_norm * f64::from(z) / a) as f32;
            }
        }
        Ok(self.lambda * regularizer / rows.gathered_rows.max(1) as f64)
    }

    /// The least λ for which the regularizer's pull at `l_a` outweighs the margin's largest
    /// push there, at scale `s`: `s·m'·l_a²·u_a²/(u_a² − l_a²)·f`, `m'` the margin's slope
    /// `(u_m − l_m)/(u_a − l_a)`. The margin's gradient in the norm is at most `s·m'·f` per row
    /// (weight 1, `1 − p ≤ 1`; `|d z/d m| ≤ s·f` with `f = max(1, sin l_m + l_m·cos l_m)`, the
    /// monotonic fallback's slope at the margin `l_m` a row has at `l_a`, above 1 only for
    /// `l_m > 0.556`), the regularizer's `λ·(1/a² − 1/u_a²)`, smallest inside the range at `u_a`
    /// and largest at `l_a`; below this λ the margin can push a row's norm out through `l_a`,
    /// where the clamp stops both gradients and the norm says nothing. The paper's settings give
    /// 22.6 against its λ = 35; the official code computes the same bound (without `f`) and
    /// warns below it.
    ///
    /// ```
    /// let need = partial_fc::MagFace::default().min_lambda(64.0);
    /// assert!((need - 22.58).abs() < 0.01);
    /// ```
    pub fn min_lambda(&self, scale: f64) -> f64 {
        let (l, u) = (self.lower_norm, self.upper_norm);
        let slope = (self.upper_margin - self.lower_margin) / (u - l);
        let m = self.lower_margin;
        let fallback = (m.sin() + m * m.cos()).max(1.0);
        scale * slope * l * l * u * u / (u * u - l * l) * fallback
    }

    fn clamp(&self, a: f64) -> f64 {
        a.clamp(self.lower_norm, self.upper_norm)
    }

    fn margin(&self, a: f64) -> f64 {
        let t = (a - self.lower_norm) / (self.upper_norm - self.lower_norm);
        self.lower_margin + (self.upper_margin - self.lower_margin) * t
    }

    fn validate(&self) -> Result<()> {
        let (l_a, u_a) = (self.lower_norm, self.upper_norm);
        if !(l_a > 0.0 && u_a > l_a && u_a.is_finite()) {
            return Err(PfcError::param(
                "MagFace.lower_norm, upper_norm",
                format!("{l_a}, {u_a}"),
                "must be finite with 0 < lower_norm < upper_norm",
            ));
        }
        let (l_m, u_m) = (self.lower_margin, self.upper_margin);
        if !(l_m >= 0.0 && u_m >= l_m && u_m < std::f64::consts::FRAC_PI_2) {
            return Err(PfcError::param(
                "MagFace.lower_margin, upper_margin",
                format!("{l_m}, {u_m}"),
                "must satisfy 0 <= lower_margin <= upper_margin < π/2 (an angular margin that \
                 grows with the norm)",
            ));
        }
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return Err(PfcError::param(
                "MagFace.lambda",
                self.lambda,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_linear_in_the_clamped_norm() {
        let f = MagFace::default();
        // Rows of dim 2 with norms 5, 10, 60, 110, 200.
        let x = [3.0, 4.0, 6.0, 8.0, 36.0, 48.0, 66.0, 88.0, 120.0, 160.0];
        let m = f.margins(&x, 2).unwrap().angular;
        let want = [0.45, 0.45, 0.625, 0.8, 0.8];
        for (got, want) in m.iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{m:?}");
        }
    }

    #[test]
    fn backward_moves_only_rows_inside_the_clamp_and_along_the_row() {
        let f = MagFace::default();
        let x = [3.0, 4.0, 36.0, 48.0];
        let rows = RowResults {
            loss: vec![1.0; 2],
            target_cos: vec![0.5; 2],
            grad_angular_margin: vec![0.2, 0.2],
            grad_additive_margin: vec![0.0; 2],
            loss_scale: 0.5,
            gathered_rows: 2,
        };
        let mut grad = vec![0.0f32; 4];
        let reg = f.backward(&x, 2, &rows, &mut grad).unwrap();
        assert_eq!(&grad[..2], &[0.0, 0.0], "norm 5 is below l_a: no gradient");
        // a = 60: 0.2·0.0035 + 35·0.5·(1/110² − 1/60²), along (0.6, 0.8).
        let d = 0.2 * 0.35 / 100.0 + 35.0 * 0.5 * (1.0 / 12100.0 - 1.0 / 3600.0);
        assert!((f64::from(grad[2]) - d * 0.6).abs() < 1e-6, "{grad:?}");
        assert!((f64::from(grad[3]) - d * 0.8).abs() < 1e-6, "{grad:?}");
        let g = |a: f64| a / 12100.0 + 1.0 / a;
        assert!((reg - 35.0 * (g(10.0) + g(60.0)) / 2.0).abs() < 1e-9);
    }

    /// A review: the monotonic fallback's slope in the margin, sin m + m·cos m, passes 1 for
    /// m > 0.556, so with a lower margin past that the bound must grow by it.
    #[test]
    fn min_lambda_covers_the_fallbacks_steeper_slope() {
        let paper = MagFace::default().min_lambda(64.0);
        let steep = MagFace {
            lower_margin: 0.8,
            upper_margin: 1.0,
            ..MagFace::default()
        };
        let plain = 64.0 * (0.2 / 100.0) * 100.0 * 12100.0 / 12000.0;
        let factor = 0.8f64.sin() + 0.8 * 0.8f64.cos();
        assert!(factor > 1.2);
        assert!((steep.min_lambda(64.0) - plain * factor).abs() < 1e-9);
        assert!(
            (paper - 22.58).abs() < 0.01,
            "the paper's settings are below 0.556: {paper}"
        );
    }

    #[test]
    fn bad_settings_and_mismatched_rows_are_refused_before_anything_changes() {
        let x = [3.0, 4.0];
        let bad = MagFace {
            upper_margin: 2.0,
            ..MagFace::default()
        };
        assert!(matches!(bad.margins(&x, 2), Err(PfcError::Param { .. })));
        let rows = RowResults::default();
        let mut grad = vec![1.0f32; 2];
        let err = MagFace::default().backward(&x, 2, &rows, &mut grad);
        assert!(matches!(err, Err(PfcError::Shape(_))));
        assert_eq!(grad, [1.0, 1.0]);
    }
}
