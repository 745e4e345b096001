//! Multi-label training: a batch whose rows have several true classes each (extreme multi-label
//! classification, XMC) turned into the one-label-per-row batch the layer trains on, and the
//! layer's embedding gradient summed back to the rows.
//!
//! [`PartialFc`] computes a softmax with one target per row. [`PairBatch`] repeats each row once
//! per label, one label per copy, so that one pass trains every (row, label) pair, and
//! [`PairBatch::fold_grad`] adds the copies' gradients back into their row's, the gradient an
//! encoder (the backbone) needs. See the type's documentation for the loss this trains and its
//! caveat, and `examples/multi_label.rs` and docs/training.md for a measured run.

use crate::backend::{Backend, Collective};
use crate::error::{PfcError, Result};
use crate::layer::{PartialFc, StepOutput};
use std::ops::Range;

/// A multi-label batch expanded into (row, label) pairs: row `i` with true classes `Y_i` becomes
/// `|Y_i|` copies of its embedding, one per class, in ascending class order; copies of a row are
/// contiguous and rows keep their order.
///
/// # What it trains
///
/// Passing [`embeddings`](Self::embeddings) and [`labels`](Self::labels) to
/// [`PartialFc::forward_backward`] trains the mean over the copies of the margin-softmax loss,
///
/// ```text
/// L = 1/P · Σ_i Σ_{y ∈ Y_i} −log softmax(x_i)_y,        P = Σ_i |Y_i| (over every rank's batch)
/// ```
///
/// the "pick-all-labels" (PAL) reduction of multi-label to multi-class learning in the extreme
/// classification literature (Menon et al., *Multilabel reductions: what is my loss
/// optimising?*, NeurIPS 2019; as used by e.g. Reddi et al., *Stochastic negative mining for
/// learning with large output spaces*, AISTATS 2019), up to its weights: each pair weighs 1/P, so
/// a row with 8 labels counts 8 times one with 1 (PAL-N, which divides each row by `|Y_i|`, is
/// [`forward_backward_per_row`](Self::forward_backward_per_row), through the layer's per-row
/// weights). The layer's `grad_embeddings` is then the
/// gradient for each copy; [`fold_grad`](Self::fold_grad) sums it over a row's copies, which by
/// the chain rule is d L / d x_i, since every copy is the same function of x_i.
///
/// **Caveat.** Each copy's softmax has one target, so a row's other true classes are among its
/// negatives: the layer forces every label of the gathered batch into the sample, so they are
/// there in every step, pushing the embedding and those class centers apart. The layer does not
/// mask them out of the denominator. At the optimum of PAL the softmax spreads a row's
/// probability over its labels rather than putting all of it on each, which still ranks them
/// first (what P@k and nDCG@k measure); in practice the push costs some accuracy.
/// [`Margin::interclass_filter`](crate::Margin::interclass_filter) partly stands in for the
/// mask: it zeroes the non-target cosines above a threshold, and a row's other labels are the
/// non-targets most likely to be that close (docs/training.md measures it).
///
/// # Rows and labels
///
/// Negative entries of a label set are padding and skipped (a padded `rows × width` matrix
/// with −1 can be passed as `labels.chunks(width)`, as to
/// [`Prediction::ranking_metrics`](crate::Prediction::ranking_metrics)); a class listed twice
/// in one row counts once. A row with no label gets no copy and a zero gradient: it contributes
/// nothing to the loss, so zero is its gradient, not a stand-in. Classes are not checked against
/// the layer's `[0, num_classes)` here; the pass does that (and
/// [`forward_backward`](Self::forward_backward) names the original row in its error).
///
/// The layer's `batch_per_rank` bounds the copies of one pass, not the rows: size it for the
/// largest expanded batch (rows × most labels per row), or split the rows into batches whose
/// [`len`](Self::len) fits. A batch of rows without any label is empty ([`is_empty`](Self::is_empty)),
/// and a pass over empty batches on every rank is refused: skip it.
///
/// ```
/// use partial_fc::collective::SingleRank;
/// use partial_fc::multi_label::PairBatch;
/// use partial_fc::{CpuBackend, LayerConfig, Margin, PartialFc};
///
/// // 4 rows of dimension 8 with 2, 3, 1 and 0 labels (padded with -1 to width 3).
/// let dim = 8;
/// let x: Vec<f32> = (0..4 * dim).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
/// let labels = [3, 40, -1, 7, 2, 9, 40, -1, -1, -1, -1, -1];
/// let pairs = PairBatch::new(&x, dim, labels.chunks(3)).unwrap();
/// assert_eq!(pairs.len(), 6); // 2 + 3 + 1 + 0 copies
/// assert_eq!(pairs.labels(), &[3, 40, 2, 7, 9, 40]);
/// assert_eq!(pairs.source_rows(), &[0, 0, 1, 1, 1, 2]);
///
/// // A plain scaled softmax (no angular margin) suits multi-label data; batch_per_rank counts
/// // copies, not rows.
/// let mut cfg = LayerConfig::new(50, dim, pairs.len());
/// cfg.margin = Margin::combined(30.0, 1.0, 0.0, 0.0);
/// cfg.sample_rate = 1.0;
/// let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
/// let first = pairs.forward_backward(&mut layer).unwrap();
/// assert_eq!(first.grad_embeddings.len(), 4 * dim); // rows × dim, folded
/// assert!(first.grad_embeddings[3 * dim..].iter().all(|&g| g == 0.0)); // row 3: no label
/// // (by hand: layer.forward_backward(pairs.embeddings(), pairs.labels()), then
/// // pairs.fold_grad(&out.grad_embeddings) gives the same.)
/// layer.step(0.5).unwrap();
/// for _ in 0..20 {
///     pairs.forward_backward(&mut layer).unwrap();
///     layer.step(0.5).unwrap();
/// }
/// let last = pairs.forward_backward(&mut layer).unwrap();
/// assert!(last.loss < first.loss);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PairBatch {
    dim: usize,
    /// `copies × dim`: row `source[j]`'s embedding for copy j.
    embeddings: Vec<f32>,
    /// `copies`: copy j's class.
    labels: Vec<i64>,
    /// `copies`: the row copy j came from (non-decreasing).
    source: Vec<usize>,
    /// `rows + 1`: row i's copies are `offsets[i] .. offsets[i + 1]`.
    offsets: Vec<usize>,
}

