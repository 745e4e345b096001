//! Per-row weights of the loss (`PartialFc::forward_backward_weighted`): after the softmax has
//! written the logits' gradient, each row is multiplied by its row's weight, before the backward
//! GEMMs. The gradient of `Σ_i w_i ℓ_i` is `w_i` times each row's, and every later step (both
//! GEMMs, the normalizations' backward) is linear in the logits' gradient, so this one product
//! weighs the embeddings' and the class centers' gradients alike. The loss is weighted on the
//! host. CUDA: `scale_rows` and `scale_rows16` in cuda/margin_softmax.cu.

use super::margin_softmax16::{narrow, widen};
use crate::plan::Dtype;
use rayon::prelude::*;

/// `g[i][j] *= weights[i]` for the `rows` rows of `ld` values of f32 logits.
pub fn scale_rows(g: &mut [f32], rows: usize, ld: usize, weights: &[f32]) {
    g[..rows * ld]
        .par_chunks_mut(ld.max(1))
        .zip(&weights[..rows])
        .for_each(|(row, &w)| row.iter_mut().for_each(|v| *v *= w));
}

/// [`scale_rows`] on 16-bit logits (`dtype` bf16 or f16): each value widened, multiplied in f32
/// and rounded back to nearest even (f16 saturating, as the softmax stores its gradient).
pub fn scale_rows16(g: &mut [u16], rows: usize, ld: usize, dtype: Dtype, weights: &[f32]) {
    g[..rows * ld]
        .par_chunks_mut(ld.max(1))
        .zip(&weights[..rows])
        .for_each(|(row, &w)| {
            row.iter_mut()
                .for_each(|v| *v = narrow(widen(*v, dtype) * w, dtype))
        });
}
