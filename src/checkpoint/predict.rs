//! Prediction straight from a run's checkpoint files, on the host: evaluate a saved classifier
//! (precision@k of an extreme classifier, closed-set identification) on one machine, without
//! the GPUs or the world size that trained it. The class centers stream from the files a chunk
//! at a time, so the classifier is never held in memory: the host holds the embeddings, one
//! chunk of centers and its cosines.

use super::set::CheckpointSet;
use crate::cpu::normalize::normalize_rows;
use crate::cpu::top_k::{check_k, ChunkScorer, TOP_K_MAX};
use crate::error::{PfcError, Result};
use crate::layer::Prediction;
use rayon::prelude::*;

/// Most cosines a chunk holds (64 MiB of f32); a chunk has between [`CHUNK_MIN`] and
/// [`CHUNK_MAX`] classes within that bound.
const COSINES_MAX: usize = 1 << 24;
const CHUNK_MIN: usize = 64;
const CHUNK_MAX: usize = 4096;

/// Classes scored with 32-bit ids before their top k join the result with 64-bit ids: the merge
/// keeps ids in i32 (as the GPU kernel), and a classifier may have more classes than that.
const SEGMENT: u64 = 1 << 30;

impl CheckpointSet {
    /// For each row of `embeddings` (`rows × dim`, f32), the `k` classes of the saved classifier
    /// whose centers have the highest cosine with it, best first, ties to the smaller class id:
    /// the same answer as [`PartialFc::predict_top_k`](crate::PartialFc::predict_top_k) on the
    /// layer that saved the files, computed on the host from the files of every rank.
    /// `progress` gets the number of weight values read after each chunk
    /// (`num_classes × dim` in all).
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
    /// [`PfcError::NonFinite`] for a NaN or infinite embedding value (its row named).
    pub fn predict_top_k(
        &self,
        embeddings: &[f32],
        k: usize,
        progress: &dyn Fn(u64),
    ) -> Result<Prediction> {
        self.predict_in_segments(embeddings, k, SEGMENT, progress)
    }

    /// [`predict_top_k`](Self::predict_top_k) with segments of `segment` classes (tests use
    /// small ones to cover the 64-bit merge).
    pub(crate) fn predict_in_segments(
        &self,
        embeddings: &[f32],
        k: usize,
        segment: u64,
        progress: &dyn Fn(u64),
    ) -> Result<Prediction> {
        self.require_complete()?;
        let (dim, classes) = (self.dim(), self.num_classes());
        let limit = classes.min(TOP_K_MAX as u64) as usize;
        if k == 0 || k > limit {
            return Err(PfcError::param(
                "k",
                k,
                format!("must be between 1 and {limit} (the classes, at most {TOP_K_MAX})"),
            ));
        }
        check_k(k)?;
        if !embeddings.len().is_multiple_of(dim) {
            return Err(PfcError::Shape(format!(
                "embeddings hold {} values, not a multiple of the classifier's dim {dim}",
                embeddings.len()
            )));
        }
        let rows = embeddings.len() / dim;
        if let Some((row, value)) = embeddings
            .par_chunks(dim)
            .enumerate()
            .find_map_first(|(row, x)| x.iter().find(|v| !v.is_finite()).map(|&v| (row, v)))
        {
            return Err(PfcError::NonFinite { row, value });
        }
        let mut best = Prediction {
            k,
            classes: vec![-1; rows * k],
            scores: vec![f32::NEG_INFINITY; rows * k],
        };
        if rows == 0 {
            return Ok(best);
        }
        let (mut x_hat, mut norms) = (vec![0f32; rows * dim], vec![0f32; rows]);
        normalize_rows(embeddings, rows, dim, &mut x_hat, &mut norms);
        let chunk = (COSINES_MAX / rows).clamp(CHUNK_MIN, CHUNK_MAX) as u64;
        let chunk = chunk.min(classes).min(segment.max(1));
        let (mut weights, mut cosines) = (
            vec![0f32; chunk as usize * dim],
            vec![0f32; chunk as usize * rows],
        );
        let mut scorer = ChunkScorer::new(&x_hat, rows, dim, k, &mut weights, &mut cosines);
        let (mut top_scores, mut top_ids) = (vec![0f32; rows * k], vec![0i32; rows * k]);
        // (segment's first class, chunk's offset in it, classes), in class order.
        let segment = segment.clamp(1, i32::MAX as u64);
        let chunks: Vec<(u64, u64, u64)> = (0..classes.div_ceil(segment))
            .flat_map(|s| {
                let (first, len) = (s * segment, segment.min(classes - s * segment));
                (0..len.div_ceil(chunk))
                    .map(move |c| (first, c * chunk, chunk.min(len - c * chunk)))
            })
            .collect();
        let read = |&(first, at, n): &(u64, u64, u64)| {
            self.read("weight", first + at, 0, n as usize * dim)
        };
        top_scores.fill(f32::NEG_INFINITY);
        top_ids.fill(-1);
        let Some(first_chunk) = chunks.first() else {
            return Ok(best); // no classes (k >= 1 already refused that)
        };
        let mut centers = read(first_chunk)?;
        for (i, &(first, at, n)) in chunks.iter().enumerate() {
            // The next chunk is read from the files while this one is scored.
            let (merged, next) = std::thread::scope(|scope| {
                let reader = chunks.get(i + 1).map(|c| scope.spawn(|| read(c)));
                let merged = scorer.merge(&centers, at as usize, &mut top_scores, &mut top_ids);
                let next =
                    reader.map(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
                (merged, next)
            });
            merged?;
            progress(n * dim as u64);
            if at + n == segment.min(classes - first) {
                merge_segment(&mut best, first, &top_scores, &top_ids);
                top_scores.fill(f32::NEG_INFINITY);
                top_ids.fill(-1);
            }
            match next {
                Some(next) => centers = next?,
                None => break,
            }
        }
        Ok(best)
    }
}

/// Merges a segment's top k (ids relative to `first`, −1 for an empty slot) into the result:
/// each row keeps the best k of both, higher cosine first, then the smaller class id (−0.0 and
/// 0.0 equal, as in the merge on the device).
fn merge_segment(best: &mut Prediction, first: u64, scores: &[f32], ids: &[i32]) {
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
    use crate::{Collective, CpuBackend, LayerConfig, PartialFc};

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
    fn small_segments_give_the_same_top_k_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let set = saved_run(dir.path());
        let x = crate::init::normal_rows(9, 0, 37, 12, 1.0);
        let read = std::sync::atomic::AtomicU64::new(0);
        let one = set
            .predict_in_segments(&x, 9, SEGMENT, &|n| {
                read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            })
            .unwrap();
        assert_eq!(
            read.into_inner(),
            1000 * 12,
            "progress counts every value once"
        );
        // Segments of 7 and 333 classes: chunks and segments end at other classes, and empty
        // slots (a segment of fewer than k classes) must not enter the result.
        for segment in [7, 333] {
            let many = set.predict_in_segments(&x, 9, segment, &|_| {}).unwrap();
            assert_eq!(many, one, "segment {segment}");
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
        let part = CheckpointSet::open(&[dir.path().join("rank1.safetensors")]).unwrap();
        let err = part.predict_top_k(&x, 1, &|_| {}).unwrap_err().to_string();
        assert!(err.contains("ranks 0, 2"), "{err}");
        let empty = set.predict_top_k(&[], 4, &|_| {}).unwrap();
        assert!(empty.classes.is_empty() && empty.scores.is_empty());
    }
}