impl PairBatch {
    /// Expands `embeddings` (`rows × dim`, row-major) with one label set per row into one copy
    /// per (row, label) pair; negative labels are padding, a repeated class counts once, a row
    /// without labels gets no copy.
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] for `dim` = 0; [`PfcError::Shape`] when `embeddings` is not whole
    /// rows of `dim`, when `label_sets` does not hold exactly one set per row, or when the
    /// expanded batch (copies × dim values) overflows `usize` or cannot be allocated. Nothing
    /// panics, whatever the input.
    pub fn new<I, L>(embeddings: &[f32], dim: usize, label_sets: I) -> Result<PairBatch>
    where
        I: IntoIterator<Item = L>,
        L: AsRef<[i64]>,
    {
        if dim == 0 {
            return Err(PfcError::param("dim", 0, "must be >= 1"));
        }
        if !embeddings.len().is_multiple_of(dim) {
            return Err(PfcError::Shape(format!(
                "{} embedding values are not whole rows of dimension {dim}",
                embeddings.len()
            )));
        }
        let rows = embeddings.len() / dim;
        let mut sets = label_sets.into_iter();
        let mut labels: Vec<i64> = Vec::new();
        let mut offsets: Vec<usize> = Vec::new();
        try_reserve(&mut offsets, rows.checked_add(1), "row offsets")?;
        offsets.push(0);
        for row in 0..rows {
            let set = sets.next().ok_or_else(|| {
                PfcError::Shape(format!("{row} label sets for {rows} embedding rows"))
            })?;
            let start = labels.len();
            let set = set.as_ref();
            try_reserve(&mut labels, Some(set.len()), "labels")?;
            labels.extend(set.iter().copied().filter(|&c| c >= 0));
            labels[start..].sort_unstable();
            let kept = dedup_tail(&mut labels, start);
            labels.truncate(start + kept);
            offsets.push(labels.len());
        }
        if sets.next().is_some() {
            return Err(PfcError::Shape(format!(
                "more than {rows} label sets for {rows} embedding rows"
            )));
        }
        labels.shrink_to_fit();
        let copies = labels.len();
        let values = copies.checked_mul(dim);
        let mut expanded: Vec<f32> = Vec::new();
        try_reserve(&mut expanded, values, "expanded embeddings")?;
        let mut source: Vec<usize> = Vec::new();
        try_reserve(&mut source, Some(copies), "source rows")?;
        for (row, x) in embeddings.chunks_exact(dim).enumerate() {
            for _ in offsets[row]..offsets[row + 1] {
                expanded.extend_from_slice(x);
                source.push(row);
            }
        }
        Ok(PairBatch {
            dim,
            embeddings: expanded,
            labels,
            source,
            offsets,
        })
    }

    /// The expanded embeddings, `len() × dim`: pass them to the layer.
    pub fn embeddings(&self) -> &[f32] {
        &self.embeddings
    }

    /// One class per copy (`len()` of them), each in `0..` (padding is gone).
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// The row each copy came from (`len()` of them, non-decreasing).
    pub fn source_rows(&self) -> &[usize] {
        &self.source
    }

    /// The copies of row `row` (an index range into [`labels`](Self::labels) and the rows of
    /// [`embeddings`](Self::embeddings)); empty for a row without labels, `None` past the last
    /// row.
    pub fn copies_of(&self, row: usize) -> Option<Range<usize>> {
        let end = *self.offsets.get(row.checked_add(1)?)?;
        Some(self.offsets[row]..end)
    }

    /// Copies: (row, label) pairs, the rows of the expanded batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// No copies: every row was without labels (or there were no rows).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Rows of the original batch.
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Sums a per-copy gradient (`len() × dim`, as the layer's `grad_embeddings` for this batch)
    /// over each row's copies: `rows() × dim`, zero for a row without labels. This is the
    /// gradient of the same loss with respect to the original rows.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when `grad` does not hold `len() × dim` values.
    pub fn fold_grad(&self, grad: &[f32]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        try_reserve(
            &mut out,
            self.rows().checked_mul(self.dim),
            "folded gradient",
        )?;
        out.resize(self.rows() * self.dim, 0.0);
        self.fold_grad_into(grad, &mut out)?;
        Ok(out)
    }

    /// [`fold_grad`](Self::fold_grad) added into `out` (`rows() × dim`), for a caller that sums
    /// gradients of several losses into one buffer.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when `grad` does not hold `len() × dim` values or `out` does not hold
    /// `rows() × dim`; `out` is then unchanged.
    pub fn fold_grad_into(&self, grad: &[f32], out: &mut [f32]) -> Result<()> {
        if grad.len() != self.embeddings.len() {
            return Err(PfcError::Shape(format!(
                "gradient of {} values for {} copies of dimension {} ({} values)",
                grad.len(),
                self.len(),
                self.dim,
                self.embeddings.len()
            )));
        }
        // rows() × dim cannot overflow: the input embeddings held that many values.
        if out.len() != self.rows() * self.dim {
            return Err(PfcError::Shape(format!(
                "output of {} values for {} rows of dimension {} ({} values)",
                out.len(),
                self.rows(),
                self.dim,
                self.rows() * self.dim
            )));
        }
        for (g, &row) in grad.chunks_exact(self.dim).zip(&self.source) {
            let o = &mut out[row * self.dim..(row + 1) * self.dim];
            for (o, g) in o.iter_mut().zip(g) {
                *o += g;
            }
        }
        Ok(())
    }

    /// Each copy's weight 1/|Y_i| (one over its row's labels), for
    /// [`PartialFc::forward_backward_weighted`]: every row then weighs the same however many
    /// labels it has, the "normalized" pick-all-labels reduction (PAL-N; Menon et al., 2019)
    /// instead of PAL's weight per pair. The layer divides by the copies, not the rows: the loss
    /// is PAL-N's times rows-with-labels / copies (a constant for batches of equal shape; for
    /// PAL-N's exact value, multiply the weights by the job's copies / rows with labels). The
    /// weights average below 1 (1/labels); with 16-bit logits, where tiny products lose
    /// precision, scaling them to average 1 (and the learning rate down alike) keeps more of it
    /// (see [`PartialFc::forward_backward_weighted`]).
    pub fn row_weights(&self) -> Vec<f32> {
        self.offsets
            .windows(2)
            .flat_map(|w| {
                let copies = w[1] - w[0];
                std::iter::repeat_n(1.0 / copies as f32, copies)
            })
            .collect()
    }

    /// [`forward_backward`](Self::forward_backward) with each copy weighted by
    /// [`row_weights`](Self::row_weights): every row counts alike (PAL-N).
    ///
    /// # Errors
    ///
    /// Those of [`forward_backward`](Self::forward_backward) and of
    /// [`PartialFc::forward_backward_weighted`].
    pub fn forward_backward_per_row<B: Backend, C: Collective<B>>(
        &self,
        layer: &mut PartialFc<B, C>,
    ) -> Result<StepOutput> {
        let weights = self.row_weights();
        self.fold_pass(layer.forward_backward_weighted(&self.embeddings, &self.labels, &weights))
    }

    /// One pass of `layer` over the expanded batch, with the gradient folded back:
    /// `layer.forward_backward(self.embeddings(), self.labels())` followed by
    /// [`fold_grad`](Self::fold_grad), so `grad_embeddings` is `rows() × dim` (the gradient of
    /// the mean over every rank's copies with respect to this rank's rows). `loss`, `sampled`
    /// and `rows` (one entry per copy) are the pass's. Call [`PartialFc::step`] after it as after any pass.
    ///
    /// # Errors
    ///
    /// Those of [`PartialFc::forward_backward`], with a row named by an error
    /// ([`PfcError::Label`], [`PfcError::NonFinite`], [`PfcError::ZeroRow`],
    /// [`PfcError::OutOfRange`]) mapped from the copy to its row of the original batch.
    pub fn forward_backward<B: Backend, C: Collective<B>>(
        &self,
        layer: &mut PartialFc<B, C>,
    ) -> Result<StepOutput> {
        self.fold_pass(layer.forward_backward(&self.embeddings, &self.labels))
    }

    /// A pass over the copies as the rows see it: its gradient folded back to them, an error
    /// that names a copy renamed to its row.
    fn fold_pass(&self, pass: Result<StepOutput>) -> Result<StepOutput> {
        let out = pass.map_err(|e| self.map_row(e))?;
        Ok(StepOutput {
            grad_embeddings: self.fold_grad(&out.grad_embeddings)?,
            ..out
        })
    }

    /// An error naming a copy of this batch, renamed to the copy's original row.
    fn map_row(&self, e: PfcError) -> PfcError {
        let to_row = |copy: usize| self.source.get(copy).copied().unwrap_or(copy);
        match e {
            PfcError::Label {
                row,
                label,
                num_classes,
            } => PfcError::Label {
                row: to_row(row),
                label,
                num_classes,
            },
            PfcError::NonFinite { row, value } => PfcError::NonFinite {
                row: to_row(row),
                value,
            },
            PfcError::ZeroRow { row } => PfcError::ZeroRow { row: to_row(row) },
            PfcError::OutOfRange { row, value, reason } => PfcError::OutOfRange {
                row: to_row(row),
                value,
                reason,
            },
            other => other,
        }
    }
}

