//! Multi-label ranking metrics of a [`Prediction`]: precision@k, nDCG@k and recall@k against a
//! set of true classes per row, as extreme classification reports them (the Extreme
//! Classification Repository's P@k and nDCG@k, with binary relevance).

use super::Prediction;
use crate::error::{PfcError, Result};

/// Ranking metrics for j = 1 ..= k (element j − 1 of each), averaged over the rows.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RankingMetrics {
    /// precision@j: the fraction of the first j predictions that are true classes of the row.
    pub precision: Vec<f64>,
    /// nDCG@j: Σ over the first j predictions of 1/log₂(rank + 1) for each true class, divided
    /// by its best possible value, Σ over ranks 1 ..= min(j, true classes of the row).
    pub ndcg: Vec<f64>,
    /// recall@j: the fraction of the row's true classes among its first j predictions.
    pub recall: Vec<f64>,
    /// Rows with at least one true class. Rows without one score 0 on every metric and still
    /// count in the mean (the repository's convention for P@k).
    pub rows_with_labels: usize,
    /// Rows the means are over (all of them, with labels or not): the weight of these metrics
    /// in [`merge`](Self::merge).
    pub rows: usize,
}

impl RankingMetrics {
    /// Metrics from their values, as another process sent them: a job of several processes
    /// (NCCL ranks) sends each rank's fields (all-gathered as floats, or over its own channel),
    /// rebuilds them here on one rank and [`merge`](Self::merge)s them.
    ///
    /// ```
    /// use partial_fc::RankingMetrics;
    /// // What two ranks sent: k = 2, rows 3 and 1.
    /// let a = RankingMetrics::new(vec![1.0, 0.5], vec![1.0, 0.8], vec![0.5, 0.5], 3, 3).unwrap();
    /// let b = RankingMetrics::new(vec![0.0, 0.5], vec![0.0, 0.4], vec![0.0, 1.0], 1, 1).unwrap();
    /// let job = RankingMetrics::merge(&[a, b]).unwrap();
    /// assert_eq!(job.precision, vec![0.75, 0.5]);
    /// ```
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] for fields of different lengths or none, a value that is not a
    /// fraction in [0, 1], or more rows with labels than rows.
    pub fn new(
        precision: Vec<f64>,
        ndcg: Vec<f64>,
        recall: Vec<f64>,
        rows_with_labels: usize,
        rows: usize,
    ) -> Result<RankingMetrics> {
        let k = precision.len();
        if k == 0 || ndcg.len() != k || recall.len() != k {
            return Err(PfcError::Shape(format!(
                "ranking metrics of {k}, {} and {} values of precision, nDCG and recall: one per \
                 j = 1 ..= k expected",
                ndcg.len(),
                recall.len()
            )));
        }
        if let Some(v) = precision
            .iter()
            .chain(&ndcg)
            .chain(&recall)
            .find(|v| !(0.0..=1.0).contains(*v))
        {
            return Err(PfcError::Shape(format!(
                "a ranking metric of {v}: each is a fraction in [0, 1]"
            )));
        }
        if rows_with_labels > rows {
            return Err(PfcError::Shape(format!(
                "{rows_with_labels} rows with labels of {rows} rows"
            )));
        }
        Ok(RankingMetrics {
            precision,
            ndcg,
            recall,
            rows_with_labels,
            rows,
        })
    }

    /// The metrics of the union of several parts' rows: each part's means weighted by its
    /// [`rows`](Self::rows), as the job's metrics come from its ranks' (each rank's
    /// [`Prediction`] holds its own rows) or an evaluation's from its chunks.
    ///
    /// ```
    /// use partial_fc::Prediction;
    /// let p = Prediction { k: 1, classes: vec![3, 1, 5], scores: vec![0.9, 0.8, 0.7] };
    /// let labels = [[3], [0], [5]];
    /// let whole = p.ranking_metrics(labels.iter()).unwrap();
    /// // The same rows split as two ranks would hold them.
    /// let first = Prediction { k: 1, classes: vec![3], scores: vec![0.9] };
    /// let rest = Prediction { k: 1, classes: vec![1, 5], scores: vec![0.8, 0.7] };
    /// let parts = [
    ///     first.ranking_metrics(labels[..1].iter()).unwrap(),
    ///     rest.ranking_metrics(labels[1..].iter()).unwrap(),
    /// ];
    /// let merged = partial_fc::RankingMetrics::merge(&parts).unwrap();
    /// assert_eq!(merged.rows, 3);
    /// assert!((merged.precision[0] - whole.precision[0]).abs() < 1e-12); // 2/3, not (1 + 1/2) / 2
    /// ```
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] for no parts, or parts of different `k`.
    pub fn merge(parts: &[RankingMetrics]) -> Result<RankingMetrics> {
        let first = parts
            .first()
            .ok_or_else(|| PfcError::Shape("no ranking metrics to merge".into()))?;
        let k = first.precision.len();
        let lengths = |m: &RankingMetrics| [m.precision.len(), m.ndcg.len(), m.recall.len()];
        if let Some(other) = parts.iter().find(|m| lengths(m) != [k; 3]) {
            return Err(PfcError::Shape(match lengths(other) {
                [p, n, r] if p == n && n == r => {
                    format!("ranking metrics of k = {k} and of k = {p} cannot be merged")
                }
                [p, n, r] => format!(
                    "malformed ranking metrics: {p}, {n} and {r} values of precision, nDCG and \
                     recall"
                ),
            }));
        }
        let rows: usize = parts.iter().map(|m| m.rows).sum();
        let mean = |field: fn(&RankingMetrics) -> &Vec<f64>| -> Vec<f64> {
            (0..k)
                .map(|j| {
                    let sum: f64 = parts.iter().map(|m| field(m)[j] * m.rows as f64).sum();
                    sum / rows.max(1) as f64
                })
                .collect()
        };
        Ok(RankingMetrics {
            precision: mean(|m| &m.precision),
            ndcg: mean(|m| &m.ndcg),
            recall: mean(|m| &m.recall),
            rows_with_labels: parts.iter().map(|m| m.rows_with_labels).sum(),
            rows,
        })
    }
}

