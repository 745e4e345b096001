//! The counter-based generator behind negative sampling: Philox4x32-10 (Salmon et al., SC'11).
//!
//! A counter-based generator turns (key, counter) into random bits with no state, so every class
//! draws its key independently, in any order, on any backend: the CPU and the CUDA kernels
//! (`cuda/common.cuh`, `philox4x32_10`) produce the same bits for the same seed, which makes the
//! sampled index identical across backends and runs.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: four 32-bit outputs for a 128-bit counter and a 64-bit key.
///
/// ```
/// // Known-answer test from the Random123 distribution (counter and key all zero).
/// let out = partial_fc::rng::philox4x32_10([0; 4], [0; 2]);
/// assert_eq!(out, [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
/// ```
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The 32 random bits of one class at one step: counter (class lo, class hi, step lo, step hi),
/// key (seed lo, seed hi). Keyed by the global class id, a class draws the same bits whichever
/// rank holds it.
pub fn class_random_bits(seed: u64, step: u64, class: u64) -> u32 {
    philox4x32_10(
        [
            class as u32,
            (class >> 32) as u32,
            step as u32,
            (step >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    )[0]
}

/// Domain tag xored into the key of [`rounding_bits`], so that the optimizer's rounding draws
/// bits unrelated to the sampler's for the same seed.
pub const ROUNDING_TAG: u64 = 0xADA3_5EED_0B0F_F1CE;

/// The 128 random bits of the stochastic rounding of elements `4·group .. 4·group + 4` of the
/// optimizer state at update `t`: counter (group lo, group hi, t lo, t hi), key = seed ^
/// [`ROUNDING_TAG`]. Element `e` takes word `e % 4` of group `e / 4` (one Philox call serves four
/// values, which the CPU's loop reuses); the CUDA kernels draw the same bits
/// (`cuda/common.cuh`, `rounding_bits`).
pub fn rounding_group(seed: u64, t: u64, group: u64) -> [u32; 4] {
    let key = seed ^ ROUNDING_TAG;
    philox4x32_10(
        [
            group as u32,
            (group >> 32) as u32,
            t as u32,
            (t >> 32) as u32,
        ],
        [key as u32, (key >> 32) as u32],
    )
}

/// 32 random bits for the stochastic rounding of element `element`: word `element % 4` of
/// [`rounding_group`]`(seed, t, element / 4)`.
pub fn rounding_bits(seed: u64, t: u64, element: u64) -> u32 {
    rounding_group(seed, t, element / 4)[(element % 4) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        // Random123 kat_vectors: philox4x32 10 rounds.
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }
}
