//! Prediction with the sharded classifier: for each embedding, the k classes whose centers are
//! nearest (highest cosine) over every shard. In extreme classification the classifier is the
//! model, and this is how it is evaluated (precision@k) and served; in face recognition it
//! answers closed-set identification against the training identities.
//!
//! Every rank scores the gathered batch against its shard a chunk of classes at a time
//! (`Backend::class_top_k`: GEMM, then a running top-k merge, so the `rows × shard` matrix is
//! never held), then the ranks all-gather their k candidates per row and each merges those of
//! its own rows.

use super::checks::{prediction_row_error, zero_rows};
use super::{Call, PartialFc};
use crate::backend::{Backend, Collective};
use crate::cpu::top_k::{refuse_diverged, TOP_K_MAX};
use crate::error::{PfcError, Result};
use rayon::prelude::*;

/// Classes per scoring chunk: the scratch holds `4096 × d` normalized centers and
/// `N·world × 4096` cosines (16 MiB at a gathered batch of 1024), allocated for the call; fewer
/// classes a chunk when the gathered batch is larger, so that the cosines stay within
/// [`COSINES_MAX`] values.
const CHUNK: usize = 4096;

/// Most cosines a chunk holds: 64 MiB of f32.
const COSINES_MAX: usize = 1 << 24;

/// A prediction's device buffers: the scoring chunk, this rank's candidates, every rank's.
struct Scratch<B: Backend> {
    chunk_weights: B::Buf<f32>,
    chunk_cosines: B::Buf<f32>,
    top_scores: B::Buf<f32>,
    top_ids: B::Buf<i32>,
    send_ids: B::Buf<i64>,
    all_scores: B::Buf<f32>,
    all_ids: B::Buf<i64>,
}

/// The k classes nearest to each of this rank's rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Classes per row.
    pub k: usize,
    /// `rows × k` global class ids, best first; ties go to the smaller id. −1 in an empty slot:
    /// every slot of a row of zeros (no direction, so no class is nearest to it; also a row a
    /// 16-bit wire rounds to zeros), which the metrics count as misses
    /// ([`is_empty_row`](Self::is_empty_row)).
    pub classes: Vec<i64>,
    /// `rows × k` cosines between the normalized embedding and the normalized class centers
    /// (the training's scale and margins do not apply).
    pub scores: Vec<f32>,
}

impl Prediction {
    /// Row `row`'s classes, best first.
    pub fn row(&self, row: usize) -> &[i64] {
        &self.classes[row * self.k..(row + 1) * self.k]
    }

    /// Rows predicted.
    pub fn rows(&self) -> usize {
        self.classes.len() / self.k.max(1)
    }

    /// Whether row `row`'s prediction is empty (class −1 in its first slot): a row of zeros,
    /// which has no direction and so no nearest class. Check it before using a row's classes as
    /// indices (an index of −1 would panic, or in NumPy wrap to the last class). False for a row
    /// past the end (there is no prediction to use).
    pub fn is_empty_row(&self, row: usize) -> bool {
        row.checked_mul(self.k)
            .and_then(|at| self.classes.get(at))
            .is_some_and(|&c| c < 0)
    }

    /// Empties the given rows' predictions (class −1, score −∞ in every slot): rows of zeros,
    /// which have no direction and so no nearest class.
    pub(crate) fn clear_rows(&mut self, rows: &[usize]) {
        let k = self.k;
        for &row in rows {
            self.classes[row * k..(row + 1) * k].fill(-1);
            self.scores[row * k..(row + 1) * k].fill(f32::NEG_INFINITY);
        }
    }

    /// Checks what the metrics rely on (the fields are public, so a prediction may come from
    /// elsewhere): `k` between 1 and [`TOP_K_MAX`], as every prediction of this crate, and
    /// `classes` (and `scores`, when not empty) holding `rows × k` values. Returns the rows.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] naming what does not fit.
    pub fn check_shape(&self) -> Result<usize> {
        if self.k == 0 || self.k > TOP_K_MAX {
            return Err(PfcError::Shape(format!(
                "a prediction of k = {} classes per row; 1 to {TOP_K_MAX} expected",
                self.k
            )));
        }
        if !self.classes.len().is_multiple_of(self.k) {
            return Err(PfcError::Shape(format!(
                "a prediction of {} classes is not rows × k = {}",
                self.classes.len(),
                self.k
            )));
        }
        if !self.scores.is_empty() && self.scores.len() != self.classes.len() {
            return Err(PfcError::Shape(format!(
                "a prediction of {} classes and {} scores",
                self.classes.len(),
                self.scores.len()
            )));
        }
        Ok(self.rows())
    }

