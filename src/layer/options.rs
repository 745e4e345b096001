//! `PassOptions`: what a forward/backward pass takes per row besides the embeddings and labels
//! (loss weights, margins), and whether it accumulates; and their checks.

use crate::config::{Margin, ROW_MARGIN_FLOATS};
use crate::error::PfcError;
use std::f64::consts::FRAC_PI_2;

/// Options of one forward/backward pass
/// ([`PartialFc::forward_backward_with`](crate::PartialFc::forward_backward_with)): gradient
/// accumulation, a loss weight per row, and margins per row. The default is a plain
/// [`forward_backward`](crate::PartialFc::forward_backward).
///
/// Per-row margins replace the layer's m2 (additive angular, ArcFace) or m3 (additive cosine,
/// CosFace) on each row's target logit, `s·(cos(m1·θ + m2ᵢ) − m3ᵢ)`: the scale, m1, gradient
/// mode, fallback and filter stay the layer's. That is what margins that change per sample
/// need: ElasticFace draws each row's margin from a normal distribution every step
/// ([`elastic_margins`](crate::elastic_margins)), AdaFace sets it from the embedding's norm
/// ([`AdaFace`](crate::AdaFace)). An angle `m1·θ + m2ᵢ` below 0 (a negative m2ᵢ near θ = 0) is
/// held at 0, as AdaFace clips it; above π the layer's [`TargetFallback`](crate::TargetFallback)
/// applies as for its own m2.
///
/// ```
/// use partial_fc::{collective::SingleRank, CpuBackend, LayerConfig, PartialFc, PassOptions};
/// let mut cfg = LayerConfig::new(1000, 16, 4);
/// cfg.sample_rate = 1.0;
/// let x: Vec<f32> = (0..4 * 16).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
/// let labels = [3, 300, 600, 900];
/// let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
/// // ElasticFace-Arc: an angular margin per row around ArcFace's 0.5.
/// let m2 = [0.45, 0.52, 0.5, 0.57];
/// let out = layer
///     .forward_backward_with(&x, &labels, PassOptions::new().angular_margins(&m2))
///     .unwrap();
/// assert!(out.loss.is_finite());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PassOptions<'a> {
    pub(super) accumulate: bool,
    pub(super) weights: Option<&'a [f32]>,
    pub(super) angular: Option<&'a [f32]>,
    pub(super) additive: Option<&'a [f32]>,
}

/// Bounds of a per-row angular margin m2ᵢ (radians): the layer's own m2 lies in [0, π/2);
/// AdaFace's angular term is negative for high-norm rows.
pub const ROW_ANGULAR_MARGIN: (f64, f64) = (-FRAC_PI_2, FRAC_PI_2);

/// Bounds of a per-row cosine margin m3ᵢ: the layer's own m3 lies in [0, 1).
pub const ROW_ADDITIVE_MARGIN: (f64, f64) = (-1.0, 1.0);

impl<'a> PassOptions<'a> {
    /// A plain pass: no accumulation, no weights, the layer's margin on every row.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add this pass's gradient to the pending one instead of replacing it
    /// ([`forward_backward_accumulate`](crate::PartialFc::forward_backward_accumulate)'s rule:
    /// needs [`UpdateMode::Dense`](crate::UpdateMode::Dense)).
    pub fn accumulate(mut self, yes: bool) -> Self {
        self.accumulate = yes;
        self
    }

    /// A loss weight per row of this rank's batch, as
    /// [`forward_backward_weighted`](crate::PartialFc::forward_backward_weighted) takes them.
    pub fn weights(mut self, weights: &'a [f32]) -> Self {
        self.weights = Some(weights);
        self
    }

    /// An additive angular margin m2ᵢ per row of this rank's batch (radians, in (−π/2, π/2)),
    /// replacing the layer's m2 on that row's target.
    pub fn angular_margins(mut self, m2: &'a [f32]) -> Self {
        self.angular = Some(m2);
        self
    }

    /// An additive cosine margin m3ᵢ per row of this rank's batch (in (−1, 1)), replacing the
    /// layer's m3 on that row's target.
    pub fn additive_margins(mut self, m3: &'a [f32]) -> Self {
        self.additive = Some(m3);
        self
    }

    /// Whether the pass has per-row margins.
    pub(super) fn has_margins(&self) -> bool {
        self.angular.is_some() || self.additive.is_some()
    }

    /// What is wrong with the per-row inputs, if anything: one value per row each, weights in
    /// [0, 1e6], margins inside their bounds.
    pub(super) fn check(&self, rows: usize) -> Option<PfcError> {
        if let Some(w) = self.weights {
            if let Some(e) = super::pass::check_weights(w, rows) {
                return Some(e);
            }
        }
        let margins = [
            ("angular_margins", self.angular, ROW_ANGULAR_MARGIN),
            ("additive_margins", self.additive, ROW_ADDITIVE_MARGIN),
        ];
        for (name, values, (lo, hi)) in margins {
            let Some(values) = values else { continue };
            if values.len() != rows {
                return Some(PfcError::Shape(format!(
                    "{} {name} for {rows} rows: one margin per row expected",
                    values.len()
                )));
            }
            if let Some(row) = values
                .iter()
                .position(|&v| !(f64::from(v) > lo && f64::from(v) < hi))
            {
                return Some(PfcError::param(
                    name,
                    format!("{} at row {row}", values[row]),
                    format!("a row's margin must lie in ({lo:.4}, {hi:.4})"),
                ));
            }
        }
        None
    }

    /// This rank's rows of the margin table ([`ROW_MARGIN_FLOATS`] floats per row, `batch`
    /// rows; the padding rows get the layer's own margin).
    pub(super) fn margin_table(&self, margin: &Margin, batch: usize) -> Vec<f32> {
        let mut table = Vec::with_capacity(batch * ROW_MARGIN_FLOATS);
        for row in 0..batch {
            // A row's f32 margin equal to the layer's (rounded) takes the layer's f64 value,
            // so the fallback's constants, computed from it in f64, are the layer's bits too.
            let own = |v: Option<&[f32]>, layer: f64| match v.and_then(|v| v.get(row)) {
                Some(&v) if v != layer as f32 => f64::from(v),
                _ => layer,
            };
            let (m2, m3) = (own(self.angular, margin.m2), own(self.additive, margin.m3));
            table.extend(margin.row_entry(m2, m3));
        }
        table
    }
}
