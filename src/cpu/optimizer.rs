//! SGD with momentum on the shard, with an f32 or bfloat16 momentum (CPU references of
//! `cuda/optimizer.cu`).

use rayon::prelude::*;

/// `dense = 0; dense[index[i]] = rows[i]`.
pub fn scatter_rows(rows: &[f32], index: &[i32], dim: usize, dense: &mut [f32]) {
    dense.par_iter_mut().for_each(|v| *v = 0.0);
    for (i, &r) in index.iter().enumerate() {
        let r = r as usize;
        dense[r * dim..(r + 1) * dim].copy_from_slice(&rows[i * dim..(i + 1) * dim]);
    }
}

/// A stored momentum value: f32, or a bfloat16 bit pattern. The update's arithmetic is f32
/// either way; only the store rounds. `u16` here always means bfloat16 bits (the storage of
/// [`crate::StateBuf::Bf16`]), never f16: the optimizer has no f16 state.
pub trait MomentumValue: Copy + Send + Sync {
    /// The stored value as f32 (exact).
    fn load(self) -> f32;
    /// `v` in the storage dtype (round to nearest even).
    fn store(v: f32) -> Self;
}

impl MomentumValue for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(v: f32) -> Self {
        v
    }
}

impl MomentumValue for u16 {
    fn load(self) -> f32 {
        half::bf16::from_bits(self).to_f32()
    }
    fn store(v: f32) -> Self {
        half::bf16::from_f32(v).to_bits()
    }
}

fn sgd_row<V: MomentumValue>(w: &mut [f32], v: &mut [V], g: &[f32], lr: f32, mu: f32, wd: f32) {
    for ((w, v), g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
        let next = mu * v.load() + (g + wd * *w);
        *v = V::store(next);
        *w -= lr * next;
    }
}

/// Sparse update: only the sampled rows and their momentum move.
#[allow(clippy::too_many_arguments)]
pub fn sgd_momentum_sparse<V: MomentumValue>(
    weight: &mut [f32],
    momentum: &mut [V],
    grad: &[f32],
    index: &[i32],
    dim: usize,
    lr: f32,
    mu: f32,
    weight_decay: f32,
) {
    // The sample is sorted and unique, so one walk splits the shard into the disjoint rows to
    // update, which then run in parallel.
    let mut picked = Vec::with_capacity(index.len());
    let (mut w_rest, mut v_rest) = (weight, momentum);
    let mut consumed = 0usize;
    for (i, &r) in index.iter().enumerate() {
        let r = r as usize;
        assert!(r >= consumed, "sampled index must be sorted and unique");
        let skip = (r - consumed) * dim;
        let (_, w_tail) = std::mem::take(&mut w_rest).split_at_mut(skip);
        let (_, v_tail) = std::mem::take(&mut v_rest).split_at_mut(skip);
        let (w_row, w_next) = w_tail.split_at_mut(dim);
        let (v_row, v_next) = v_tail.split_at_mut(dim);
        picked.push((i, w_row, v_row));
        w_rest = w_next;
        v_rest = v_next;
        consumed = r + 1;
    }
    picked
        .into_par_iter()
        .for_each(|(i, w, v)| sgd_row(w, v, &grad[i * dim..(i + 1) * dim], lr, mu, weight_decay));
}

/// Dense update of every element.
pub fn sgd_momentum_dense<V: MomentumValue>(
    weight: &mut [f32],
    momentum: &mut [V],
    grad: &[f32],
    lr: f32,
    mu: f32,
    weight_decay: f32,
) {
    weight
        .par_chunks_mut(4096)
        .zip(momentum.par_chunks_mut(4096))
        .zip(grad.par_chunks(4096))
        .for_each(|((w, v), g)| sgd_row(w, v, g, lr, mu, weight_decay));
}
