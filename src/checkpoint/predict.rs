//! Prediction straight from a run's checkpoint files: evaluate a saved classifier (precision@k
//! of an extreme classifier, closed-set identification) on one machine, on its CPU or one GPU,
//! without the world size that trained it. The class centers stream from the files a block at
//! a time (the next block is read while the current one is scored), so the classifier is never
//! held in memory: the host and the device hold the embeddings, one block of centers and the
//! scoring scratch.

use super::set::CheckpointSet;
use crate::backend::Backend;
use crate::cpu::normalize::normalize_rows;
use crate::cpu::top_k::{refuse_diverged, TOP_K_MAX};
use crate::error::{PfcError, Result};
use crate::layer::{prediction_row_error, zero_rows, Prediction};
use crate::plan::Dtype;
use crate::CpuBackend;
use rayon::prelude::*;

/// Cosines a scoring chunk aims at (64 MiB of f32): a chunk has `COSINES_MAX / rows` classes,
/// clamped to [`CHUNK_MIN`] ..= [`CHUNK_MAX`], so above 262,144 rows it holds more
/// (`rows × CHUNK_MIN` cosines).
const COSINES_MAX: usize = 1 << 24;
const CHUNK_MIN: usize = 64;
const CHUNK_MAX: usize = 4096;

/// Classes per block read from the files and scored on the backend. Small blocks keep the read
/// (which overlaps the scoring of the previous block) in cache: blocks of 64 MiB made the CPU
/// prediction twice as slow as blocks of 4096 classes (docs/benchmarks.md).
const BLOCK_CLASSES: u64 = 4096;

impl CheckpointSet {
    /// For each row of `embeddings` (`rows × dim`, f32), the `k` classes of the saved classifier
    /// whose centers have the highest cosine with it, best first, ties to the smaller class id,
    /// computed on the CPU from the files of every rank. It answers what
    /// [`PartialFc::predict_top_k`](crate::PartialFc::predict_top_k) answers on the layer that
    /// saved the files up to float rounding: the cosines come from GEMMs of other shapes (and
    /// the layer first rounds the embeddings to a 16-bit [`LayerConfig::wire`](crate::LayerConfig)
    /// if it has one), so scores may differ in their last bits and classes whose cosines are
    /// that close may swap places. Ties go to the smaller id only between bit-equal scores.
    /// `progress` gets the number of weight values read after each block
    /// (`num_classes × dim` in all). [`predict_top_k_on`](Self::predict_top_k_on) runs the
    /// scoring on another backend (a GPU).
    ///
    /// ```
    /// use partial_fc::checkpoint::CheckpointSet;
    /// use partial_fc::{collective::ThreadGroup, Collective, CpuBackend, LayerConfig, PartialFc};
    /// let dir = tempfile::tempdir().unwrap();
    /// let root = dir.path().to_path_buf();
    /// let weights = ThreadGroup::run(2, move |comm| {
    ///     let path = root.join(format!("rank{}.safetensors", comm.rank()));
    ///     let layer = PartialFc::new(LayerConfig::new(100, 8, 4), CpuBackend, comm).unwrap();
    ///     layer.save(&path).unwrap();
    ///     layer.weight().unwrap()
    /// });
    /// let paths: Vec<_> = (0..2).map(|r| dir.path().join(format!("rank{r}.safetensors"))).collect();
    /// let set = CheckpointSet::open(&paths).unwrap();
    /// // Class 70 lives in rank 1's file (its 20th row); its own center is nearest to it.
    /// let center = &weights[1][20 * 8..21 * 8];
    /// let top = set.predict_top_k(center, 3, &|_| {}).unwrap();
    /// assert_eq!(top.row(0)[0], 70);
    /// ```
    ///
    /// # Errors
    ///
    /// [`PfcError::Checkpoint`] when a rank's file is missing from the set or a stored value is
    /// not finite; [`PfcError::Param`] for `k` outside 1 ..= min([`TOP_K_MAX`], classes);
    /// [`PfcError::Shape`] when `embeddings` is not whole rows of `dim`;
    /// [`PfcError::NonFinite`] for a NaN or infinite embedding value and
    /// [`PfcError::OutOfRange`] for a row whose sum of squares overflows f32 (each names its
    /// row; a row of zeros is no error: it has no direction, so its prediction is empty,
    /// classes −1 and scores −∞, a miss for the metrics); [`PfcError::Diverged`] for a stored center whose sum of squares
    /// overflows f32 (a diverged run: finite values, no direction).
    pub fn predict_top_k(
        &self,
        embeddings: &[f32],
        k: usize,
        progress: &dyn Fn(u64),
    ) -> Result<Prediction> {
        self.predict_top_k_on(&CpuBackend, embeddings, k, progress)
    }

