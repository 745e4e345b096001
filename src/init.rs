//! Deterministic initialization of class centers.

use crate::rng::philox4x32_10;

/// The class centers' initial standard deviation: `torch.normal(0, 0.01, (C, d))`, as the
/// published implementation draws them.
pub(crate) const INIT_STD: f32 = 0.01;

/// `rows × dim` values from N(0, std²), keyed by (seed, global row, column): the full matrix is
/// the same whatever the world size, so sharded and unsharded runs start from the same weights.
pub fn normal_rows(seed: u64, first_row: u64, rows: usize, dim: usize, std: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * dim];
    use rayon::prelude::*;
    out.par_chunks_mut(dim.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let r = first_row + i as u64;
            for (j, pair) in row.chunks_mut(2).enumerate() {
                let bits = philox4x32_10(
                    [r as u32, (r >> 32) as u32, j as u32, 0x1417],
                    [seed as u32, (seed >> 32) as u32],
                );
                // Box–Muller from two uniforms in (0, 1].
                let u1 = (bits[0] as f32 + 1.0) / 4_294_967_296.0;
                let u2 = bits[1] as f32 / 4_294_967_296.0;
                let radius = (-2.0 * u1.ln()).sqrt() * std;
                let angle = std::f32::consts::TAU * u2;
                pair[0] = radius * angle.cos();
                if pair.len() > 1 {
                    pair[1] = radius * angle.sin();
                }
            }
        });
    out
}
