//! Margins that change per row, for [`PassOptions`]: ElasticFace's random margins
//! ([`elastic_margins`]) and AdaFace's norm-adaptive ones ([`AdaFace`]). The formulas are the
//! papers'; the layer applies the result on each row's target logit
//! ([`PartialFc::forward_backward_with`](crate::PartialFc::forward_backward_with)).

use crate::error::{PfcError, Result};
use crate::layer::{PassOptions, ROW_ADDITIVE_MARGIN, ROW_ANGULAR_MARGIN};
use crate::rng::philox4x32_10;

/// ElasticFace's margins (Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face
/// Recognition", CVPRW 2022): one margin per row drawn from N(mean, std²) each step, used as
/// the angular margin (ElasticFace-Arc: mean 0.5, std 0.05 in the paper) or the cosine margin
/// (ElasticFace-Cos: mean 0.35, std 0.05).
///
/// Keyed by `(seed, step, first_row + i)`, so each step draws afresh, a rank that passes its
/// first global row (`rank · batch_per_rank`) draws other margins than its peers, and a rerun
/// draws the same. For `step`, the layer's pass counter [`PartialFc::steps`](crate::PartialFc::steps)
/// serves: it counts every pass (each micro-batch of an accumulated step draws afresh) and a
/// checkpoint restores it, so a resumed run draws what the uninterrupted one would have. Each
/// value is held inside the bounds [`PassOptions`] accepts for `kind` (a draw 30 standard
/// deviations out never reaches them with the paper's settings).
///
/// ```
/// use partial_fc::{elastic_margins, MarginKind};
/// let m = elastic_margins(MarginKind::Angular, 0.5, 0.05, 7, 0, 0, 4096).unwrap();
/// let mean = m.iter().map(|&v| f64::from(v)).sum::<f64>() / 4096.0;
/// assert!((mean - 0.5).abs() < 0.005);
/// let next_step = elastic_margins(MarginKind::Angular, 0.5, 0.05, 7, 1, 0, 4096).unwrap();
/// assert_ne!(m, next_step);
/// ```
///
/// # Errors
///
/// [`PfcError::Param`] for a mean outside `kind`'s bounds ((−π/2, π/2) for `Angular`, (−1, 1)
/// for `Additive`) or a standard deviation that is not finite and >= 0.
pub fn elastic_margins(
    kind: MarginKind,
    mean: f64,
    std: f64,
    seed: u64,
    step: u64,
    first_row: u64,
    rows: usize,
) -> Result<Vec<f32>> {
    let (lo, hi) = kind.bounds();
    if !(mean > lo && mean < hi) {
        return Err(PfcError::param(
            "elastic_margins mean",
            mean,
            format!("must lie in ({lo:.4}, {hi:.4})"),
        ));
    }
    if !(std.is_finite() && std >= 0.0) {
        return Err(PfcError::param(
            "elastic_margins std",
            std,
            "must be finite and >= 0",
        ));
    }
    // One ulp inside the open interval, in f32.
    let (lo, hi) = (next_up(lo as f32), next_down(hi as f32));
    Ok((0..rows as u64)
        .map(|i| {
            let row = first_row.wrapping_add(i);
            let bits = philox4x32_10(
                [row as u32, (row >> 32) as u32, step as u32, 0xe1a5],
                [
                    (seed ^ step.rotate_left(32)) as u32,
                    ((seed >> 32) ^ (step >> 32)) as u32,
                ],
            );
            // Box–Muller from two uniforms, u1 in (0, 1].
            let u1 = (f64::from(bits[0]) + 1.0) / 4_294_967_296.0;
            let u2 = f64::from(bits[1]) / 4_294_967_296.0;
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            ((mean + std * z) as f32).clamp(lo, hi)
        })
        .collect())
}

fn next_up(v: f32) -> f32 {
    if v >= 0.0 {
        f32::from_bits(v.to_bits() + 1)
    } else {
        f32::from_bits(v.to_bits() - 1)
    }
}

fn next_down(v: f32) -> f32 {
    -next_up(-v)
}

/// Which margin of the combined margin a per-row value replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarginKind {
    /// The additive angular margin m2 (ArcFace): `cos(m1·θ + m2)`.
    Angular,
    /// The additive cosine margin m3 (CosFace): `cos(…) − m3`.
    Additive,
}

impl MarginKind {
    fn bounds(self) -> (f64, f64) {
        match self {
            MarginKind::Angular => ROW_ANGULAR_MARGIN,
            MarginKind::Additive => ROW_ADDITIVE_MARGIN,
        }
    }
}

