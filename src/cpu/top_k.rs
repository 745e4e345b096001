//! The classes nearest to each embedding (CPU reference of `cuda/normalize.cu`'s `top_k_merge`):
//! prediction for extreme classification, where the classifier is the model.
//!
//! Order: higher cosine first, the smaller class id first among equal cosines (-0.0 equals
//! 0.0, as on a GPU). An empty slot is (−∞, −1); every class beats it. A NaN cosine scores
//! [`NOT_FINITE_SCORE`], above them all.

use super::gemm::gemm_nt;
use super::normalize::normalize_rows;
use crate::error::{PfcError, Result};
use rayon::prelude::*;

/// The largest k [`class_top_k`] (and its CUDA twin) take: 256, past the k of recall@100 that
/// extreme classification reports. The kernel keeps a row's running top k in shared memory and
/// reads it with one thread per slot, so k is at most its block's 256 threads.
pub const TOP_K_MAX: usize = 256;

/// The score a NaN cosine (a class center that is not finite) takes in the merge: above every
/// cosine, so that such a class comes first in every row and the caller can refuse the
/// prediction ([`PfcError::Diverged`]) instead of returning the nearest of the finite classes.
pub const NOT_FINITE_SCORE: f32 = 2.0;

/// [`PfcError::Diverged`] naming the first class that scored [`NOT_FINITE_SCORE`] in merged
/// results (`scores` and their global `classes`, side by side); `Ok` when none did.
pub fn refuse_diverged(scores: &[f32], classes: &[i64]) -> Result<()> {
    match scores.iter().position(|&s| s == NOT_FINITE_SCORE) {
        Some(j) => Err(PfcError::Diverged { class: classes[j] }),
        None => Ok(()),
    }
}

/// Whether (`a`, `ia`) comes before (`b`, `ib`).
pub fn beats(a: f32, ia: i32, b: f32, ib: i32) -> bool {
    a > b || (a == b && ia < ib)
}

/// Merges one chunk of cosines (`rows × len`, row-major; column j is class `chunk_start + j`)
/// into each row's running top k (`top_scores`, `top_ids`: `rows × k`, best first).
///
/// # Errors
///
/// [`PfcError::Shape`] when a buffer is shorter than its shape, `k` is 0 or above
/// [`TOP_K_MAX`], or the chunk's classes do not lie in `0 .. i32::MAX` (its end, one past the
/// last id, is an i32 too, as in the kernel's loop); nothing is written then.
pub fn top_k_merge(
    cosines: &[f32],
    rows: usize,
    len: usize,
    chunk_start: i32,
    k: usize,
    top_scores: &mut [f32],
    top_ids: &mut [i32],
) -> Result<()> {
    check_k(k)?;
    need(cosines.len(), rows.checked_mul(len), "cosines")?;
    need(top_scores.len(), rows.checked_mul(k), "top_scores")?;
    need(top_ids.len(), rows.checked_mul(k), "top_ids")?;
    if chunk_start < 0 || i32::try_from(len).map_or(true, |l| chunk_start.checked_add(l).is_none())
    {
        return Err(PfcError::Shape(format!(
            "top_k_merge: classes {chunk_start} .. {chunk_start} + {len} must lie in \
             0 .. i32::MAX (the chunk's end, one past its last id, must be an i32 too)"
        )));
    }
    if rows == 0 || len == 0 {
        return Ok(());
    }
    top_scores[..rows * k]
        .par_chunks_mut(k)
        .zip(top_ids[..rows * k].par_chunks_mut(k))
        .zip(cosines[..rows * len].par_chunks(len))
        .for_each(|((scores, ids), row)| {
            // Insertion into the sorted top k: a class that beats the k-th moves the weaker
            // ones down a slot. After the first few classes the k-th is hard to beat, so the
            // scan costs one comparison per class, with no allocation. (The GPU kernel, one block
            // per row, instead votes, then takes k block-wide best pairs: same result.)
            for (j, &c) in row.iter().enumerate() {
                let c = if c.is_nan() { NOT_FINITE_SCORE } else { c };
                let id = chunk_start + j as i32;
                if !beats(c, id, scores[k - 1], ids[k - 1]) {
                    continue;
                }
                let mut slot = k - 1;
                while slot > 0 && beats(c, id, scores[slot - 1], ids[slot - 1]) {
                    scores[slot] = scores[slot - 1];
                    ids[slot] = ids[slot - 1];
                    slot -= 1;
                }
                scores[slot] = c;
                ids[slot] = id;
            }
        });
    Ok(())
}