    /// [`predict_top_k`](Self::predict_top_k) with the scoring on `backend`
    /// ([`Backend::class_top_k`] over each block of centers uploaded to it); the files are read
    /// and the blocks' candidates merged on the host. With `cuda::CudaBackend` this evaluates a
    /// classifier of hundreds of millions of classes on one GPU, a block at a time.
    ///
    /// # Errors
    ///
    /// As [`predict_top_k`](Self::predict_top_k), and the backend's errors (device memory).
    pub fn predict_top_k_on<B: Backend>(
        &self,
        backend: &B,
        embeddings: &[f32],
        k: usize,
        progress: &dyn Fn(u64),
    ) -> Result<Prediction> {
        let block = BLOCK_CLASSES;
        self.predict_in_blocks(backend, embeddings, k, block, progress)
    }

    /// The prediction with blocks of `block` classes (tests use small ones).
    pub(crate) fn predict_in_blocks<B: Backend>(
        &self,
        b: &B,
        embeddings: &[f32],
        k: usize,
        block: u64,
        progress: &dyn Fn(u64),
    ) -> Result<Prediction> {
        self.require_complete()?;
        let (dim, classes) = (self.dim(), self.num_classes());
        let limit = classes.min(TOP_K_MAX as u64) as usize;
        if k == 0 || k > limit {
            return Err(PfcError::param(
                "k",
                k,
                format!(
                    "must be between 1 and {limit} (the smaller of the number of classes and \
                     TOP_K_MAX = {TOP_K_MAX})"
                ),
            ));
        }
        if !embeddings.len().is_multiple_of(dim) {
            return Err(PfcError::Shape(format!(
                "embeddings hold {} values, not a multiple of the classifier's dim {dim}",
                embeddings.len()
            )));
        }
        let rows = embeddings.len() / dim;
        // The layer's own row check for prediction (with no wire rounding: the rows stay f32
        // here): a sum of squares that overflows would score NaN. A row of zeros has no
        // direction: it normalizes to zeros, scores 0 everywhere, and its prediction is emptied
        // at the end.
        if let Some(err) = embeddings
            .par_chunks(dim)
            .enumerate()
            .find_map_first(|(row, x)| prediction_row_error(row, x, Dtype::F32))
        {
            return Err(err);
        }
        let mut best = Prediction {
            k,
            classes: vec![-1; rows * k],
            scores: vec![f32::NEG_INFINITY; rows * k],
        };
        if rows == 0 {
            return Ok(best);
        }
        // Blocks of at most i32::MAX classes: a block's ids are 32-bit on the backend, and
        // become 64-bit class ids in the merge on the host.
        let block = block.clamp(1, i32::MAX as u64).min(classes);
        let chunk = ((COSINES_MAX / rows).clamp(CHUNK_MIN, CHUNK_MAX) as u64).min(block) as usize;
        let (mut x_hat, mut norms) = (vec![0f32; rows * dim], vec![0f32; rows]);
        normalize_rows(embeddings, rows, dim, &mut x_hat, &mut norms);
        let mut x_dev = b.alloc::<f32>(rows * dim)?;
        b.upload(&x_hat, &mut x_dev)?;
        drop(x_hat);
        let mut weights = b.alloc::<f32>(block as usize * dim)?;
        let mut chunk_weights = b.alloc::<f32>(chunk * dim)?;
        let mut chunk_cosines = b.alloc::<f32>(chunk * rows)?;
        let mut top_scores = b.alloc::<f32>(rows * k)?;
        let mut top_ids = b.alloc::<i32>(rows * k)?;

        let blocks: Vec<(u64, u64)> = (0..classes.div_ceil(block))
            .map(|i| (i * block, block.min(classes - i * block)))
            .collect();
        let read = |&(first, len): &(u64, u64)| self.read("weight", first, 0, len as usize * dim);
        let Some(first_block) = blocks.first() else {
            return Ok(best); // no classes (k >= 1 already refused that)
        };
        let mut centers = read(first_block)?;
        for (i, &(first, len)) in blocks.iter().enumerate() {
            // The next block is read from the files while this one is uploaded and scored.
            let (scored, next) = std::thread::scope(|scope| {
                let reader = blocks.get(i + 1).map(|c| scope.spawn(|| read(c)));
                let scored = b
                    .upload(&centers, &mut weights)
                    .and_then(|()| {
                        b.class_top_k(
                            &weights,
                            len as usize,
                            dim,
                            &x_dev,
                            rows,
                            k,
                            &mut chunk_weights,
                            &mut chunk_cosines,
                            &mut top_scores,
                            &mut top_ids,
                        )
                    })
                    .and_then(|()| {
                        Ok((
                            b.download(&top_scores, rows * k)?,
                            b.download(&top_ids, rows * k)?,
                        ))
                    });
                let next =
                    reader.map(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
                (scored, next)
            });
            let (scores, ids) = scored?;
            merge_block(&mut best, first, &scores, &ids);
            progress(len * dim as u64);
            match next {
                Some(next) => centers = next?,
                None => break,
            }
        }
        // A stored center whose norm overflows f32 (finite values, a diverged run) scores NaN,
        // which the merge ranks first as NOT_FINITE_SCORE.
        refuse_diverged(&best.scores, &best.classes)?;
        best.clear_rows(&zero_rows(embeddings, dim, Dtype::F32));
        Ok(best)
    }
}

/// Merges a block's top k (ids relative to `first`, −1 for an empty slot) into the result:
/// each row keeps the best k of both, higher cosine first, then the smaller class id (−0.0 and
/// 0.0 equal, as in the merge on the device).
fn merge_block(best: &mut Prediction, first: u64, scores: &[f32], ids: &[i32]) {
    let k = best.k;
    best.classes
        .par_chunks_mut(k)
        .zip(best.scores.par_chunks_mut(k))
        .zip(scores.par_chunks(k).zip(ids.par_chunks(k)))
        .for_each(|((classes, best_scores), (scores, ids))| {
            let kept = best_scores.iter().copied().zip(classes.iter().copied());
            let new = scores
                .iter()
                .copied()
                .zip(ids.iter().copied())
                .filter(|&(_, id)| id >= 0)
                .map(|(s, id)| (s, first as i64 + i64::from(id)));
            let mut candidates: Vec<(f32, i64)> =
                kept.filter(|&(_, id)| id >= 0).chain(new).collect();
            candidates.sort_unstable_by(|a, b| {
                b.0.partial_cmp(&a.0)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.1.cmp(&b.1))
            });
            for (slot, (s, c)) in candidates.into_iter().take(k).enumerate() {
                best_scores[slot] = s;
                classes[slot] = c;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ThreadGroup;
    use crate::{Collective, LayerConfig, PartialFc};

    /// A 3-rank run of 1000 classes (d 12), saved; returns the set.
    fn saved_run(dir: &std::path::Path) -> CheckpointSet {
        let root = dir.to_path_buf();
        ThreadGroup::run(3, move |comm| {
            let path = root.join(format!("rank{}.safetensors", comm.rank()));
            let layer = PartialFc::new(LayerConfig::new(1000, 12, 4), CpuBackend, comm).unwrap();
            layer.save(&path).unwrap();
        });
        let paths: Vec<_> = (0..3)
            .map(|r| dir.join(format!("rank{r}.safetensors")))
            .collect();
        CheckpointSet::open(&paths).unwrap()
    }

    #[test]
    fn small_blocks_give_the_same_top_k_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let set = saved_run(dir.path());
        let x = crate::init::normal_rows(9, 0, 37, 12, 1.0);
        let read = std::sync::atomic::AtomicU64::new(0);
        let one = set
            .predict_in_blocks(&CpuBackend, &x, 9, 1 << 20, &|n| {
                read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            })
            .unwrap();
        assert_eq!(
            read.into_inner(),
            1000 * 12,
            "progress counts every value once"
        );
        // Blocks of 7 and 333 classes: chunks and blocks end at other classes, and empty
        // slots (a block of fewer than k classes) must not enter the result.
        for block in [7, 333] {
            let many = set
                .predict_in_blocks(&CpuBackend, &x, 9, block, &|_| {})
                .unwrap();
            assert_eq!(many, one, "block {block}");
        }
        assert!(one.classes.iter().all(|&c| (0..1000).contains(&c)));
        for row in one.scores.chunks(9) {
            assert!(row.windows(2).all(|w| w[0] >= w[1]), "best first: {row:?}");
        }
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let set = saved_run(dir.path());
        let x = vec![0.5f32; 24];
        assert!(matches!(
            set.predict_top_k(&x, 0, &|_| {}),
            Err(PfcError::Param { .. })
        ));
        assert!(matches!(
            set.predict_top_k(&x, TOP_K_MAX + 1, &|_| {}),
            Err(PfcError::Param { .. })
        ));
        assert!(matches!(
            set.predict_top_k(&x[..23], 1, &|_| {}),
            Err(PfcError::Shape(_))
        ));
        let mut bad = x.clone();
        bad[17] = f32::NAN;
        assert!(matches!(
            set.predict_top_k(&bad, 1, &|_| {}),
            Err(PfcError::NonFinite { row: 1, .. })
        ));
        // The layer's row checks: a row whose sum of squares overflows f32 would score NaN; a
        // zero row has no direction, so its prediction is empty, the other rows' unchanged.
        let mut zero = x.clone();
        zero[12..].fill(0.0);
        let got = set.predict_top_k(&zero, 2, &|_| {}).unwrap();
        let want = set.predict_top_k(&x, 2, &|_| {}).unwrap();
        assert_eq!(got.row(0), want.row(0));
        assert_eq!(got.row(1), &[-1, -1]);
        assert_eq!(&got.scores[2..], &[f32::NEG_INFINITY; 2]);
        let mut huge = x.clone();
        huge[..12].fill(f32::MAX / 4.0);
        assert!(matches!(
            set.predict_top_k(&huge, 1, &|_| {}),
            Err(PfcError::OutOfRange { row: 0, .. })
        ));
        let part = CheckpointSet::open(&[dir.path().join("rank1.safetensors")]).unwrap();
        let err = part.predict_top_k(&x, 1, &|_| {}).unwrap_err().to_string();
        assert!(err.contains("ranks 0, 2"), "{err}");
        let empty = set.predict_top_k(&[], 4, &|_| {}).unwrap();
        assert!(empty.classes.is_empty() && empty.scores.is_empty());
    }
}