/// Removes repeats from the sorted tail `v[start..]` in place; returns how many distinct values
/// it keeps (moved to the front of the tail).
fn dedup_tail(v: &mut [i64], start: usize) -> usize {
    let tail = &mut v[start..];
    let mut kept = 0;
    for i in 0..tail.len() {
        if kept == 0 || tail[i] != tail[kept - 1] {
            tail[kept] = tail[i];
            kept += 1;
        }
    }
    kept
}

/// Reserves room for `additional` more elements (`None`: the count overflowed), as a
/// [`PfcError::Shape`] rather than an abort when it cannot.
fn try_reserve<T>(v: &mut Vec<T>, additional: Option<usize>, what: &str) -> Result<()> {
    let n = additional.ok_or_else(|| {
        PfcError::Shape(format!("{what}: the expanded batch's size overflows usize"))
    })?;
    v.try_reserve(n).map_err(|e| {
        PfcError::Shape(format!(
            "{what}: cannot allocate {n} elements for the expanded batch ({e})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_tail_keeps_distinct_values_after_start() {
        let mut v = vec![9, 9, 1, 1, 2, 5, 5, 5];
        let kept = dedup_tail(&mut v, 2);
        assert_eq!(kept, 3);
        assert_eq!(&v[..2 + kept], &[9, 9, 1, 2, 5]);
        let mut empty: Vec<i64> = vec![4];
        assert_eq!(dedup_tail(&mut empty, 1), 0);
    }

    #[test]
    fn copies_of_past_the_end_is_none() {
        let p = PairBatch::new(&[1.0, 2.0], 1, [[0i64], [3]]).unwrap();
        assert_eq!(p.copies_of(1), Some(1..2));
        assert_eq!(p.copies_of(2), None);
        assert_eq!(p.copies_of(usize::MAX), None);
    }
}