/// Per row of the `rows` normalized embeddings, the `k` classes of the shard whose normalized
/// center has the highest cosine with it (shard-local ids, −1 where the shard holds fewer than
/// k), computed `chunk_weights.len() / dim` classes at a time so that the `rows × shard` matrix
/// is never held.
///
/// # Errors
///
/// [`PfcError::Shape`] when a buffer is shorter than its shape (a scratch buffer must hold at
/// least one class) or `k` is 0 or above [`TOP_K_MAX`]; nothing is written then.
#[allow(clippy::too_many_arguments)]
pub fn class_top_k(
    weight: &[f32],
    shard_len: usize,
    dim: usize,
    x_hat: &[f32],
    rows: usize,
    k: usize,
    chunk_weights: &mut [f32],
    chunk_cosines: &mut [f32],
    top_scores: &mut [f32],
    top_ids: &mut [i32],
) -> Result<()> {
    check_k(k)?;
    need(weight.len(), shard_len.checked_mul(dim), "weight")?;
    need(x_hat.len(), rows.checked_mul(dim), "x_hat")?;
    need(top_scores.len(), rows.checked_mul(k), "top_scores")?;
    need(top_ids.len(), rows.checked_mul(k), "top_ids")?;
    i32::try_from(shard_len).map_err(|_| {
        PfcError::Shape(format!(
            "class_top_k: a shard of {shard_len} classes exceeds i32"
        ))
    })?;
    let chunk = chunk_len(
        chunk_weights.len(),
        chunk_cosines.len(),
        dim,
        rows,
        shard_len,
    );
    need(chunk_weights.len(), chunk.checked_mul(dim), "chunk_weights")?;
    need(
        chunk_cosines.len(),
        chunk.checked_mul(rows),
        "chunk_cosines",
    )?;
    top_scores[..rows * k].fill(f32::NEG_INFINITY);
    top_ids[..rows * k].fill(-1);
    if shard_len == 0 || rows == 0 || dim == 0 {
        return Ok(());
    }
    let mut scorer = ChunkScorer::new(x_hat, rows, dim, k, chunk_weights, chunk_cosines);
    for start in (0..shard_len).step_by(chunk) {
        let len = chunk.min(shard_len - start);
        scorer.merge(
            &weight[start * dim..(start + len) * dim],
            start,
            top_scores,
            top_ids,
        )?;
    }
    Ok(())
}

/// [`Backend::class_top_k`](crate::Backend::class_top_k)'s default: the batch, then a chunk
/// of the shard at a time (as many classes as the caller's device scratch holds, capped at
/// [`HOST_CHUNK_MAX`]) downloaded from `b` and scored on the host with the CPU reference.
/// Returns the top scores and shard-local ids (`rows × k`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn class_top_k_on_host<B: crate::Backend + ?Sized>(
    b: &B,
    weight: &B::Buf<f32>,
    shard_len: usize,
    dim: usize,
    x_hat: &B::Buf<f32>,
    rows: usize,
    k: usize,
    scratch: (usize, usize),
) -> Result<(Vec<f32>, Vec<i32>)> {
    check_k(k)?;
    let top = rows
        .checked_mul(k)
        .ok_or_else(|| PfcError::Shape("class_top_k: rows × k overflows usize".into()))?;
    let (mut scores, mut ids) = (vec![f32::NEG_INFINITY; top], vec![-1i32; top]);
    if shard_len == 0 || rows == 0 || dim == 0 {
        return Ok((scores, ids));
    }
    i32::try_from(shard_len).map_err(|_| {
        PfcError::Shape(format!(
            "class_top_k: a shard of {shard_len} classes exceeds i32"
        ))
    })?;
    let chunk = chunk_len(scratch.0, scratch.1, dim, rows, shard_len).min(HOST_CHUNK_MAX);
    let x = b.download(x_hat, rows * dim)?;
    let (mut cw, mut cc) = (vec![0f32; chunk * dim], vec![0f32; chunk * rows]);
    let mut scorer = ChunkScorer::new(&x, rows, dim, k, &mut cw, &mut cc);
    for start in (0..shard_len).step_by(chunk) {
        let len = chunk.min(shard_len - start);
        let w = b.download_at(weight, start * dim, len * dim)?;
        scorer.merge(&w, start, &mut scores, &mut ids)?;
    }
    Ok((scores, ids))
}

/// Most classes a chunk of the host default holds (its host scratch is `chunk × (dim + rows)`
/// values, on top of the device scratch the caller allocated).
pub const HOST_CHUNK_MAX: usize = 4096;

