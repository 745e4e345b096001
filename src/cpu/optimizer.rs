//! SGD with momentum and AdamW on the shard, with f32 or bfloat16 state (CPU references of
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

/// `dense[index[i]] += rows[i]`: a pass's sampled rows added to a gradient accumulated over
/// earlier passes (`PartialFc::forward_backward_accumulate`). The index holds each row once.
pub fn scatter_add_rows(rows: &[f32], index: &[i32], dim: usize, dense: &mut [f32]) {
    for (i, &r) in index.iter().enumerate() {
        let r = r as usize;
        let src = &rows[i * dim..(i + 1) * dim];
        for (d, s) in dense[r * dim..(r + 1) * dim].iter_mut().zip(src) {
            *d += s;
        }
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
    /// Whether storing rounds (so that [`MomentumValue::store_stochastic`] needs random bits).
    const ROUNDS: bool;
    /// `v` in the storage dtype by stochastic rounding with 16 random `bits`: unbiased, so
    /// that an average whose per-step change is below half a storage step still moves (AdamW's
    /// second moment with β₂ = 0.999 changes by 0.1% a step, under bf16's 0.2–0.4%: rounded to
    /// nearest it would store the old value forever).
    fn store_stochastic(v: f32, bits: u32) -> Self;
}

/// `v` as bfloat16 bits by stochastic rounding: the low 16 bits of `bits` added below the kept
/// half carry into it with probability (dropped bits) / 2^16 (sign and magnitude: the
/// magnitude rounds up or down, unbiased). A NaN rounds to nearest (stays NaN); a value within a
/// step of the largest finite one may round to infinity.
pub fn bf16_stochastic(v: f32, bits: u32) -> u16 {
    if v.is_nan() {
        return half::bf16::from_f32(v).to_bits();
    }
    ((v.to_bits() + (bits & 0xffff)) >> 16) as u16
}

impl MomentumValue for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(v: f32) -> Self {
        v
    }
    const ROUNDS: bool = false;
    fn store_stochastic(v: f32, _: u32) -> Self {
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
    const ROUNDS: bool = true;
    fn store_stochastic(v: f32, bits: u32) -> Self {
        bf16_stochastic(v, bits)
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
    let w_rows = sampled_rows(weight, index, dim);
    let v_rows = sampled_rows(momentum, index, dim);
    w_rows
        .into_par_iter()
        .zip(v_rows)
        .enumerate()
        .for_each(|(i, (w, v))| sgd_row(w, v, &grad[i * dim..(i + 1) * dim], lr, mu, weight_decay));
}

/// The rows `index` (sorted, unique) of a row-major `rows × dim` tensor, as disjoint mutable
/// slices: one walk over the tensor, after which the rows can be updated in parallel.
///
/// # Panics
///
/// When `index` is not sorted and unique, or names a row past the tensor's end.
fn sampled_rows<'a, T>(mut rest: &'a mut [T], index: &[i32], dim: usize) -> Vec<&'a mut [T]> {
    let mut rows = Vec::with_capacity(index.len());
    let mut consumed = 0usize;
    for &r in index {
        let r = r as usize;
        assert!(r >= consumed, "sampled index must be sorted and unique");
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((r - consumed) * dim);
        let (row, next) = tail.split_at_mut(dim);
        rows.push(row);
        rest = next;
        consumed = r + 1;
    }
    rows
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

/// The scalars of one AdamW update, from [`crate::backend::AdamWStep`]: the decay factor
/// `1 − lr·λ`, the step size `lr / (1 − β₁ᵗ)` and `1 / √(1 − β₂ᵗ)`, computed once in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// `1 − lr·λ`: the decoupled weight decay's factor.
    pub decay: f32,
    /// `β₁`.
    pub beta1: f32,
    /// `β₂`.
    pub beta2: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `1 / √(1 − β₂ᵗ)`.
    pub inv_sqrt_bias2: f32,
    /// `ε`.
    pub eps: f32,
    /// Key of the stochastic rounding of 16-bit moments (the layer's seed).
    pub seed: u64,
    /// This update's number, t ≥ 1 (the rounding's counter).
    pub t: u64,
}

/// `w ← w·decay; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; w ← w − step·m/(√v·c₂ + ε)`, in f32,
/// with `w` moved by the unrounded moments (as the SGD update is). 16-bit moments are stored by
/// stochastic rounding, with the bits of [`crate::rng::rounding_bits`] for the shard's element
/// `first + i` (low half for `m`, high half for `v`), drawn a Philox block of four at a time.
fn adamw_row<V: MomentumValue>(
    w: &mut [f32],
    m: &mut [V],
    v: &mut [V],
    g: &[f32],
    first: u64,
    s: AdamWScalars,
) {
    // One Philox block serves four consecutive elements (crate::rng::rounding_group).
    let mut block = (u64::MAX, [0u32; 4]);
    let iter = w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g);
    for (i, (((w, m), v), &g)) in iter.enumerate() {
        let m_next = s.beta1 * m.load() + (1.0 - s.beta1) * g;
        let v_next = s.beta2 * v.load() + (1.0 - s.beta2) * (g * g);
        let bits = if V::ROUNDS {
            let element = first + i as u64;
            if block.0 != element / 4 {
                block = (
                    element / 4,
                    crate::rng::rounding_group(s.seed, s.t, element / 4),
                );
            }
            block.1[(element % 4) as usize]
        } else {
            0
        };
        *m = V::store_stochastic(m_next, bits);
        *v = V::store_stochastic(v_next, bits >> 16);
        let denom = v_next.sqrt() * s.inv_sqrt_bias2 + s.eps;
        *w = *w * s.decay - s.step_size * (m_next / denom);
    }
}

/// Sparse AdamW: only the sampled rows and their moments move ("lazy" Adam).
///
/// # Panics
///
/// When `index` is not sorted and unique (the backend checks it first).
pub fn adamw_sparse<V: MomentumValue>(
    weight: &mut [f32],
    exp_avg: &mut [V],
    exp_avg_sq: &mut [V],
    grad: &[f32],
    index: &[i32],
    dim: usize,
    s: AdamWScalars,
) {
    let w_rows = sampled_rows(weight, index, dim);
    let m_rows = sampled_rows(exp_avg, index, dim);
    let v_rows = sampled_rows(exp_avg_sq, index, dim);
    w_rows
        .into_par_iter()
        .zip(m_rows)
        .zip(v_rows)
        .enumerate()
        .for_each(|(i, ((w, m), v))| {
            let first = index[i] as u64 * dim as u64;
            adamw_row(w, m, v, &grad[i * dim..(i + 1) * dim], first, s)
        });
}

/// Dense AdamW over every element (the gradient is zero outside the sample).
pub fn adamw_dense<V: MomentumValue>(
    weight: &mut [f32],
    exp_avg: &mut [V],
    exp_avg_sq: &mut [V],
    grad: &[f32],
    s: AdamWScalars,
) {
    weight
        .par_chunks_mut(4096)
        .zip(exp_avg.par_chunks_mut(4096))
        .zip(exp_avg_sq.par_chunks_mut(4096))
        .zip(grad.par_chunks(4096))
        .enumerate()
        .for_each(|(c, (((w, m), v), g))| adamw_row(w, m, v, g, c as u64 * 4096, s));
}