impl Prediction {
    /// precision@j, nDCG@j and recall@j for j = 1 ..= k against a set of true classes per row
    /// (`label_sets[row]`), the metrics extreme classification reports. Negative entries are
    /// ignored, so a padded `rows × width` label matrix with −1 for "no label" can be passed as
    /// `labels.chunks(width)`; a class listed twice counts once; classes outside the classifier
    /// count as true classes no prediction can find. With one class per row, precision@1 and
    /// recall@k equal [`top_accuracy`](Self::top_accuracy)'s first and last values. In a job
    /// of several ranks each rank's `Prediction` holds its own rows: gather the ranks'
    /// metrics and [`RankingMetrics::merge`] them for the job's.
    ///
    /// ```
    /// use partial_fc::Prediction;
    /// let p = Prediction { k: 2, classes: vec![3, 1, 5, 0], scores: vec![0.9, 0.2, 0.8, 0.1] };
    /// // Row 0's true classes are {1, 3}, row 1's {0, 7} (padded with -1: width 3).
    /// let labels = [1, 3, -1, 0, 7, -1];
    /// let m = p.ranking_metrics(labels.chunks(3)).unwrap();
    /// assert_eq!(m.precision, vec![0.5, 0.75]); // P@1: row 0 hits; P@2: (2/2 + 1/2) / 2
    /// assert_eq!(m.recall, vec![0.25, 0.75]); // row 0 finds 1 of 2, then 2 of 2; row 1 0, then 1
    /// assert_eq!(m.ndcg[0], 0.5);
    /// ```
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when `label_sets` does not hold one set per row, or the prediction is
    /// malformed ([`check_shape`](Self::check_shape)).
    pub fn ranking_metrics<I, L>(&self, label_sets: I) -> Result<RankingMetrics>
    where
        I: IntoIterator<Item = L>,
        L: AsRef<[i64]>,
    {
        let rows = self.check_shape()?;
        let sets = true_class_sets(label_sets, rows)?;
        let k = self.k;
        // 1/log₂(rank + 1) for ranks 1 ..= k, and its running sums (the ideal DCG).
        let gain: Vec<f64> = (1..=k).map(|r| 1.0 / ((r + 1) as f64).log2()).collect();
        let ideal: Vec<f64> = gain
            .iter()
            .scan(0.0, |sum, g| {
                *sum += g;
                Some(*sum)
            })
            .collect();
        let (mut precision, mut ndcg, mut recall) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
        let mut rows_with_labels = 0;
        for (row, truth) in sets.iter().enumerate() {
            if truth.is_empty() {
                continue;
            }
            rows_with_labels += 1;
            let (mut hits, mut dcg) = (0usize, 0.0);
            let mut found = vec![false; truth.len()];
            for (j, class) in self.row(row).iter().enumerate() {
                // A true class counts once, should a prediction from elsewhere repeat it (the
                // crate's predictions never do).
                if let Ok(t) = truth.binary_search(class) {
                    if !std::mem::replace(&mut found[t], true) {
                        hits += 1;
                        dcg += gain[j];
                    }
                }
                precision[j] += hits as f64 / (j + 1) as f64;
                recall[j] += hits as f64 / truth.len() as f64;
                ndcg[j] += dcg / ideal[j.min(truth.len() - 1)];
            }
        }
        let mean =
            |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|s| s / rows.max(1) as f64).collect() };
        Ok(RankingMetrics {
            precision: mean(precision),
            ndcg: mean(ndcg),
            recall: mean(recall),
            rows_with_labels,
            rows,
        })
    }
}

/// Each row's true classes as the metrics read a label set: negative entries are padding, a
/// class listed twice counts once (sorted, for binary search). Exactly one set per row: the sets
/// are counted as they come (an iterator need not know its length, nor end: one past `rows` is
/// enough to refuse it).
pub(super) fn true_class_sets<I, L>(label_sets: I, rows: usize) -> Result<Vec<Vec<i64>>>
where
    I: IntoIterator<Item = L>,
    L: AsRef<[i64]>,
{
    let mut sets = label_sets.into_iter();
    let mut out = Vec::with_capacity(rows);
    for row in 0..rows {
        let set = sets.next().ok_or_else(|| {
            PfcError::Shape(format!("{row} label sets for a prediction of {rows} rows"))
        })?;
        let mut truth: Vec<i64> = set.as_ref().iter().copied().filter(|&c| c >= 0).collect();
        truth.sort_unstable();
        truth.dedup();
        out.push(truth);
    }
    if sets.next().is_some() {
        return Err(PfcError::Shape(format!(
            "more than {rows} label sets for a prediction of {rows} rows"
        )));
    }
    Ok(out)
}
