//! The check of a drawn sample that the CUDA step tests (tests/cuda_kernels.rs,
//! tests/cuda_step_fuzz.rs) share: every class of it must be one the sampler
//! (src/cpu/sampling.rs) could have drawn from the pass's inputs, when the hard negatives are
//! ranked by cosines that each backend rounds its own way.
//!
//! The sampler forces the positives in, takes the `h` non-positive classes of highest
//! hard-negative score (a class's best cosine against the gathered batch,
//! src/cpu/hard_negatives.rs; ties to the smaller id), and fills the remaining `m` slots with
//! the largest counter-based random keys among the classes left. Scores in f64 from the same
//! inputs stand for the exact ones; a backend's f32 scores lie within `e` of them (see
//! [`score_tolerance`]). Then every class scoring above the boundary by more than `2e` is a
//! hard negative on every backend, every class below it by more than `2e` is not, and only
//! the classes in that band (ambiguous) may swap. A swap also moves the random fill: the class
//! that dropped out of the hard set competes for a random slot, and the one that got in leaves
//! its random slot to the next key. So the two samples may also differ in a random pick far
//! from the boundary; what a wrong class cannot do is stay unexplained, and
//! [`check_hard_sample`] asks for an explanation: the sample is the sampler's for some hard
//! set made of the sure classes and ambiguous ones.

use partial_fc::cpu::sampling::{make_key, random_key_high};
use std::collections::HashSet;

/// f32's unit roundoff, 2⁻²⁴.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// How far a backend's f32 hard-negative score may lie from the exact one on the same f32
/// inputs, from f32 rounding alone.
///
/// A score is the largest of `dot(ŵ, x̂)` over rows, and the largest of several values moves by
/// no more than the largest move of one of them, so the bound of one cosine is the score's.
/// Each backend normalizes a row `v` as `v · fl(1 / fl(√fl(Σ v²)))` (IEEE sqrt and division in
/// NVRTC's default, `--fmad=true` only fuses): the sum of `d` squares is off by at most `γ_d ≈
/// d·u` relative in any order, with or without FMA (its terms are positive), the square root
/// halves that and adds `u`, the division `u`, the product `u`: each component of `ŵ` and `x̂`
/// is within `(d/2 + 3)·u` relative of the exact one. The `d`-length dot product of the rounded
/// unit vectors is off by at most `γ_d · Σ|ŵ_i x̂_i| <= d·u` (Cauchy–Schwarz; again any
/// summation order, cuBLAS's, the CPU GEMM's, fused or not), and the two normalizations move
/// the exact product by at most `2·(d/2 + 3)·u`. In all, `(2d + 6)·u` to first order; `2u`
/// more covers the second-order terms (`O(d²u²)`, below `u` for d <= 1000) and the f64
/// reference's own rounding (`O(d·2⁻⁵³)`).
pub fn score_tolerance(dim: usize) -> f64 {
    (2.0 * dim as f64 + 8.0) * U
}

/// One pass's inputs, as the layer of one rank saw them.
pub struct Pass<'a> {
    /// Global id of the rank's first class.
    pub shard_start: u64,
    pub dim: usize,
    /// The CPU layer's shard weights before the pass (its scores are taken as the reference).
    pub weight: &'a [f32],
    /// The CUDA layer's shard weights before the pass: after earlier steps they differ from the
    /// CPU's by those steps' rounding, which moves its scores further (see the drift below).
    pub other_weight: &'a [f32],
    /// The gathered batch's real rows (padding excluded), as the layer normalizes them: after
    /// the wire's rounding.
    pub x: &'a [f32],
    /// Their global labels.
    pub labels: &'a [i64],
    /// The layer's seed, and its count of drawn passes before this one (the generator's keys).
    pub seed: u64,
    pub step: u64,
    /// `NegativeSampler::Hard`'s fraction; 0 for random negatives.
    pub fraction: f64,
}

/// The first few of a list of classes, and how many there are.
fn few(classes: &[String]) -> String {
    const SHOWN: usize = 6;
    let head = classes[..classes.len().min(SHOWN)].join(", ");
    if classes.len() > SHOWN {
        format!("[{head}, ...] ({} in all)", classes.len())
    } else {
        format!("[{head}]")
    }
}