    /// Top-j accuracy for j = 1 ..= k against one true class per row (element j − 1): the
    /// fraction of rows whose class is among their first j predictions. With one label per
    /// row, top-1 accuracy is precision@1 and top-k accuracy is recall@k. In a job of k ranks
    /// each rank's `Prediction` holds its own rows: for the job's accuracy, multiply by the
    /// rank's row count and sum over ranks (e.g. `Collective::all_reduce_f32` of the hits and
    /// the rows); a prediction of no rows gives zeros, which weigh nothing in that sum. Labels
    /// that are not classes of the classifier (−1, ≥ C) count as misses.
    ///
    /// ```
    /// use partial_fc::Prediction;
    /// let p = Prediction { k: 2, classes: vec![3, 1, 5, 0], scores: vec![0.9, 0.2, 0.8, 0.1] };
    /// assert_eq!(p.top_accuracy(&[3, 0]).unwrap(), vec![0.5, 1.0]);
    /// ```
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when `labels` does not hold one class per row, or the prediction is
    /// malformed (see [`check_shape`](Self::check_shape)).
    pub fn top_accuracy(&self, labels: &[i64]) -> Result<Vec<f64>> {
        let rows = self.check_shape()?;
        if labels.len() != rows {
            return Err(PfcError::Shape(format!(
                "{} labels for a prediction of {rows} rows",
                labels.len()
            )));
        }
        let mut hits = vec![0u64; self.k];
        for (row, &label) in labels.iter().enumerate().filter(|(_, &l)| l >= 0) {
            if let Some(j) = self.row(row).iter().position(|&c| c == label) {
                hits[j] += 1;
            }
        }
        let mut seen = 0;
        Ok(hits
            .into_iter()
            .map(|h| {
                seen += h;
                seen as f64 / rows.max(1) as f64
            })
            .collect())
    }
}