/// AdaFace's margins (Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition",
/// CVPR 2022): the embedding's norm, before normalization, stands for image quality, and each
/// row's margin moves with it. With `ĝ = clip(h·(‖z‖ − μ) / (σ + 10⁻³), −1, 1)`, where μ and σ
/// are running (EMA) statistics of the batches' norms, the target logit is
/// `s·(cos(θ − m·ĝ) − (m + m·ĝ))`: a high-norm (good) row gets a larger angular margin, a
/// low-norm (poor) one a smaller margin and more of it as a cosine offset. Use it with a layer
/// margin of `Margin::combined(64.0, 1.0, 0.0, 0.0)` (the paper: s = 64, m = 0.4, h = 0.333);
/// this type supplies m2ᵢ = −m·ĝᵢ and m3ᵢ = m + m·ĝᵢ per row.
///
/// Norms are clipped to [10⁻³, 100] and carry no gradient, as in the paper. Each rank keeps its
/// own statistics over its own rows (the paper's code computes them from each GPU's own batch;
/// under PyTorch's DDP, which broadcasts buffers from rank 0 by default, its ranks would share
/// rank 0's). μ and σ
/// start at 20 and 100 and follow each batch's mean and (unbiased) standard deviation with
/// weight `t_alpha` = 0.01, once per call of [`update`](Self::update) (once per micro-batch under
/// gradient accumulation, as the paper's code updates them once per forward); they are public
/// fields, which a checkpoint keeps through
/// [`PartialFc::save_with_metadata`](crate::PartialFc::save_with_metadata) (`format!("{} {}",
/// batch_mean, batch_std)` round-trips exactly: Rust prints the shortest text that reads back as
/// the same f64) and [`checkpoint::user_metadata`](crate::checkpoint::user_metadata).
///
/// Two steps, so that a refused pass leaves the statistics as they were:
/// [`margins`](Self::margins) computes the batch's margins from the statistics this batch would
/// give, without changing `self`; [`update`](Self::update) keeps those statistics once the pass
/// has run.
///
/// Both of the row's margins replace the layer's m2 and m3, so the layer's own m2 and m3 do not
/// change the result; its scale, m1, gradient mode, fallback and filter do. The paper's code
/// differentiates through the margin (`GradMode::Exact` here; the default, `StraightThrough`,
/// is PartialFC_V2's for ArcFace) and clips the angle to [ε, π − ε], where here an angle below
/// 0 is held at 0 and the layer's `TargetFallback` decides past π: with `None` the logit of a
/// row whose θ − m·ĝ passes π folds back up (as PartialFC_V2's ArcFace does), `Monotonic` keeps
/// it falling. Neither is the paper's flat −1 there; such rows (positive cosine below
/// −cos(m·ĝ)) are rare once training starts.
///
/// ```
/// use partial_fc::{collective::SingleRank, AdaFace, CpuBackend, LayerConfig, Margin, PartialFc};
/// let mut cfg = LayerConfig::new(1000, 16, 4);
/// cfg.margin = Margin::combined(64.0, 1.0, 0.0, 0.0); // what the checkpoint records as the base
/// let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
/// let mut adaface = AdaFace::new();
/// let x: Vec<f32> = (0..4 * 16).map(|i| ((i * 7 % 13) as f32 - 6.0) / 2.0).collect();
/// let margins = adaface.margins(&x, 16).unwrap();
/// let out = layer.forward_backward_with(&x, &[1, 2, 3, 4], margins.options()).unwrap();
/// adaface.update(&margins); // the pass ran: keep this batch in the statistics
/// assert!(out.loss.is_finite() && adaface.batch_mean != AdaFace::new().batch_mean);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaFace {
    /// The margin m (0.4 in the paper).
    pub m: f64,
    /// The concentration h of ĝ (0.333: about 99% of the rows have |ĝ| < 1).
    pub h: f64,
    /// Weight of each batch in the running statistics (0.01).
    pub t_alpha: f64,
    /// Running mean μ of the norms.
    pub batch_mean: f64,
    /// Running standard deviation σ of the norms.
    pub batch_std: f64,
}

impl Default for AdaFace {
    fn default() -> Self {
        AdaFace::new()
    }
}

/// One batch's AdaFace margins, per row of this rank, and the statistics they were computed
/// with ([`AdaFace::margins`]; [`AdaFace::update`] keeps them).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaFaceMargins {
    /// m2ᵢ = −m·ĝᵢ.
    pub angular: Vec<f32>,
    /// m3ᵢ = m + m·ĝᵢ.
    pub additive: Vec<f32>,
    /// The running mean and standard deviation of the norms with this batch in them.
    pub statistics: (f64, f64),
}

