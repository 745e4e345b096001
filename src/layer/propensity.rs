//! Propensity-scored ranking metrics (PSP@k, PSnDCG@k): extreme classification's metrics for
//! the rare labels. Most labels of an XMC dataset have few examples, and a classifier can score a
//! high P@k by predicting the frequent ones; these metrics weigh each correct prediction by the
//! inverse of its label's *propensity*, the estimated chance that a relevant label was observed
//! at all, so finding a rare label counts for more (Jain, Prabhu and Varma, "Extreme Multi-label
//! Loss Functions for Recommendation, Tagging, Ranking & Other Missing Label Applications",
//! KDD 2016). As the Extreme Classification Repository reports them, each is normalized by the
//! best value any ranking of the true labels could reach, so 1 is a perfect ranking.

use super::Prediction;
use crate::error::{PfcError, Result};

/// The inverse propensity of every class, `1 / p_l`, from its number of training rows `N_l`:
/// `p_l = 1 / (1 + C · e^(−A · ln(N_l + B)))` with `C = (ln N − 1) · (B + 1)^A`, where `N` is
/// the number of training rows (Jain et al., 2016). `A` and `B` are the dataset's constants:
/// the paper fits A = 0.55, B = 1.5 as the general default (Wikipedia-LSHTC: 0.5, 0.4;
/// Amazon: 0.6, 2.6).
///
/// ```
/// use partial_fc::layer::inverse_propensities;
/// // 1000 training rows: a class seen 500 times is near 1, one seen once far above.
/// let inv = inverse_propensities(&[500, 1, 0], 1000, 0.55, 1.5).unwrap();
/// assert!(inv[0] < 1.6 && inv[1] > 3.0 && inv[2] > inv[1]);
/// ```
///
/// # Errors
///
/// [`PfcError::Param`] for fewer than 3 training rows (ln N − 1 would not be positive), `a`
/// negative or not finite, `b` not finite or ≤ 0 (with `b` > 0 a class of no training rows has
/// a finite weight), or `a` and `b` so large that a propensity overflows.
pub fn inverse_propensities(
    label_counts: &[u64],
    train_rows: u64,
    a: f64,
    b: f64,
) -> Result<Vec<f64>> {
    if train_rows < 3 {
        return Err(PfcError::param(
            "train_rows",
            train_rows,
            "the propensity model needs ln N > 1: at least 3 training rows",
        ));
    }
    if !a.is_finite() || a < 0.0 {
        return Err(PfcError::param("a", a, "must be finite and >= 0"));
    }
    if !b.is_finite() || b <= 0.0 {
        return Err(PfcError::param("b", b, "must be finite and > 0"));
    }
    let c = ((train_rows as f64).ln() - 1.0) * (b + 1.0).powf(a);
    let inv: Vec<f64> = label_counts
        .iter()
        .map(|&n| 1.0 + c * (n as f64 + b).powf(-a))
        .collect();
    // Finite inputs can still overflow: (b + 1)^a is infinite for a = b = 1e308.
    let bad = if c.is_finite() {
        inv.iter().position(|v| !v.is_finite())
    } else {
        Some(0)
    };
    if let Some(class) = bad {
        return Err(PfcError::param(
            "a, b",
            format!("{a}, {b}"),
            format!(
                "the propensity of class {class} ({} training rows) is not finite: choose \
                 smaller A and B (the usual are 0.55, 1.5)",
                label_counts.get(class).copied().unwrap_or(0)
            ),
        ));
    }
    Ok(inv)
}

/// Propensity-scored metrics for j = 1 ..= k (element j − 1 of each).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PropensityMetrics {
    /// PSP@j: the rows' mean of Σ over the first j predictions of `1/p` for each true class,
    /// over j, divided by the same mean for the best ranking of each row's true classes (those
    /// of largest `1/p` first).
    pub psp: Vec<f64>,
    /// PSnDCG@j: as `psp`, with each hit weighted by 1/log₂(rank + 1) and each row divided by
    /// its ideal DCG (the ranks 1 ..= min(j, true classes of the row)), as nDCG@j.
    pub psndcg: Vec<f64>,
    /// The denominators: the rows' mean PSP@j of the best ranking.
    pub psp_ideal: Vec<f64>,
    /// The rows' mean PSnDCG@j of the best ranking.
    pub psndcg_ideal: Vec<f64>,
    /// Rows with at least one true class (the others add 0 to numerator and ideal alike).
    pub rows_with_labels: usize,
    /// Rows the means are over (with labels or not): the weight in [`merge`](Self::merge).
    pub rows: usize,
}

