//! Hard-negative scores (CPU reference of `cuda/sampling.cu`'s `class_max_cosine`).

use super::gemm::gemm_nt;
use super::normalize::normalize_rows;
use crate::error::{PfcError, Result};
use rayon::prelude::*;

/// Per class of the shard, its best cosine against any of the `rows` normalized embeddings,
/// computed `chunk_weights.len() / dim` classes at a time so the full `rows × shard` matrix is
/// never held. Rows labelled −1 are the padding of a ragged batch (zero embeddings, cosine 0)
/// and do not count: with them a class whose real best cosine is negative would score 0.
///
/// With `dim = 0` there is nothing to score and `scores` is left as it is (as on CUDA).
///
/// # Errors
///
/// [`PfcError::Shape`] when a buffer is shorter than its shape (a scratch buffer must hold at
/// least one class) or a shape overflows `usize`; nothing is written then.
#[allow(clippy::too_many_arguments)]
pub fn class_max_cosine(
    weight: &[f32],
    shard_len: usize,
    dim: usize,
    x_hat: &[f32],
    row_labels: &[i64],
    rows: usize,
    chunk_weights: &mut [f32],
    chunk_cosines: &mut [f32],
    scores: &mut [f32],
) -> Result<()> {
    let elems = |a: usize, b: usize, what: &str| {
        a.checked_mul(b).ok_or_else(|| {
            PfcError::Shape(format!(
                "class_max_cosine {what}: {a} × {b} elements overflow usize"
            ))
        })
    };
    let need = |len: usize, want: usize, what: &str| {
        if len < want {
            return Err(PfcError::Shape(format!(
                "class_max_cosine {what}: buffer of {len} elements, {want} needed"
            )));
        }
        Ok(())
    };
    need(weight.len(), elems(shard_len, dim, "weight")?, "weight")?;
    need(x_hat.len(), elems(rows, dim, "x_hat")?, "x_hat")?;
    need(row_labels.len(), rows, "row_labels")?;
    need(scores.len(), shard_len, "scores")?;
    if shard_len == 0 || dim == 0 {
        return Ok(());
    }
    let chunk = (chunk_weights.len() / dim)
        .min(chunk_cosines.len() / rows.max(1))
        .clamp(1, shard_len);
    let first = chunk.min(shard_len);
    need(chunk_weights.len(), first * dim, "chunk_weights")?;
    need(chunk_cosines.len(), first * rows, "chunk_cosines")?;
    let mut norms = vec![0.0f32; chunk];
    for start in (0..shard_len).step_by(chunk) {
        let len = chunk.min(shard_len - start);
        normalize_rows(&weight[start * dim..], len, dim, chunk_weights, &mut norms);
        gemm_nt(len, rows, dim, chunk_weights, x_hat, chunk_cosines)?;
        scores[start..start + len]
            .par_iter_mut()
            .zip(chunk_cosines[..len * rows].par_chunks(rows.max(1)))
            .for_each(|(s, cos)| {
                *s = cos
                    .iter()
                    .zip(&row_labels[..rows])
                    .filter(|(_, &label)| label >= 0)
                    .fold(f32::NEG_INFINITY, |m, (&c, _)| m.max(c))
            });
    }
    Ok(())
}