/// One chunk's work, shared by [`class_top_k`] and the host default: normalize the chunk's
/// centers, score them against the batch (GEMM), merge the scores into the running top k.
struct ChunkScorer<'a> {
    x_hat: &'a [f32],
    rows: usize,
    dim: usize,
    k: usize,
    weights: &'a mut [f32],
    cosines: &'a mut [f32],
    norms: Vec<f32>,
}

impl<'a> ChunkScorer<'a> {
    fn new(
        x_hat: &'a [f32],
        rows: usize,
        dim: usize,
        k: usize,
        weights: &'a mut [f32],
        cosines: &'a mut [f32],
    ) -> Self {
        ChunkScorer {
            x_hat,
            rows,
            dim,
            k,
            weights,
            cosines,
            norms: Vec::new(),
        }
    }

    /// Merges the classes `start ..` whose raw centers are `chunk` (`len × dim`).
    fn merge(
        &mut self,
        chunk: &[f32],
        start: usize,
        top_scores: &mut [f32],
        top_ids: &mut [i32],
    ) -> Result<()> {
        let (rows, dim) = (self.rows, self.dim);
        let len = chunk.len() / dim;
        self.norms.resize(len, 0.0);
        normalize_rows(chunk, len, dim, self.weights, &mut self.norms);
        // cosines[rows × len] = x_hat[rows × dim] · weights[len × dim]ᵀ
        gemm_nt(rows, len, dim, self.x_hat, self.weights, self.cosines)?;
        top_k_merge(
            self.cosines,
            rows,
            len,
            start as i32,
            self.k,
            top_scores,
            top_ids,
        )
    }
}

/// Classes per chunk that both scratch buffers hold (at least 1, at most the shard).
pub fn chunk_len(weights: usize, cosines: usize, dim: usize, rows: usize, shard: usize) -> usize {
    (weights / dim.max(1))
        .min(cosines / rows.max(1))
        .clamp(1, shard.max(1))
}

/// `k` between 1 and [`TOP_K_MAX`], else a [`PfcError::Shape`].
pub(crate) fn check_k(k: usize) -> Result<()> {
    if k == 0 || k > TOP_K_MAX {
        return Err(PfcError::Shape(format!(
            "top k of {k}: k must be between 1 and {TOP_K_MAX}"
        )));
    }
    Ok(())
}