impl AdaFaceMargins {
    /// The pass options that apply them (add weights or accumulation to the result as needed).
    pub fn options(&self) -> PassOptions<'_> {
        PassOptions::new()
            .angular_margins(&self.angular)
            .additive_margins(&self.additive)
    }
}

impl AdaFace {
    /// The paper's settings: m = 0.4, h = 0.333, t_alpha = 0.01, μ = 20, σ = 100 at the start.
    pub fn new() -> Self {
        AdaFace {
            m: 0.4,
            h: 0.333,
            t_alpha: 0.01,
            batch_mean: 20.0,
            batch_std: 100.0,
        }
    }

    /// Each row's margins, from the running statistics with this batch's norms in them (which
    /// the result carries; `self` is unchanged: [`update`](Self::update) keeps them).
    /// `embeddings`: this rank's rows, un-normalized, row-major with `dim` columns (what the
    /// layer's pass takes). A batch of one row moves the mean only (its standard deviation is
    /// undefined); an empty one, neither.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] for a length that is not a multiple of `dim` (or `dim` = 0),
    /// [`PfcError::NonFinite`] for a row with a NaN or infinite value (as the layer's pass
    /// reports it), [`PfcError::Param`] for a row whose norm is past f64's range, or for `m`,
    /// `h`, `t_alpha` or the statistics outside their ranges (m in [0, 0.5), h > 0, t_alpha in
    /// [0, 1], finite statistics, σ >= 0).
    pub fn margins(&self, embeddings: &[f32], dim: usize) -> Result<AdaFaceMargins> {
        self.validate()?;
        let norms: Vec<f64> = row_norms("AdaFace", embeddings, dim)?
            .into_iter()
            .map(|a| a.clamp(1e-3, 100.0))
            .collect();
        let (mut mean, mut std) = (self.batch_mean, self.batch_std);
        if let Some((batch_mean, batch_std)) = mean_std(&norms) {
            let a = self.t_alpha;
            mean = batch_mean * a + (1.0 - a) * mean;
            if let Some(batch_std) = batch_std {
                std = batch_std * a + (1.0 - a) * std;
            }
        }
        let (mut angular, mut additive) = (Vec::new(), Vec::new());
        for &norm in &norms {
            let g = (self.h * (norm - mean) / (std + 1e-3)).clamp(-1.0, 1.0);
            angular.push((-self.m * g) as f32);
            // m < 0.5, but m + m·ĝ may round to 1.0 in f32 just below it: held inside (−1, 1).
            additive.push(((self.m + self.m * g) as f32).min(next_down(1.0)));
        }
        Ok(AdaFaceMargins {
            angular,
            additive,
            statistics: (mean, std),
        })
    }

    /// Keeps the statistics a batch's [`margins`](Self::margins) were computed with: call it
    /// once the pass that used them has run.
    pub fn update(&mut self, margins: &AdaFaceMargins) {
        (self.batch_mean, self.batch_std) = margins.statistics;
    }

