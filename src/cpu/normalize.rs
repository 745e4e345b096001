//! Row L2 normalization and its backward pass (CPU references of `cuda/normalize.cu`).

use super::simd::dot;
use rayon::prelude::*;

/// Smallest norm divided by, as in `torch.nn.functional.normalize` (eps = 1e-12).
pub const NORM_EPS: f32 = 1e-12;

/// 1 / `norm` for an L2 normalization, NaN where the norm overflowed: a row whose sum of squares
/// passes f32's range (a diverged class center) would otherwise normalize to zeros, cosine 0
/// with everything, and hide the divergence; NaN shows in the loss and refuses a prediction
/// ([`crate::PfcError::Diverged`]). Embeddings never get here: the layer refuses such rows.
pub(crate) fn inv_norm(norm: f32) -> f32 {
    if norm < f32::INFINITY {
        1.0 / norm
    } else {
        f32::NAN
    }
}

fn normalize_into(src: &[f32], dst: &mut [f32]) -> f32 {
    let norm = dot(src, src).sqrt().max(NORM_EPS);
    let inv = inv_norm(norm);
    for (o, v) in dst.iter_mut().zip(src) {
        *o = v * inv;
    }
    norm
}

/// `out[i] = x[i] / ‖x[i]‖` for `rows` rows of `dim`; norms kept for the backward pass.
pub fn normalize_rows(x: &[f32], rows: usize, dim: usize, out: &mut [f32], norms: &mut [f32]) {
    out[..rows * dim]
        .par_chunks_mut(dim)
        .zip(norms[..rows].par_iter_mut())
        .enumerate()
        .for_each(|(i, (o, n))| *n = normalize_into(&x[i * dim..(i + 1) * dim], o));
}

/// Unpacks `rows` rows of the f32 wire format (`dim` values, then the i64 label's bits in two
/// f32 words, low first: [`super::wire::pack_embeddings_f32`]) fused with their L2
/// normalization. The same arithmetic as [`normalize_rows`], so an f32 all-gather normalizes to
/// the same bits whichever way it travelled.
pub fn unpack_normalize_f32(
    packed: &[f32],
    rows: usize,
    dim: usize,
    labels: &mut [i64],
    x_hat: &mut [f32],
    norms: &mut [f32],
) {
    let len = dim + 2;
    packed[..rows * len]
        .par_chunks(len)
        .zip(x_hat[..rows * dim].par_chunks_mut(dim))
        .zip(
            labels[..rows]
                .par_iter_mut()
                .zip(norms[..rows].par_iter_mut()),
        )
        .for_each(|((row, out), (label, norm))| {
            *norm = normalize_into(&row[..dim], out);
            let (lo, hi) = (row[dim].to_bits(), row[dim + 1].to_bits());
            *label = (u64::from(lo) | (u64::from(hi) << 32)) as i64;
        });
}

/// Gathers the sampled rows of the shard and normalizes them in one pass.
pub fn gather_normalize_rows(
    weight: &[f32],
    dim: usize,
    index: &[i32],
    out: &mut [f32],
    norms: &mut [f32],
) {
    let count = index.len();
    out[..count * dim]
        .par_chunks_mut(dim)
        .zip(norms[..count].par_iter_mut())
        .zip(index.par_iter())
        .for_each(|((o, n), &row)| {
            let row = row as usize;
            *n = normalize_into(&weight[row * dim..(row + 1) * dim], o);
        });
}

/// Backward of `x̂ = x / ‖x‖`, in place: `g ← (g − x̂ (g · x̂)) / ‖x‖`.
pub fn normalize_backward(grad: &mut [f32], x_hat: &[f32], norms: &[f32], rows: usize, dim: usize) {
    grad[..rows * dim]
        .par_chunks_mut(dim)
        .enumerate()
        .for_each(|(i, g)| {
            let xh = &x_hat[i * dim..(i + 1) * dim];
            let dot = dot(g, xh);
            let inv = 1.0 / norms[i];
            for (gv, xv) in g.iter_mut().zip(xh) {
                *gv = (*gv - xv * dot) * inv;
            }
        });
}
