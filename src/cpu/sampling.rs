//! Class sampling (CPU references of `cuda/sampling.cu`).
//!
//! Every class of the shard gets a 64-bit key, positives are forced to the top, the `S` largest
//! keys are selected by an MSB-first radix select, and the survivors are compacted in class order,
//! so the sample comes out sorted. The low 32 bits of a key are `u32::MAX − class`, which makes
//! all keys distinct: the selection is exact and the same on every backend.

use crate::backend::SampleArgs;
use crate::rng::class_random_bits;
use rayon::prelude::*;

/// High word of a positive class's key: above every negative key.
pub const POSITIVE_KEY: u32 = u32::MAX;

/// Assembles a key from its high word and the class it belongs to.
pub fn make_key(high: u32, class: usize) -> u64 {
    (u64::from(high) << 32) | u64::from(u32::MAX - class as u32)
}

/// High word of a random negative key: 31 random bits (below [`POSITIVE_KEY`]).
pub fn random_key_high(seed: u64, step: u64, global_class: u64) -> u32 {
    class_random_bits(seed, step, global_class) >> 1
}

/// Maps a score to a high word that orders like the score (NaN as −∞, −0 as +0), below
/// [`POSITIVE_KEY`].
pub fn score_key_high(score: f32) -> u32 {
    let s = if score.is_nan() {
        f32::NEG_INFINITY
    } else if score == 0.0 {
        0.0 // −0 as +0: a GEMM or a max may give a zero either sign, on either device
    } else {
        score
    };
    let bits = s.to_bits();
    let ordered = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    ordered.min(POSITIVE_KEY - 1)
}

/// Global labels → shard-local ids, −1 where the class lives elsewhere.
pub fn localize_labels(global: &[i64], shard_start: u64, shard_len: usize, local: &mut [i32]) {
    for (l, &g) in local.iter_mut().zip(global) {
        let off = g.wrapping_sub(shard_start as i64);
        *l = if g >= 0 && off >= 0 && (off as u64) < shard_len as u64 {
            off as i32
        } else {
            -1
        };
    }
}

/// The `k`-th largest key (1-based) by MSB-first radix select over 8-bit digits.
pub fn radix_select_kth_largest(keys: &[u64], k: usize) -> u64 {
    debug_assert!(k >= 1 && k <= keys.len());
    let mut prefix = 0u64;
    let mut remaining = k;
    for digit in (0..8).rev() {
        let shift = digit * 8;
        let high_mask = if digit == 7 {
            0
        } else {
            u64::MAX << (shift + 8)
        };
        let hist = keys
            .par_chunks(1 << 16)
            .map(|chunk| {
                let mut h = [0usize; 256];
                for &key in chunk {
                    if key & high_mask == prefix {
                        h[((key >> shift) & 0xff) as usize] += 1;
                    }
                }
                h
            })
            .reduce(
                || [0usize; 256],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let mut bin = 255;
        loop {
            if hist[bin] >= remaining {
                break;
            }
            remaining -= hist[bin];
            bin -= 1;
        }
        prefix |= (bin as u64) << shift;
    }
    prefix
}

/// Writes, in class order, the classes whose key is at least `threshold`; returns how many.
pub fn compact_selected(keys: &[u64], threshold: u64, sampled: &mut [i32]) -> usize {
    let mut n = 0;
    for (class, &key) in keys.iter().enumerate() {
        if key >= threshold {
            sampled[n] = class as i32;
            n += 1;
        }
    }
    n
}

/// Replaces each shard-local label by its position in the sorted sample (searchsorted).
pub fn remap_labels(labels: &mut [i32], sampled: &[i32]) {
    for l in labels.iter_mut().filter(|l| **l >= 0) {
        // Every positive was kept, so the search always finds it.
        *l = sampled.binary_search(l).map(|p| p as i32).unwrap_or(-1);
    }
}

/// Marks the positives (keys with [`POSITIVE_KEY`]) and returns how many distinct ones there are.
fn force_positives(labels: &[i32], keys: &mut [u64]) -> usize {
    let mut count = 0;
    for &l in labels.iter().filter(|l| **l >= 0) {
        let class = l as usize;
        if keys[class] >> 32 != u64::from(POSITIVE_KEY) {
            keys[class] = make_key(POSITIVE_KEY, class);
            count += 1;
        }
    }
    count
}

/// The whole sampler: keys, forced positives, selection, compaction, remap. Returns `S`.
pub fn sample_classes(
    args: &SampleArgs,
    labels: &mut [i32],
    scores: Option<&[f32]>,
    keys: &mut [u64],
    sampled: &mut [i32],
) -> usize {
    let shard = args.shard_len;
    let labels = &mut labels[..args.rows];
    if args.num_sample >= shard {
        // The whole shard: no keys (the backend checks `keys` only below full rate).
        for (c, s) in sampled[..shard].iter_mut().enumerate() {
            *s = c as i32;
        }
        return shard;
    }
    let keys = &mut keys[..shard];
    let random_keys = |keys: &mut [u64]| {
        keys.par_iter_mut().enumerate().for_each(|(c, k)| {
            let high = random_key_high(args.seed, args.step, args.shard_start + c as u64);
            *k = make_key(high, c);
        })
    };
    random_keys(keys);
    let positives = force_positives(labels, keys);
    let total = if positives >= args.num_sample {
        positives
    } else {
        let fill = args.num_sample - positives;
        let hard = match scores {
            Some(_) => ((args.hard_fraction as f64 * fill as f64).round() as usize).min(fill),
            None => 0,
        };
        if let (Some(scores), true) = (scores, hard > 0) {
            // Phase 1: the hardest negatives join the positives at the top of the order.
            keys.par_iter_mut().enumerate().for_each(|(c, k)| {
                if *k >> 32 != u64::from(POSITIVE_KEY) {
                    *k = make_key(score_key_high(scores[c]), c);
                }
            });
            let threshold = radix_select_kth_largest(keys, positives + hard);
            let chosen: Vec<bool> = keys.par_iter().map(|&k| k >= threshold).collect();
            random_keys(keys);
            keys.par_iter_mut()
                .zip(chosen.par_iter())
                .enumerate()
                .for_each(|(c, (k, &was_chosen))| {
                    if was_chosen {
                        *k = make_key(POSITIVE_KEY, c);
                    }
                });
        }
        args.num_sample
    };
    if total == 0 {
        // No positive here and floor(r · shard) = 0: nothing to select (every label is −1).
        return 0;
    }
    let threshold = radix_select_kth_largest(keys, total);
    let n = compact_selected(keys, threshold, sampled);
    debug_assert_eq!(n, total);
    remap_labels(labels, &sampled[..n]);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_select_matches_sort() {
        let keys: Vec<u64> = (0..1000u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ (i << 7))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        for k in [1, 2, 17, 500, 999, 1000] {
            assert_eq!(radix_select_kth_largest(&keys, k), sorted[k - 1]);
        }
    }

    #[test]
    fn score_keys_order_like_scores() {
        let s = [-2.0f32, -0.5, -0.0, 0.0, 0.25, 1.0, f32::INFINITY];
        for w in s.windows(2) {
            assert!(score_key_high(w[0]) <= score_key_high(w[1]), "{w:?}");
        }
        assert!(score_key_high(f32::INFINITY) < POSITIVE_KEY);
        assert_eq!(score_key_high(-0.0), score_key_high(0.0));
    }
}