/// Whether (`a`, `ia`) comes before (`b`, `ib`): the higher cosine, then the smaller class id.
fn first(a: (f32, i64), b: (f32, i64)) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    if a.0 > b.0 || (a.0 == b.0 && a.1 < b.1) {
        Less
    } else if b.0 > a.0 || (a.0 == b.0 && b.1 < a.1) {
        Greater
    } else {
        Equal
    }
}

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// For each of this rank's embeddings (`rows × dim`, rows up to `batch_per_rank`), the `k`
    /// classes of the whole classifier (every rank's shard) whose centers have the highest
    /// cosine with it. Every rank calls it together, each with its own rows (as
    /// `forward_backward`); the checks and the refusal of bad input are the same (a rank's bad
    /// row stops every rank), `k` must be the same on every rank, between 1 and
    /// min([`TOP_K_MAX`], num_classes). Weights, momentum, the step counter and a pending
    /// gradient are left as they are. A class center that is not finite (training diverged)
    /// fails the call on every rank with [`PfcError::Diverged`] naming it, rather than
    /// answering with the nearest of the finite classes.
    ///
    /// Memory: each call allocates its scratch on the backend, all of it before the ranks agree
    /// to run (so a rank short of memory refuses with the others) and sized for a full batch,
    /// `M = batch_per_rank × world` rows, whatever rows are passed: a chunk of at most 4,096
    /// normalized centers, about 64 MiB of cosines (`chunk × M`), and the candidates exchanged
    /// between ranks, `world × M × k` scores (f32) and ids (i64). It is freed on return.
    ///
    /// ```
    /// use partial_fc::{collective::SingleRank, CpuBackend, LayerConfig, PartialFc};
    /// let mut layer = PartialFc::new(LayerConfig::new(1000, 16, 4), CpuBackend, SingleRank).unwrap();
    /// // An embedding equal to class 42's center is nearest to class 42.
    /// let w = layer.weight().unwrap();
    /// let top = layer.predict_top_k(&w[42 * 16..43 * 16], 3).unwrap();
    /// assert_eq!(top.row(0)[0], 42);
    /// assert!((top.scores[0] - 1.0).abs() < 1e-5);
    /// ```
    ///
    /// # Errors
    ///
    /// On every rank alike, with nothing changed: [`PfcError::Param`] for a `k` outside
    /// 1 ..= min(num_classes, `TOP_K_MAX`), [`PfcError::Shape`] for embeddings that are not
    /// whole rows or more rows than `batch_per_rank`, [`PfcError::NonFinite`] for a NaN or
    /// infinite value and [`PfcError::OutOfRange`] for a row whose sum of squares overflows or
    /// that the wire cannot carry (as `forward_backward`; a row of zeros, which training refuses,
    /// gets an empty prediction here: classes −1, scores −∞), [`PfcError::Collective`] when a
    /// rank refused or made another call;
    /// [`PfcError::Diverged`] for a class center that is not finite. A collective or device
    /// error after the ranks agreed breaks the group.
    pub fn predict_top_k(&mut self, embeddings: &[f32], k: usize) -> Result<Prediction> {
        let out = self.predict_top_k_inner(embeddings, k);
        // As for a training pass, but the pending gradient, which prediction does not touch,
        // stays.
        self.abort_after_agreement(&out, "prediction");
        out
    }

    /// [`PartialFc::predict_top_k`] for any number of rows: this rank's rows go through in
    /// chunks of `batch_per_rank`, and the ranks first agree on the number of chunks (an
    /// agreement of its own, as a pass's), so each rank may pass a different number of rows,
    /// none included; a rank with fewer chunks passes empty ones. Every rank calls it together,
    /// with the same `k`.
    ///
    /// ```
    /// use partial_fc::{collective::SingleRank, CpuBackend, LayerConfig, PartialFc};
    /// let mut layer = PartialFc::new(LayerConfig::new(1000, 16, 4), CpuBackend, SingleRank).unwrap();
    /// // 10 rows, more than the 4 of a batch: each is a class center, nearest to itself.
    /// let w = layer.weight().unwrap();
    /// let top = layer.predict_top_k_all(&w[..10 * 16], 1).unwrap();
    /// assert_eq!(top.classes, (0..10).collect::<Vec<i64>>());
    /// ```
    ///
    /// # Errors
    ///
    /// Those of [`predict_top_k`](Self::predict_top_k), and [`PfcError::Shape`] on every rank
    /// for more than 2^24 chunks on a rank. `k` and whole rows are checked before the ranks
    /// agree, also where no rank passes a row.
    pub fn predict_top_k_all(&mut self, embeddings: &[f32], k: usize) -> Result<Prediction> {
        let d = self.config.dim.max(1);
        let n = self.config.batch_per_rank.max(1);
        let rows = embeddings.len() / d;
        // The ranks learn each other's chunk count through an agreement of its own, so that a
        // rank making another call (a pass, a single predict_top_k) is refused by name with
        // the group kept, instead of pairing this exchange with that call's collectives.
        let chunks = rows.div_ceil(n);
        // k is checked here too: with no rows on any rank no chunk would check it, and the
        // result is sized by it.
        let own = self.check_k(k).or_else(|| {
            if !embeddings.len().is_multiple_of(d) {
                // Refused here, with the others: a partial row is no chunk, so with no rows
                // elsewhere no chunk's own check would ever run on every rank.
                Some(PfcError::Shape(format!(
                    "embeddings hold {} values, not a multiple of dim {d}",
                    embeddings.len()
                )))
            } else {
                (chunks > 1 << 24).then(|| {
                    PfcError::Shape(format!(
                        "predict_top_k_all: {chunks} chunks of {n} rows, more than 2^24"
                    ))
                })
            }
        });
        let counts = self.agree(own, chunks as u32, Call::PredictAll { k })?;
        let most = counts.iter().copied().max().unwrap_or(0);
        let mut all = Prediction {
            k,
            classes: Vec::with_capacity(rows * k),
            scores: Vec::with_capacity(rows * k),
        };
        for c in 0..most as usize {
            let from = (c * n).min(rows);
            let to = ((c + 1) * n).min(rows);
            let part = self.predict_top_k(&embeddings[from * d..to * d], k)?;
            all.classes.extend(part.classes);
            all.scores.extend(part.scores);
        }
        Ok(all)
    }

    fn predict_top_k_inner(&mut self, embeddings: &[f32], k: usize) -> Result<Prediction> {
        let d = self.config.dim;
        let rows = embeddings.len() / d.max(1);
        let own = self
            .check_complete()
            .err()
            .or_else(|| self.check_prediction_input(embeddings, rows, k));
        // The scratch is allocated before the agreement, so that a rank without the memory for
        // it refuses with the others instead of leaving them waiting in a collective.
        let (scratch, own) = match own {
            Some(e) => (None, Some(e)),
            None => match self.alloc_prediction_scratch(k) {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(e)),
            },
        };
        let real_rows = self.agree_on_input(own, rows, Call::Predict { k })?;
        self.mid_pass = true;
        let Some(mut s) = scratch else {
            // Unreachable: agree_on_input returns an error whenever a rank (this one included)
            // refused; kept as an error rather than a panic.
            return Err(PfcError::Collective(
                "predict_top_k: the agreement passed without scratch".into(),
            ));
        };
        if real_rows == 0 {
            return Ok(Prediction {
                k,
                classes: Vec::new(),
                scores: Vec::new(),
            });
        }
        self.gather_rows(embeddings, &vec![0; rows])?;

        let n = self.config.batch_per_rank;
        let world = self.comm.world_size();
        let m = n * world;
        let shard_len = self.shard.len as usize;
        let b = &self.backend;
        b.class_top_k(
            &self.bufs.weight,
            shard_len,
            d,
            &self.bufs.x_hat,
            m,
            k,
            &mut s.chunk_weights,
            &mut s.chunk_cosines,
            &mut s.top_scores,
            &mut s.top_ids,
        )?;
        let start = self.shard.start as i64;
        let ids: Vec<i64> = b
            .download(&s.top_ids, m * k)?
            .into_iter()
            .map(|id| if id < 0 { -1 } else { start + i64::from(id) })
            .collect();
        b.upload(&ids, &mut s.send_ids)?;
        self.comm
            .all_gather(b, &s.top_scores, m * k, &mut s.all_scores)?;
        self.comm
            .all_gather(b, &s.send_ids, m * k, &mut s.all_ids)?;
        let all_scores = b.download(&s.all_scores, world * m * k)?;
        let all_ids = b.download(&s.all_ids, world * m * k)?;

        // This rank's rows are gathered rows rank·N ..; each takes the best k of every rank's k.
        let first_row = self.comm.rank() * n;
        let mut classes = vec![-1i64; rows * k];
        let mut scores = vec![f32::NEG_INFINITY; rows * k];
        classes
            .par_chunks_mut(k)
            .zip(scores.par_chunks_mut(k))
            .enumerate()
            .for_each(|(i, (classes, scores))| {
                let row = first_row + i;
                let mut candidates: Vec<(f32, i64)> = (0..world)
                    .flat_map(|q| {
                        let at = (q * m + row) * k;
                        (at..at + k).map(|j| (all_scores[j], all_ids[j]))
                    })
                    .filter(|&(_, id)| id >= 0)
                    .collect();
                candidates.sort_unstable_by(|&a, &b| first(a, b));
                for (slot, (s, c)) in candidates.into_iter().take(k).enumerate() {
                    scores[slot] = s;
                    classes[slot] = c;
                }
            });
        // A center that is not finite (or whose norm overflows) scores NOT_FINITE_SCORE with
        // every gathered row, padding included, so it is in every rank's all_scores, which are
        // the same everywhere: every rank refuses alike, a rank without rows too. The
        // collectives are done and agreed, so the group stays whole (as after an agreed
        // refusal): a load_resharded can repair the layer.
        if let Err(diverged) = refuse_diverged(&all_scores, &all_ids) {
            self.mid_pass = false;
            return Err(diverged);
        }
        let mut prediction = Prediction { k, classes, scores };
        prediction.clear_rows(&zero_rows(embeddings, d, self.config.wire));
        Ok(prediction)
    }

    /// Every device buffer a prediction of `k` classes per row needs (called after
    /// `check_prediction_input` accepted `k`).
    fn alloc_prediction_scratch(&self, k: usize) -> Result<Scratch<B>> {
        let (d, world) = (self.config.dim, self.comm.world_size());
        let m = self.config.batch_per_rank * world;
        let chunk = CHUNK
            .min(COSINES_MAX / m.max(1))
            .min(self.shard.len as usize)
            .max(1);
        let b = &self.backend;
        Ok(Scratch {
            chunk_weights: b.alloc(chunk * d)?,
            chunk_cosines: b.alloc(chunk * m)?,
            top_scores: b.alloc(m * k)?,
            top_ids: b.alloc(m * k)?,
            send_ids: b.alloc(m * k)?,
            all_scores: b.alloc(world * m * k)?,
            all_ids: b.alloc(world * m * k)?,
        })
    }

    /// This rank's reason to refuse a prediction, if any (before any rank does anything).
    /// `k` lies in 1 ..= min(num_classes, [`TOP_K_MAX`]).
    fn check_k(&self, k: usize) -> Option<PfcError> {
        let limit = self.config.num_classes.min(TOP_K_MAX as u64) as usize;
        (k == 0 || k > limit).then(|| {
            PfcError::param(
                "k",
                k,
                format!(
                    "must be between 1 and {limit} (the smaller of the number of classes and \
                     TOP_K_MAX = {TOP_K_MAX})"
                ),
            )
        })
    }

    fn check_prediction_input(
        &self,
        embeddings: &[f32],
        rows: usize,
        k: usize,
    ) -> Option<PfcError> {
        let d = self.config.dim;
        if let Some(e) = self.check_k(k) {
            return Some(e);
        }
        if embeddings.len() != rows * d {
            return Some(PfcError::Shape(format!(
                "embeddings hold {} values, not a multiple of dim {d}",
                embeddings.len()
            )));
        }
        if rows > self.config.batch_per_rank {
            return Some(PfcError::Shape(format!(
                "{rows} rows; this layer takes at most {} per rank",
                self.config.batch_per_rank
            )));
        }
        let wire = self.config.wire;
        embeddings
            .par_chunks(d.max(1))
            .enumerate()
            .find_map_first(|(row, x)| prediction_row_error(row, x, wire))
    }
}