impl PropensityMetrics {
    /// Metrics from their values, as another process sent them, to
    /// [`merge`](Self::merge) on one rank (see [`RankingMetrics::new`](crate::RankingMetrics::new)).
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] for fields of different lengths or none, a value that is negative or
    /// not finite, or more rows with labels than rows.
    pub fn new(
        psp: Vec<f64>,
        psndcg: Vec<f64>,
        psp_ideal: Vec<f64>,
        psndcg_ideal: Vec<f64>,
        rows_with_labels: usize,
        rows: usize,
    ) -> Result<PropensityMetrics> {
        let k = psp.len();
        let lengths = [psndcg.len(), psp_ideal.len(), psndcg_ideal.len()];
        if k == 0 || lengths != [k; 3] {
            return Err(PfcError::Shape(format!(
                "propensity metrics of {k}, {}, {} and {} values of psp, psndcg and their ideals: \
                 one per j = 1 ..= k expected",
                lengths[0], lengths[1], lengths[2]
            )));
        }
        if let Some(v) = psp
            .iter()
            .chain(&psndcg)
            .chain(&psp_ideal)
            .chain(&psndcg_ideal)
            .find(|v| !(v.is_finite() && **v >= 0.0))
        {
            return Err(PfcError::Shape(format!(
                "a propensity metric of {v}: each is finite and >= 0"
            )));
        }
        if rows_with_labels > rows {
            return Err(PfcError::Shape(format!(
                "{rows_with_labels} rows with labels of {rows} rows"
            )));
        }
        Ok(PropensityMetrics {
            psp,
            psndcg,
            psp_ideal,
            psndcg_ideal,
            rows_with_labels,
            rows,
        })
    }

    /// The metrics of the union of several parts' rows (ranks, chunks): each part's numerator
    /// and ideal means weighted by its rows, then divided.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] for no parts, or parts of different `k`.
    pub fn merge(parts: &[PropensityMetrics]) -> Result<PropensityMetrics> {
        let first = parts
            .first()
            .ok_or_else(|| PfcError::Shape("no propensity metrics to merge".into()))?;
        let k = first.psp.len();
        let fields = |m: &PropensityMetrics| {
            [
                m.psp.len(),
                m.psndcg.len(),
                m.psp_ideal.len(),
                m.psndcg_ideal.len(),
            ]
        };
        if let Some(other) = parts.iter().find(|m| fields(m) != [k; 4]) {
            return Err(PfcError::Shape(format!(
                "propensity metrics of {:?} values (psp, psndcg and their ideals) and of k = {k} \
                 cannot be merged",
                fields(other)
            )));
        }
        let rows: usize = parts.iter().map(|m| m.rows).sum();
        let weighted = |value: &dyn Fn(&PropensityMetrics, usize) -> f64| -> Vec<f64> {
            (0..k)
                .map(|j| parts.iter().map(|m| value(m, j) * m.rows as f64).sum())
                .collect()
        };
        let psp_ideal = weighted(&|m, j| m.psp_ideal[j]);
        let psndcg_ideal = weighted(&|m, j| m.psndcg_ideal[j]);
        let psp_num = weighted(&|m, j| m.psp[j] * m.psp_ideal[j]);
        let psndcg_num = weighted(&|m, j| m.psndcg[j] * m.psndcg_ideal[j]);
        let mean = |v: Vec<f64>| -> Vec<f64> { v.iter().map(|s| s / rows.max(1) as f64).collect() };
        Ok(PropensityMetrics {
            psp: ratio(&psp_num, &psp_ideal),
            psndcg: ratio(&psndcg_num, &psndcg_ideal),
            psp_ideal: mean(psp_ideal),
            psndcg_ideal: mean(psndcg_ideal),
            rows_with_labels: parts.iter().map(|m| m.rows_with_labels).sum(),
            rows,
        })
    }
}

/// `num / den` element by element, 0 where nothing could be scored (no row has a label).
fn ratio(num: &[f64], den: &[f64]) -> Vec<f64> {
    num.iter()
        .zip(den)
        .map(|(n, d)| if *d > 0.0 { n / d } else { 0.0 })
        .collect()
}

