//! The wire format of the embedding all-gather (CPU references of `cuda/wire.cu`).
//!
//! A packed row is `dim` 16-bit values (f16 or bf16, round to nearest even, as the `half` crate
//! and the GPU's `cvt.rn` both do) followed by the row's i64 label as four 16-bit words, little
//! end first. Rows of all ranks concatenate, so one all-gather moves embeddings and labels
//! together, at half the bytes of f32.

use super::normalize::NORM_EPS;
use super::simd::dot;
use crate::plan::Dtype;
use half::{bf16, f16};
use rayon::prelude::*;

/// 16-bit words per packed row.
pub fn packed_row_len(dim: usize) -> usize {
    dim + 4
}

/// f32 → 16-bit pattern of the wire dtype (f16 or bf16).
pub fn to_wire(v: f32, wire: Dtype) -> u16 {
    match wire {
        Dtype::Bf16 => bf16::from_f32(v).to_bits(),
        _ => f16::from_f32(v).to_bits(),
    }
}

/// 16-bit pattern of the wire dtype → f32 (exact).
pub fn from_wire(bits: u16, wire: Dtype) -> f32 {
    match wire {
        Dtype::Bf16 => bf16::from_bits(bits).to_f32(),
        _ => f16::from_bits(bits).to_f32(),
    }
}

/// Packs `rows` embeddings and labels (see the module docs).
pub fn pack_embeddings(
    x: &[f32],
    labels: &[i64],
    rows: usize,
    dim: usize,
    wire: Dtype,
    packed: &mut [u16],
) {
    let len = packed_row_len(dim);
    packed[..rows * len]
        .par_chunks_mut(len)
        .zip(x[..rows * dim].par_chunks(dim))
        .zip(labels[..rows].par_iter())
        .for_each(|((out, row), &label)| {
            for (o, &v) in out[..dim].iter_mut().zip(row) {
                *o = to_wire(v, wire);
            }
            let l = label as u64;
            for (w, o) in out[dim..].iter_mut().enumerate() {
                *o = (l >> (16 * w)) as u16;
            }
        });
}

/// Unpacks `rows` packed rows fused with their L2 normalization.
#[allow(clippy::too_many_arguments)]
pub fn unpack_normalize(
    packed: &[u16],
    rows: usize,
    dim: usize,
    wire: Dtype,
    labels: &mut [i64],
    x_hat: &mut [f32],
    norms: &mut [f32],
) {
    let len = packed_row_len(dim);
    packed[..rows * len]
        .par_chunks(len)
        .zip(x_hat[..rows * dim].par_chunks_mut(dim))
        .zip(
            labels[..rows]
                .par_iter_mut()
                .zip(norms[..rows].par_iter_mut()),
        )
        .for_each(|((row, out), (label, norm))| {
            for (o, &b) in out.iter_mut().zip(&row[..dim]) {
                *o = from_wire(b, wire);
            }
            let n = dot(out, out).sqrt().max(NORM_EPS);
            let inv = 1.0 / n;
            out.iter_mut().for_each(|v| *v *= inv);
            *norm = n;
            *label = row[dim..]
                .iter()
                .enumerate()
                .fold(0u64, |acc, (w, &b)| acc | (u64::from(b) << (16 * w)))
                as i64;
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_labels_and_rounds_values() {
        let (rows, dim) = (3, 5);
        let x: Vec<f32> = (0..rows * dim).map(|i| (i as f32 - 7.0) * 0.37).collect();
        let labels = [0i64, -1, 123_456_789_012];
        for wire in [Dtype::F16, Dtype::Bf16] {
            let mut packed = vec![0u16; rows * packed_row_len(dim)];
            pack_embeddings(&x, &labels, rows, dim, wire, &mut packed);
            let (mut l, mut xh, mut n) =
                (vec![0i64; rows], vec![0f32; rows * dim], vec![0f32; rows]);
            unpack_normalize(&packed, rows, dim, wire, &mut l, &mut xh, &mut n);
            assert_eq!(l, labels);
            for r in 0..rows {
                let q: Vec<f32> = x[r * dim..(r + 1) * dim]
                    .iter()
                    .map(|&v| from_wire(to_wire(v, wire), wire))
                    .collect();
                let want = q.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!((n[r] - want).abs() <= 1e-6 * want);
                for j in 0..dim {
                    assert!((xh[r * dim + j] - q[j] / want).abs() < 1e-6);
                }
            }
        }
        // Round to nearest even, as the GPU's cvt.rn: 1 + 2^-11 is a tie in f16, rounds to 1.
        assert_eq!(
            to_wire(1.0 + 2f32.powi(-11), Dtype::F16),
            f16::ONE.to_bits()
        );
        assert_eq!(
            to_wire(1.0 + 2f32.powi(-8), Dtype::Bf16),
            bf16::ONE.to_bits()
        );
    }
}