fn normalized(v: &[f32]) -> Vec<f64> {
    let n = v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|&a| f64::from(a) / n).collect()
}

/// Checks the CPU's and the CUDA layer's samples (sorted global ids) of `pass`: each must be one
/// the sampler could draw (see the module's doc), which also holds them to the same positives,
/// random keys and counts. Panics naming `what` and the classes that cannot be explained;
/// returns a line on the boundary (and on the difference, if any) for the log.
pub fn check_hard_sample(what: &str, pass: &Pass, cpu: &[i64], gpu: &[i64]) -> String {
    let d = pass.dim;
    let shard_len = pass.weight.len() / d;
    assert_eq!(
        pass.other_weight.len(),
        pass.weight.len(),
        "{what}: weights"
    );
    let start = pass.shard_start as i64;
    let mut positive = vec![false; shard_len];
    for &l in pass.labels {
        if l >= start && l - start < shard_len as i64 {
            positive[(l - start) as usize] = true;
        }
    }
    let positives = positive.iter().filter(|&&p| p).count();
    let size = cpu.len();
    assert_eq!(
        gpu.len(),
        size,
        "{what}: the CUDA layer sampled {} classes, the CPU {size}",
        gpu.len()
    );
    // The random key of each class (src/cpu/sampling.rs): what fills the slots left.
    let keys: Vec<u64> = (0..shard_len)
        .map(|c| {
            make_key(
                random_key_high(pass.seed, pass.step, pass.shard_start + c as u64),
                c,
            )
        })
        .collect();
    let fill = size.saturating_sub(positives);
    let hard = if size >= shard_len || pass.fraction == 0.0 {
        0 // the whole shard, or no scores
    } else {
        // As the layer (f32 fraction) and the sampler (rounded, at most the fill) count them.
        (((pass.fraction as f32) as f64 * fill as f64).round() as usize).min(fill)
    };
    let local = |sample: &[i64]| -> Vec<usize> {
        sample
            .iter()
            .map(|&c| {
                assert!(
                    c >= start && c - start < shard_len as i64,
                    "{what}: sampled class {c} outside the shard [{start}, {})",
                    start + shard_len as i64
                );
                (c - start) as usize
            })
            .collect()
    };
    let (cpu_local, gpu_local) = (local(cpu), local(gpu));
    if hard == 0 {
        // Positives and random keys only: one possible sample.
        let mut rest: Vec<usize> = (0..shard_len).filter(|&c| !positive[c]).collect();
        rest.sort_unstable_by_key(|&c| std::cmp::Reverse(keys[c]));
        let mut want: Vec<usize> = (0..shard_len).filter(|&c| positive[c]).collect();
        want.extend(&rest[..fill.min(rest.len())]);
        want.sort_unstable();
        for (who, got) in [("CPU", &cpu_local), ("CUDA", &gpu_local)] {
            assert!(
                **got == want,
                "{what}: the {who} sample is not the positives and the {fill} largest random \
                 keys (no hard negatives this pass): {} classes differ",
                got.iter()
                    .filter(|c| want.binary_search(c).is_err())
                    .count()
            );
        }
        return format!("{what}: sample of {size} without hard negatives");
    }

    // Exact scores (f64) from the CPU's weights and the gathered rows.
    let rows: Vec<Vec<f64>> = pass.x.chunks(d).map(normalized).collect();
    let scores: Vec<f64> = pass
        .weight
        .chunks(d)
        .map(|w| {
            let w = normalized(w);
            rows.iter()
                .map(|x| w.iter().zip(x).map(|(a, b)| a * b).sum::<f64>())
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect();
    // The CUDA layer's weights are the CPU's up to earlier steps' rounding: ‖a/‖a‖ − b/‖b‖‖ <=
    // 2‖a − b‖/‖a‖, and a unit row's cosine moves by no more than its center's direction.
    let drift = pass
        .weight
        .chunks(d)
        .zip(pass.other_weight.chunks(d))
        .map(|(a, b)| {
            let diff = a
                .iter()
                .zip(b)
                .map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2))
                .sum::<f64>();
            let norm = a.iter().map(|&p| f64::from(p).powi(2)).sum::<f64>();
            2.0 * (diff / norm).sqrt()
        })
        .fold(0.0, f64::max);
    // Each backend's scores lie within e of the exact ones; a class at more than 2e from the
    // boundary keeps its side: s > t₊ + 2e gives s' > t₊ + e >= the f32 score of every class
    // scoring at most t₊ (the first one left out), and at most h − 1 other classes score more
    // than t₊, so it is among the h largest; and the same below t₋ (the last one taken).
    let e = score_tolerance(d) + drift;
    let band = 2.0 * e;
    let mut ranked: Vec<usize> = (0..shard_len).filter(|&c| !positive[c]).collect();
    ranked.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let (last_in, first_out) = (scores[ranked[hard - 1]], scores[ranked[hard]]);
    let sure = |c: usize| !positive[c] && scores[c] > first_out + band;
    let ambiguous = |c: usize| !positive[c] && !sure(c) && scores[c] >= last_in - band;
    let sure_count = ranked.iter().filter(|&&c| sure(c)).count();
    let describe = |c: usize| {
        format!(
            "{} (score {:.9}, {:+.3e} from the boundary)",
            c as i64 + start,
            scores[c],
            scores[c] - last_in
        )
    };
    let explain = |who: &str, sample: &[usize]| {
        let chosen: HashSet<usize> = sample.iter().copied().collect();
        let context = format!(
            "{what}: the {who} sample ({size} classes: {positives} positives, {hard} hard, \
             {} random) cannot be the sampler's; boundary score {last_in:.9} (last taken) / \
             {first_out:.9} (first left), band ±{band:.3e} (rounding {:.3e}, weight drift \
             {drift:.3e}, twice each)",
            size - positives - hard,
            score_tolerance(d)
        );
        let lost: Vec<i64> = (0..shard_len)
            .filter(|&c| positive[c] && !chosen.contains(&c))
            .map(|c| c as i64 + start)
            .collect();
        assert!(lost.is_empty(), "{context}: positives {lost:?} missing");
        let lost: Vec<String> = ranked
            .iter()
            .filter(|&&c| sure(c) && !chosen.contains(&c))
            .map(|&c| describe(c))
            .collect();
        assert!(
            lost.is_empty(),
            "{context}: hard negatives above the band missing: {}",
            few(&lost)
        );
        // The classes beyond the positives and the sure hard negatives: k of them are hard
        // (ambiguous), the others random picks.
        let extra: Vec<usize> = sample
            .iter()
            .copied()
            .filter(|&c| !positive[c] && !sure(c))
            .collect();
        let k = hard - sure_count;
        // A random pick outranks every class left out of the sample by its key.
        let (best_left, left_class) = (0..shard_len)
            .filter(|c| !chosen.contains(c))
            .map(|c| (keys[c], c as i64 + start))
            .max()
            .expect("a sample below the shard's size leaves a class out");
        let not_random: Vec<usize> = extra
            .iter()
            .copied()
            .filter(|&c| keys[c] < best_left)
            .collect();
        let wrong: Vec<String> = not_random
            .iter()
            .filter(|&&c| !ambiguous(c))
            .map(|&c| describe(c))
            .collect();
        assert!(
            wrong.is_empty(),
            "{context}: classes neither in the band nor random picks (class {left_class}, left \
             out, has a larger random key): {}",
            few(&wrong)
        );
        assert!(
            not_random.len() <= k,
            "{context}: {} classes are not random picks, for {k} hard slots in the band",
            not_random.len()
        );
        let candidates = extra.iter().filter(|&&c| ambiguous(c)).count();
        assert!(
            candidates >= k,
            "{context}: {candidates} classes of the band sampled, for {k} hard slots there"
        );
    };
    explain("CPU", &cpu_local);
    explain("CUDA", &gpu_local);
    let in_band = ranked.iter().filter(|&&c| ambiguous(c)).count();
    let mut line = format!(
        "{what}: {hard} hard negatives of {size}, boundary {last_in:.7}, band ±{band:.2e} \
         holds {in_band} classes"
    );
    let only = |a: &[usize], b: &[usize]| -> Vec<String> {
        a.iter()
            .filter(|c| b.binary_search(c).is_err())
            .map(|&c| describe(c))
            .collect()
    };
    if cpu_local != gpu_local {
        line += &format!(
            "; only on CUDA {}, only on the CPU {}",
            few(&only(&gpu_local, &cpu_local)),
            few(&only(&cpu_local, &gpu_local))
        );
    }
    line
}