impl Prediction {
    /// PSP@j and PSnDCG@j for j = 1 ..= k against a set of true classes per row, with
    /// `inv_propensity[c]` the inverse propensity of class `c` (from
    /// [`inverse_propensities`] over the training set's label counts). The label sets are
    /// read as [`ranking_metrics`](Self::ranking_metrics) reads them: negative entries are
    /// padding, a class listed twice counts once; a row without labels adds 0 to both the
    /// numerator and the ideal.
    ///
    /// ```
    /// use partial_fc::Prediction;
    /// let p = Prediction { k: 2, classes: vec![0, 1], scores: vec![0.9, 0.8] };
    /// // Class 1 is rare (weight 4), class 0 frequent (weight 1); the row's truth is {0, 1}.
    /// let m = p.propensity_scored_metrics([[0, 1]], &[1.0, 4.0]).unwrap();
    /// assert_eq!(m.psp[0], 0.25); // found the frequent one first: 1 of the best 4
    /// assert_eq!(m.psp[1], 1.0); // both within 2: as good as any ranking
    /// ```
    ///
    /// # Errors
    ///
    /// Those of [`ranking_metrics`](Self::ranking_metrics); [`PfcError::Shape`] for a true
    /// class without an inverse propensity (`>= inv_propensity.len()`); [`PfcError::Param`] for
    /// an inverse propensity that is not finite or below 1 (a propensity is a probability).
    pub fn propensity_scored_metrics<I, L>(
        &self,
        label_sets: I,
        inv_propensity: &[f64],
    ) -> Result<PropensityMetrics>
    where
        I: IntoIterator<Item = L>,
        L: AsRef<[i64]>,
    {
        if let Some((class, w)) = inv_propensity
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w >= 1.0))
        {
            return Err(PfcError::param(
                "inv_propensity",
                format!("{w} (class {class})"),
                "1/p must be finite and >= 1",
            ));
        }
        let rows = self.check_shape()?;
        let k = self.k;
        let gain: Vec<f64> = (1..=k).map(|r| 1.0 / ((r + 1) as f64).log2()).collect();
        let sets = super::ranking::true_class_sets(label_sets, rows)?;
        let (mut psp, mut psp_ideal) = (vec![0.0; k], vec![0.0; k]);
        let (mut psndcg, mut psndcg_ideal) = (vec![0.0; k], vec![0.0; k]);
        let mut rows_with_labels = 0;
        for (row, truth) in sets.iter().enumerate() {
            if truth.is_empty() {
                continue;
            }
            rows_with_labels += 1;
            let weight_of = |class: i64| -> Result<f64> {
                inv_propensity.get(class as usize).copied().ok_or_else(|| {
                    PfcError::Shape(format!(
                        "true class {class} has no inverse propensity (given for {} classes)",
                        inv_propensity.len()
                    ))
                })
            };
            let weights = truth
                .iter()
                .map(|&c| weight_of(c))
                .collect::<Result<Vec<f64>>>()?;
            // The best ranking: the true classes of largest weight first.
            let mut best = weights.clone();
            best.sort_unstable_by(|a, b| b.total_cmp(a));
            let mut found = vec![false; truth.len()];
            let (mut hit_sum, mut hit_dcg, mut best_sum, mut best_dcg, mut idcg) =
                (0.0, 0.0, 0.0, 0.0, 0.0);
            for (j, class) in self.row(row).iter().enumerate() {
                if let Ok(t) = truth.binary_search(class) {
                    if !std::mem::replace(&mut found[t], true) {
                        hit_sum += weights[t];
                        hit_dcg += weights[t] * gain[j];
                    }
                }
                if let Some(&w) = best.get(j) {
                    best_sum += w;
                    best_dcg += w * gain[j];
                    idcg += gain[j];
                }
                let at = (j + 1) as f64;
                psp[j] += hit_sum / at;
                psp_ideal[j] += best_sum / at;
                psndcg[j] += hit_dcg / idcg;
                psndcg_ideal[j] += best_dcg / idcg;
            }
        }
        let mean = |v: Vec<f64>| -> Vec<f64> { v.iter().map(|s| s / rows.max(1) as f64).collect() };
        Ok(PropensityMetrics {
            psp: ratio(&psp, &psp_ideal),
            psndcg: ratio(&psndcg, &psndcg_ideal),
            psp_ideal: mean(psp_ideal),
            psndcg_ideal: mean(psndcg_ideal),
            rows_with_labels,
            rows,
        })
    }
}
