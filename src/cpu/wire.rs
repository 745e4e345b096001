//! The wire format of the embedding all-gather (CPU references of `cuda/wire.cu`).
//!
//! Three formats live here.
//! - The embedding all-gather's 16-bit packed rows: `dim` 16-bit values (f16 or bf16, round to
//!   nearest even, as the `half` crate and the GPU's `cvt.rn` both do) followed by the row's i64
//!   label as four 16-bit words, little end first ([`pack_embeddings`]).
//! - Its f32 packed rows: `dim` f32 values followed by the label's bits as two f32 words, low
//!   first ([`pack_embeddings_f32`]; unpacked by `unpack_normalize_f32` in
//!   src/cpu/normalize.rs, with the same arithmetic as `normalize_rows`).
//!
//!   Rows of all ranks concatenate, so one all-gather moves embeddings and labels together; the
//!   layer packs on the host, where the embeddings arrive, and the 16-bit rows halve the bytes.
//! - The embedding gradient's 16-bit reduce-scatter (`LayerConfig::grad_wire`): plain
//!   element-wise casts, [`cast_to_wire`] before it and [`cast_from_wire`] after it, with the
//!   same rounding as the packed rows.

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

/// Rounds each f32 of `x` to the wire dtype into `out` (round to nearest even; NaN stays NaN,
/// overflow becomes ±inf, f16 keeps subnormals): the embedding gradient before its 16-bit
/// reduce-scatter. Twin of `cast_to_wire` in cuda/wire.cu.
pub fn cast_to_wire(x: &[f32], wire: Dtype, out: &mut [u16]) {
    out.par_chunks_mut(CAST_CHUNK)
        .zip(x.par_chunks(CAST_CHUNK))
        .for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = to_wire(v, wire);
            }
        });
}

/// Widens each 16-bit wire value of `x` to f32 into `out` (exact): the reduce-scattered
/// gradient back in the layer's dtype. Twin of `cast_from_wire` in cuda/wire.cu.
pub fn cast_from_wire(x: &[u16], wire: Dtype, out: &mut [f32]) {
    out.par_chunks_mut(CAST_CHUNK)
        .zip(x.par_chunks(CAST_CHUNK))
        .for_each(|(o, x)| {
            for (o, &b) in o.iter_mut().zip(x) {
                *o = from_wire(b, wire);
            }
        });
}

/// Elements per rayon task of the casts: large enough that scheduling costs nothing next to
/// the conversions.
const CAST_CHUNK: usize = 1 << 14;

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

/// f32 words per row of the f32 wire format: the row's `dim` values, then its i64 label's bits
/// as two words (low first), so that one all-gather moves embeddings and labels together.
pub fn packed_row_len_f32(dim: usize) -> usize {
    dim + 2
}