    fn validate(&self) -> Result<()> {
        // m + m·ĝ reaches 2m, which must stay inside the cosine margin's (−1, 1).
        if !(self.m >= 0.0 && self.m < 0.5) {
            return Err(PfcError::param(
                "AdaFace.m",
                self.m,
                "must lie in [0, 0.5) (its cosine margin m + m·ĝ reaches 2m, below 1)",
            ));
        }
        if !(self.h > 0.0 && self.h.is_finite()) {
            return Err(PfcError::param(
                "AdaFace.h",
                self.h,
                "must be finite and > 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.t_alpha) {
            return Err(PfcError::param(
                "AdaFace.t_alpha",
                self.t_alpha,
                "must lie in [0, 1]",
            ));
        }
        if !(self.batch_mean.is_finite() && self.batch_std.is_finite() && self.batch_std >= 0.0) {
            return Err(PfcError::param(
                "AdaFace.batch_mean, batch_std",
                format!("mean {}, std {}", self.batch_mean, self.batch_std),
                "the running statistics must be finite, the std >= 0",
            ));
        }
        Ok(())
    }
}

/// The L2 norm of each row of `embeddings` (`dim` columns), in f64, for a margin that follows
/// it (AdaFace, MagFace; `who` names it in errors).
///
/// # Errors
///
/// [`PfcError::Shape`] for a length that is not a multiple of `dim` (or `dim` = 0),
/// [`PfcError::NonFinite`] for a row with a NaN or infinite value (as the layer's pass reports
/// it), [`PfcError::Param`] for a row whose norm is past f64's range.
pub(crate) fn row_norms(who: &str, embeddings: &[f32], dim: usize) -> Result<Vec<f64>> {
    if dim == 0 || !embeddings.len().is_multiple_of(dim) {
        return Err(PfcError::Shape(format!(
            "{who}: {} values are not rows of dim {dim}",
            embeddings.len()
        )));
    }
    let mut norms = Vec::with_capacity(embeddings.len() / dim);
    for (row, x) in embeddings.chunks_exact(dim).enumerate() {
        if let Some(&value) = x.iter().find(|v| !v.is_finite()) {
            return Err(PfcError::NonFinite { row, value });
        }
        let sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        if !sq.is_finite() {
            return Err(PfcError::param(
                "embeddings",
                format!("row {row}"),
                format!("{who}: the row's norm is past f64's range"),
            ));
        }
        norms.push(sq.sqrt());
    }
    Ok(norms)
}

/// Mean, and unbiased standard deviation when there are two values or more (torch's `std`).
fn mean_std(v: &[f64]) -> Option<(f64, Option<f64>)> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.len() > 1)
        .then(|| (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt());
    Some((mean, std))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaface_margins_follow_the_paper_formula() {
        let mut a = AdaFace::new();
        // Two rows of norms 10 and 30 (dim 1).
        let m = a.margins(&[10.0, -30.0], 1).unwrap();
        assert_eq!(a, AdaFace::new(), "margins leaves the statistics");
        a.update(&m);
        let mean = 20.0 * 0.01 + 0.99 * 20.0;
        let std = (200.0f64).sqrt() * 0.01 + 0.99 * 100.0;
        for (i, norm) in [10.0, 30.0].into_iter().enumerate() {
            let g = (0.333 * (norm - mean) / (std + 1e-3)).clamp(-1.0, 1.0);
            assert_eq!(m.angular[i], (-0.4 * g) as f32);
            assert_eq!(m.additive[i], (0.4 + 0.4 * g) as f32);
        }
        assert_eq!((a.batch_mean, a.batch_std), (mean, std));
        // The higher-norm row gets the larger angular margin (m2 = −m·ĝ is smaller: θ − m·ĝ).
        assert!(m.angular[1] < m.angular[0]);
    }

    #[test]
    fn adaface_refuses_nonfinite_rows_without_moving_its_statistics() {
        let mut a = AdaFace::new();
        assert!(matches!(
            a.margins(&[1.0, f32::NAN, 2.0, 3.0], 2),
            Err(PfcError::NonFinite { row: 0, .. })
        ));
        assert!(a.margins(&[1.0, 2.0, 3.0], 2).is_err());
        assert_eq!(a, AdaFace::new());
        let one = a.margins(&[3.0, 4.0], 2).unwrap();
        a.update(&one);
        assert_eq!(one.angular.len(), 1);
        assert_eq!(a.batch_std, 100.0); // one row: the std is undefined, kept
        assert_ne!(a.batch_mean, 20.0);
        assert!(AdaFace {
            m: 0.8,
            ..AdaFace::new()
        }
        .margins(&[1.0], 1)
        .is_err());
    }

    #[test]
    fn elastic_margins_are_normal_per_row_and_step_and_stay_in_bounds() {
        let m = elastic_margins(MarginKind::Additive, 0.35, 0.05, 3, 10, 0, 20_000).unwrap();
        let n = m.len() as f64;
        let mean = m.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = m
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        assert!((mean - 0.35).abs() < 0.002, "{mean}");
        assert!((var.sqrt() - 0.05).abs() < 0.002, "{}", var.sqrt());
        // Rows 100.. of one call are rows 0.. of a call that starts there (another rank's).
        let rest = elastic_margins(MarginKind::Additive, 0.35, 0.05, 3, 10, 100, 50).unwrap();
        assert_eq!(rest[..], m[100..150]);
        let wild = elastic_margins(MarginKind::Angular, 0.0, 100.0, 3, 10, 0, 1000).unwrap();
        let half_pi = std::f64::consts::FRAC_PI_2;
        assert!(wild
            .iter()
            .all(|&v| f64::from(v) > -half_pi && f64::from(v) < half_pi));
        assert!(wild.iter().any(|&v| v > 1.57));
        for (mean, std) in [(f64::NAN, 0.1), (1.6, 0.1), (0.5, f64::NAN), (0.5, -0.1)] {
            let e = elastic_margins(MarginKind::Angular, mean, std, 3, 10, 0, 3).unwrap_err();
            assert!(matches!(e, PfcError::Param { .. }), "{e}");
        }
        assert!(elastic_margins(MarginKind::Additive, 0.5, f64::INFINITY, 3, 10, 0, 3).is_err());
    }
}