fn need(len: usize, want: Option<usize>, what: &str) -> Result<()> {
    match want {
        Some(w) if len >= w => Ok(()),
        Some(w) => Err(PfcError::Shape(format!(
            "class_top_k {what}: buffer of {len} elements, {w} needed"
        ))),
        None => Err(PfcError::Shape(format!(
            "class_top_k {what}: the shape overflows usize"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_cosine_comes_first_with_the_not_finite_score() {
        let cosines = [0.5, f32::NAN, 0.9, f32::NAN];
        let (mut scores, mut ids) = ([f32::NEG_INFINITY; 3], [-1i32; 3]);
        top_k_merge(&cosines, 1, 4, 10, 3, &mut scores, &mut ids).unwrap();
        assert_eq!(ids, [11, 13, 12]);
        assert_eq!(scores, [NOT_FINITE_SCORE, NOT_FINITE_SCORE, 0.9]);
    }

    #[test]
    fn merging_chunks_gives_the_sorted_top_k_with_ties_to_the_smaller_id() {
        // Row 0: 0.5 twice (ids 1 and 4: 1 first), -0.0 equal to 0.0 (id 2 before id 5).
        let all = [0.1f32, 0.5, -0.0, 0.3, 0.5, 0.0, -0.2];
        let (k, rows) = (4, 1);
        let mut scores = vec![f32::NEG_INFINITY; k];
        let mut ids = vec![-1; k];
        for (start, chunk) in [(0usize, &all[..3]), (3, &all[3..5]), (5, &all[5..])] {
            top_k_merge(
                chunk,
                rows,
                chunk.len(),
                start as i32,
                k,
                &mut scores,
                &mut ids,
            )
            .unwrap();
        }
        assert_eq!(ids, vec![1, 4, 3, 0]);
        assert_eq!(scores, vec![0.5, 0.5, 0.3, 0.1]);
        let mut scores = vec![f32::NEG_INFINITY; 6];
        let mut ids = vec![-1; 6];
        top_k_merge(&all[..2], 1, 2, 0, 6, &mut scores, &mut ids).unwrap();
        assert_eq!(
            ids,
            vec![1, 0, -1, -1, -1, -1],
            "empty slots stay (-inf, -1)"
        );
    }

    #[test]
    fn the_host_default_equals_the_cpu_backend() {
        let (shard, dim, rows, k) = (1000usize, 16usize, 9usize, 7usize);
        let w = crate::init::normal_rows(3, 0, shard, dim, 1.0);
        let x = crate::init::normal_rows(4, 0, rows, dim, 1.0);
        let (mut xh, mut xn) = (vec![0f32; rows * dim], vec![0f32; rows]);
        normalize_rows(&x, rows, dim, &mut xh, &mut xn);
        let (mut cw, mut cc) = (vec![0f32; shard * dim], vec![0f32; shard * rows]);
        let (mut scores, mut ids) = (vec![0f32; rows * k], vec![0i32; rows * k]);
        class_top_k(
            &w,
            shard,
            dim,
            &xh,
            rows,
            k,
            &mut cw,
            &mut cc,
            &mut scores,
            &mut ids,
        )
        .unwrap();
        // A scratch of 100 classes: ten chunks on the host.
        let host = class_top_k_on_host(
            &crate::CpuBackend,
            &w,
            shard,
            dim,
            &xh,
            rows,
            k,
            (100 * dim, 100 * rows),
        )
        .unwrap();
        assert_eq!(host, (scores, ids));
        assert!(host.1.iter().all(|&id| (0..shard as i32).contains(&id)));
    }

    proptest::proptest! {
        /// Merging any split of a row into chunks gives the brute-force top k: values from a
        /// small set (many ties, -0.0 beside 0.0, -inf), ties to the smaller id, empty slots
        /// (-inf, -1) only where the row has fewer than k classes above -inf.
        #[test]
        fn chunked_merges_equal_a_full_sort(
            codes in proptest::collection::vec(0u8..7, 1..200),
            cuts in proptest::collection::vec(1usize..50, 1..8),
            k in 1usize..12,
        ) {
            let value = |c: u8| [0.5f32, -0.0, 0.0, 0.25, -1.0, f32::NEG_INFINITY, 0.5][c as usize];
            let row: Vec<f32> = codes.iter().map(|&c| value(c)).collect();
            let mut scores = vec![f32::NEG_INFINITY; k];
            let mut ids = vec![-1i32; k];
            let mut start = 0;
            for cut in cuts.iter().cycle() {
                if start == row.len() {
                    break;
                }
                let end = (start + cut).min(row.len());
                top_k_merge(&row[start..end], 1, end - start, start as i32, k, &mut scores, &mut ids)
                    .unwrap();
                start = end;
            }
            let mut order: Vec<usize> = (0..row.len()).collect();
            // Written apart from `beats`: higher value first (-0.0 equal to 0.0), then the id.
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            // A class at -inf never beats an empty slot (-inf, -1): the merge leaves it out.
            let want: Vec<i32> = order
                .iter()
                .filter(|&&i| row[i] > f32::NEG_INFINITY)
                .take(k)
                .map(|&i| i as i32)
                .chain(std::iter::repeat(-1))
                .take(k)
                .collect();
            proptest::prop_assert_eq!(&ids, &want);
            for (slot, &id) in ids.iter().enumerate() {
                let expect = if id < 0 { f32::NEG_INFINITY } else { row[id as usize] };
                proptest::prop_assert_eq!(scores[slot].to_bits(), expect.to_bits());
            }
        }
    }

    #[test]
    fn bad_k_and_short_buffers_are_errors() {
        let mut s = vec![0.0; 4];
        let mut i = vec![0; 4];
        assert!(top_k_merge(&[0.0; 4], 1, 4, 0, 0, &mut s, &mut i).is_err());
        assert!(top_k_merge(&[0.0; 4], 1, 4, 0, TOP_K_MAX + 1, &mut s, &mut i).is_err());
        assert!(top_k_merge(&[0.0; 3], 1, 4, 0, 2, &mut s, &mut i).is_err());
        assert!(top_k_merge(&[0.0; 8], 2, 4, 0, 4, &mut s, &mut i).is_err());
        // Class ids past i32 (or negative) are refused, not wrapped.
        assert!(top_k_merge(&[0.0; 4], 1, 4, i32::MAX - 2, 2, &mut s, &mut i).is_err());
        assert!(top_k_merge(&[0.0; 4], 1, 4, -1, 2, &mut s, &mut i).is_err());
        assert!(top_k_merge(&[0.0; 4], 1, 4, i32::MAX - 4, 2, &mut s, &mut i).is_ok());
    }
}