/// Packs `rows` embeddings and labels in the f32 wire format (see [`packed_row_len_f32`]); the
/// layer does this on the host, where the embeddings arrive, so the device sees one upload and
/// one all-gather. Unpacked by `unpack_normalize_f32` (src/cpu/normalize.rs).
pub fn pack_embeddings_f32(x: &[f32], labels: &[i64], rows: usize, dim: usize, packed: &mut [f32]) {
    let len = packed_row_len_f32(dim);
    packed[..rows * len]
        .par_chunks_mut(len)
        .zip(x[..rows * dim].par_chunks(dim))
        .zip(labels[..rows].par_iter())
        .for_each(|((out, row), &label)| {
            out[..dim].copy_from_slice(row);
            let l = label as u64;
            out[dim] = f32::from_bits(l as u32);
            out[dim + 1] = f32::from_bits((l >> 32) as u32);
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
            let inv = super::normalize::inv_norm(n);
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

    /// The casts around the 16-bit reduce-scatter against hand-derived bit patterns at the edges
    /// (ties, overflow, subnormals, signed zero, infinities, NaN) and against the `half` crate's
    /// conversions on a spread of f32 bit patterns; widening is exact on every 16-bit pattern.
    #[test]
    fn casts_round_to_nearest_even_at_every_edge() {
        let p = |e: i32| 2f32.powi(e);
        let f16_cases: &[(f32, u16)] = &[
            (1.0, 0x3c00),
            (-0.0, 0x8000),
            (1.0 + p(-11), 0x3c00),          // tie, to even (down)
            (1.0 + 3.0 * p(-11), 0x3c02),    // tie, to even (up)
            (1.0 + p(-11) + p(-20), 0x3c01), // just above the tie
            (65504.0, 0x7bff),               // largest finite
            (65519.0, 0x7bff),               // below the overflow tie
            (65520.0, 0x7c00),               // the tie overflows to inf (even)
            (f32::INFINITY, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
            (f32::MAX, 0x7c00),
            (p(-14), 0x0400),       // smallest normal
            (p(-24), 0x0001),       // smallest subnormal
            (p(-25), 0x0000),       // tie between 0 and 2^-24: to even 0
            (3.0 * p(-25), 0x0002), // tie between 1 and 2 units: to even 2
            (-p(-24), 0x8001),
            (p(-26), 0x0000), // underflows to zero
        ];
        let bf16_cases: &[(f32, u16)] = &[
            (1.0, 0x3f80),
            (-0.0, 0x8000),
            (1.0 + p(-8), 0x3f80),       // tie, to even (down)
            (1.0 + 3.0 * p(-8), 0x3f82), // tie, to even (up)
            (f32::MAX, 0x7f80),          // rounds up to inf
            (f32::INFINITY, 0x7f80),
            (f32::NEG_INFINITY, 0xff80),
            (f32::from_bits(0x0001_0000), 0x0001), // f32 subnormal kept as a bf16 subnormal
            (f32::from_bits(0x0000_8000), 0x0000), // tie below it: to even 0
            (f32::from_bits(0x0001_8000), 0x0002), // tie: to even 2
            (f32::from_bits(0x0000_0001), 0x0000),
        ];
        for (wire, cases) in [(Dtype::F16, f16_cases), (Dtype::Bf16, bf16_cases)] {
            let x: Vec<f32> = cases.iter().map(|c| c.0).collect();
            let mut out = vec![0u16; x.len()];
            cast_to_wire(&x, wire, &mut out);
            for ((v, want), got) in cases.iter().zip(&out) {
                assert_eq!(
                    *got, *want,
                    "{wire:?}: {v:e} -> {got:#06x}, want {want:#06x}"
                );
            }
        }
        // NaN (quiet and signalling, either sign) stays NaN in both formats.
        for bits in [0x7fc0_0000u32, 0x7f80_0001, 0xffc0_1234, 0x7fff_ffff] {
            for wire in [Dtype::F16, Dtype::Bf16] {
                let mut out = [0u16];
                cast_to_wire(&[f32::from_bits(bits)], wire, &mut out);
                assert!(from_wire(out[0], wire).is_nan(), "{wire:?}: {bits:#x}");
            }
        }

        // A spread of f32 bit patterns (every exponent, random mantissas) against `half`.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let x: Vec<f32> = (0..1 << 16)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                f32::from_bits(state as u32)
            })
            .collect();
        let mut out = vec![0u16; x.len()];
        cast_to_wire(&x, Dtype::F16, &mut out);
        assert!(x
            .iter()
            .zip(&out)
            .all(|(&v, &o)| o == f16::from_f32(v).to_bits()));
        cast_to_wire(&x, Dtype::Bf16, &mut out);
        assert!(x
            .iter()
            .zip(&out)
            .all(|(&v, &o)| o == bf16::from_f32(v).to_bits()));

        // Widening: every 16-bit pattern, exact, and narrowing it again gives it back.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut wide = vec![0f32; all.len()];
        let mut back = vec![0u16; all.len()];
        for wire in [Dtype::F16, Dtype::Bf16] {
            cast_from_wire(&all, wire, &mut wide);
            cast_to_wire(&wide, wire, &mut back);
            for ((&b, &w), &r) in all.iter().zip(&wide).zip(&back) {
                let want = match wire {
                    Dtype::Bf16 => bf16::from_bits(b).to_f32(),
                    _ => f16::from_bits(b).to_f32(),
                };
                if want.is_nan() {
                    assert!(
                        w.is_nan() && from_wire(r, wire).is_nan(),
                        "{wire:?} {b:#06x}"
                    );
                } else {
                    assert_eq!(w.to_bits(), want.to_bits(), "{wire:?} {b:#06x}");
                    assert_eq!(r, b, "{wire:?}: {b:#06x} does not round-trip");
                }
            }
        }
    }
}
