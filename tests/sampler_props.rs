//! Properties of the class sampler, on `cpu::sampling::sample_classes` directly (proptest) and
//! through the layer: the sample is sorted, unique, in range, holds every positive, has exactly
//! max(floor(r·shard), #positives) classes (r = 0: the positives; r = 1: the whole shard), the
//! remapped labels point at their class, the draw is a function of (seed, step) and changes with
//! the step, the random negatives are uniform (chi-square), and hard negatives are the classes
//! with the highest scores.

mod common;

use common::Rng;
use partial_fc::collective::SingleRank;
use partial_fc::cpu::sampling::sample_classes;
use partial_fc::{CpuBackend, LayerConfig, NegativeSampler, PartialFc, SampleArgs};
use proptest::prelude::*;
use std::collections::BTreeSet;

/// `floor(r · shard)`, the sample size before positives (r = 1: the shard).
fn target_size(rate: f64, shard: usize) -> usize {
    if rate >= 1.0 {
        shard
    } else {
        ((rate * shard as f64).floor() as usize).min(shard)
    }
}

/// Runs the sampler on copies of its inputs; returns the sample and the remapped labels.
fn draw(args: &SampleArgs, labels: &[i32], scores: Option<&[f32]>) -> (Vec<i32>, Vec<i32>) {
    let mut labels = labels.to_vec();
    let mut keys = vec![0u64; args.shard_len];
    let mut sampled = vec![-7i32; args.shard_len];
    let n = sample_classes(args, &mut labels, scores, &mut keys, &mut sampled);
    assert!(n <= args.shard_len);
    sampled.truncate(n);
    (sampled, labels)
}

fn args(shard_len: usize, rate: f64, rows: usize, seed: u64, step: u64) -> SampleArgs {
    SampleArgs {
        shard_len,
        shard_start: 1000,
        num_sample: target_size(rate, shard_len),
        rows,
        seed,
        step,
        hard_fraction: 0.0,
    }
}

/// Every structural property of one draw.
fn check_sample(a: &SampleArgs, labels: &[i32], sampled: &[i32], remapped: &[i32]) {
    let positives: BTreeSet<i32> = labels.iter().copied().filter(|&l| l >= 0).collect();
    let want = if a.num_sample >= a.shard_len {
        a.shard_len
    } else {
        a.num_sample.max(positives.len())
    };
    assert_eq!(
        sampled.len(),
        want,
        "size for {a:?} with {} positives",
        positives.len()
    );
    assert!(
        sampled.windows(2).all(|w| w[0] < w[1]),
        "sorted and unique: {sampled:?}"
    );
    assert!(
        sampled
            .iter()
            .all(|&c| c >= 0 && (c as usize) < a.shard_len),
        "in range"
    );
    for p in &positives {
        assert!(sampled.binary_search(p).is_ok(), "positive {p} dropped");
    }
    for (row, (&orig, &new)) in labels.iter().zip(remapped).enumerate() {
        if orig < 0 {
            assert_eq!(new, -1, "row {row}: a label of another shard stays −1");
        } else {
            assert!(
                new >= 0 && (new as usize) < sampled.len(),
                "row {row}: remap {new}"
            );
            assert_eq!(
                sampled[new as usize], orig,
                "row {row}: remap points elsewhere"
            );
        }
    }
}

/// Labels of `rows` rows, about a quarter of them of another shard (−1).
fn labels_strategy(max_shard: usize) -> impl Strategy<Value = (usize, Vec<i32>)> {
    (1..=max_shard).prop_flat_map(|shard| {
        let label = prop_oneof![1 => Just(-1i32), 3 => 0..shard as i32];
        (Just(shard), proptest::collection::vec(label, 0..48))
    })
}

fn rate_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![1 => Just(0.0), 1 => Just(1.0), 4 => 0.0..1.0f64]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_sample_has_every_structural_property(
        (shard, labels) in labels_strategy(300),
        rate in rate_strategy(),
        seed in any::<u64>(),
        step in 0u64..1_000_000,
    ) {
        let a = args(shard, rate, labels.len(), seed, step);
        let (sampled, remapped) = draw(&a, &labels, None);
        check_sample(&a, &labels, &sampled, &remapped);
        if rate == 0.0 {
            let positives: Vec<i32> =
                labels.iter().copied().filter(|&l| l >= 0).collect::<BTreeSet<_>>().into_iter().collect();
            prop_assert_eq!(&sampled, &positives, "r = 0 keeps the positives only");
        }
        if rate == 1.0 {
            prop_assert_eq!(sampled.clone(), (0..shard as i32).collect::<Vec<_>>());
        }
        // A function of (seed, step): drawing again gives the same sample and remap.
        let (again, remapped_again) = draw(&a, &labels, None);
        prop_assert_eq!(sampled, again);
        prop_assert_eq!(remapped, remapped_again);
    }

    #[test]
    fn hard_negatives_are_the_top_scores(
        (shard, labels) in labels_strategy(300),
        rate in 0.0..1.0f64,
        fraction in prop_oneof![Just(1.0f64), 0.0..1.0f64],
        seed in any::<u64>(),
    ) {
        // Distinct scores in [-1, 1] (a shuffled ladder), so "the top scores" is unambiguous.
        let mut rng = Rng::new(seed);
        let mut scores: Vec<f32> = (0..shard).map(|c| -1.0 + 2.0 * c as f32 / shard as f32).collect();
        for i in (1..shard).rev() {
            scores.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let a = SampleArgs { hard_fraction: fraction as f32, ..args(shard, rate, labels.len(), seed, 3) };
        let (sampled, remapped) = draw(&a, &labels, Some(&scores));
        check_sample(&a, &labels, &sampled, &remapped);

        let positives: BTreeSet<i32> = labels.iter().copied().filter(|&l| l >= 0).collect();
        let fill = a.num_sample.saturating_sub(positives.len());
        let hard = ((fraction as f32 as f64) * fill as f64).round() as usize;
        let mut negatives: Vec<i32> = (0..shard as i32).filter(|c| !positives.contains(c)).collect();
        negatives.sort_by(|&p, &q| scores[q as usize].total_cmp(&scores[p as usize]));
        for c in &negatives[..hard.min(negatives.len())] {
            prop_assert!(sampled.binary_search(c).is_ok(), "hard negative {} (score {}) missing", c, scores[*c as usize]);
        }
        if fraction == 1.0 {
            let chosen: BTreeSet<i32> = sampled.iter().copied().filter(|c| !positives.contains(c)).collect();
            let top: BTreeSet<i32> = negatives[..fill.min(negatives.len())].iter().copied().collect();
            prop_assert_eq!(chosen, top, "with fraction 1 the negatives are exactly the top scores");
        }
    }
}

#[test]
fn the_sample_changes_with_the_step_and_the_seed() {
    // Choosing 100 of 1000 classes: two equal draws would take a 1 in C(990, 90) coincidence.
    let labels: Vec<i32> = vec![3, 500, 999, -1, 3, 42, 7, 8, 9, 10];
    let mut seen = BTreeSet::new();
    for seed in [1u64, 2] {
        for step in 0..25 {
            let a = args(1000, 0.1, labels.len(), seed, step);
            let (sampled, remapped) = draw(&a, &labels, None);
            check_sample(&a, &labels, &sampled, &remapped);
            assert!(
                seen.insert(sampled),
                "seed {seed}, step {step} repeats an earlier sample"
            );
        }
    }
    // Same (seed, step), another shard: the generator is keyed by global class id.
    let a = args(1000, 0.1, labels.len(), 1, 0);
    let b = SampleArgs {
        shard_start: 5000,
        ..a
    };
    assert_ne!(draw(&a, &labels, None).0, draw(&b, &labels, None).0);
}

/// z with P(Z <= z) = p for a standard normal: bisection on Φ(z), which is computed by Simpson
/// integration of the density from 0 (accurate to ~1e-12 for the |z| < 5 needed here).
fn normal_quantile(p: f64) -> f64 {
    let phi = |z: f64| {
        let n = 2000;
        let h = z / n as f64;
        let f = |t: f64| (-t * t / 2.0).exp();
        let mut s = f(0.0) + f(z);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        0.5 + s * h / 3.0 / (2.0 * std::f64::consts::PI).sqrt()
    };
    let (mut lo, mut hi) = (-8.0, 8.0);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if phi(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Wilson–Hilferty: (X/ν)^(1/3) is close to normal with mean 1 − 2/(9ν) and variance 2/(9ν), so
/// the p-quantile of χ²_ν is ν·(1 − 2/(9ν) + z_p·√(2/(9ν)))³.
fn chi_square_quantile(nu: f64, p: f64) -> f64 {
    let v = 2.0 / (9.0 * nu);
    nu * (1.0 - v + normal_quantile(p) * v.sqrt()).powi(3)
}

#[test]
fn quantile_helpers_match_tables() {
    // Standard tables: z_0.999 = 3.0902, χ²_10 at 0.999 = 29.588, χ²_100 at 0.001 = 61.918.
    assert!((normal_quantile(0.999) - 3.0902).abs() < 1e-3);
    assert!((chi_square_quantile(10.0, 0.999) - 29.588).abs() < 0.3);
    assert!((chi_square_quantile(100.0, 0.001) - 61.918).abs() < 0.3);
}

/// Each of 200 classes is picked about equally often over 5000 draws of S = 20 (no positives).
///
/// A draw of S out of K without replacement has indicator covariance p(1−p)·K/(K−1)·(I − 11ᵀ/K)
/// with p = S/K, so Pearson's X² = Σ (O − E)²/E over n draws tends to (1−p)·K/(K−1) · χ²_{K−1}.
/// The rescaled statistic must lie between the 0.1% and 99.9% quantiles of χ²_{K−1}: too high is a
/// biased sampler, too low one that cycles instead of drawing at random.
#[test]
fn random_negatives_are_uniform() {
    let (k, s, draws) = (200usize, 20usize, 5000u64);
    let mut counts = vec![0u64; k];
    for step in 0..draws {
        let a = SampleArgs {
            num_sample: s,
            ..args(k, 0.0, 0, 0x5eed, step)
        };
        let (sampled, _) = draw(&a, &[], None);
        assert_eq!(sampled.len(), s);
        for c in sampled {
            counts[c as usize] += 1;
        }
    }
    let expected = (draws as usize * s) as f64 / k as f64;
    let x2: f64 = counts
        .iter()
        .map(|&o| (o as f64 - expected).powi(2) / expected)
        .sum();
    let p = s as f64 / k as f64;
    let statistic = x2 / ((1.0 - p) * k as f64 / (k as f64 - 1.0));
    let nu = (k - 1) as f64;
    let (low, high) = (
        chi_square_quantile(nu, 0.001),
        chi_square_quantile(nu, 0.999),
    );
    eprintln!("chi-square {statistic:.1} (ν = {nu}), accepted [{low:.1}, {high:.1}]");
    assert!(
        statistic < high,
        "non-uniform: {statistic} >= {high}; counts {counts:?}"
    );
    assert!(
        statistic > low,
        "too regular to be random: {statistic} <= {low}"
    );
}

/// Through the layer: with `Hard { fraction: 1 }`, the sampled negatives are the classes whose
/// best cosine against the batch is highest (computed here independently, in f64).
fn hard_negatives_through_the_layer(rows: usize, batch_per_rank: usize, rate: f64) {
    let (classes, dim) = (300usize, 8usize);
    let mut rng = Rng::new(21);
    let w = rng.normal_vec(classes * dim, 1.0);
    let x = rng.normal_vec(rows * dim, 1.0);
    let labels: Vec<i64> = (0..rows).map(|i| (i * 37 % classes) as i64).collect();
    let mut cfg = LayerConfig::new(classes as u64, dim, batch_per_rank);
    cfg.sample_rate = rate;
    cfg.sampler = NegativeSampler::Hard { fraction: 1.0 };
    let mut layer = PartialFc::zeroed(cfg, CpuBackend, SingleRank).unwrap();
    layer.set_weight(&w).unwrap();
    let out = layer.forward_backward(&x, &labels).unwrap();
    let sampled = layer.sampled_classes().unwrap();
    assert_eq!(out.sampled, sampled.len());

    let unit = |v: &[f32]| {
        let n = v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|a| f64::from(*a) / n).collect::<Vec<f64>>()
    };
    let xs: Vec<Vec<f64>> = x.chunks(dim).map(unit).collect();
    let score = |c: usize| {
        let wc = unit(&w[c * dim..(c + 1) * dim]);
        xs.iter()
            .map(|xh| xh.iter().zip(&wc).map(|(a, b)| a * b).sum::<f64>())
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let positives: BTreeSet<i64> = labels.iter().copied().collect();
    let want_len = ((rate * classes as f64) as usize).max(positives.len());
    assert_eq!(sampled.len(), want_len);
    let (mut chosen_min, mut left_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for c in (0..classes as i64).filter(|c| !positives.contains(c)) {
        let s = score(c as usize);
        if sampled.binary_search(&c).is_ok() {
            chosen_min = chosen_min.min(s);
        } else {
            left_max = left_max.max(s);
        }
    }
    assert!(
        chosen_min >= left_max - 1e-5,
        "{rows} of {batch_per_rank} rows: a negative of score {left_max} was left out for one of {chosen_min}"
    );
}

#[test]
fn hard_negatives_through_the_layer_are_the_top_scores() {
    hard_negatives_through_the_layer(16, 16, 0.3);
}

/// A ragged batch (1 real row of 16): padding rows must not count as embeddings. With one row,
/// about half of the classes have a negative best cosine, and r = 0.8 must rank those too.
#[test]
fn hard_negatives_ignore_the_padding_of_a_ragged_batch() {
    hard_negatives_through_the_layer(1, 16, 0.8);
}

/// A shard with no positive in the gathered batch and floor(r · shard) = 0 samples nothing; it
/// must say so, not trip over an empty selection (proptest found this case: `radix select` of the
/// 0-th largest key).
#[test]
fn a_shard_without_positives_at_r_zero_samples_nothing() {
    let labels = vec![-1i32; 6];
    let a = args(40, 0.0, labels.len(), 5, 0);
    let (sampled, remapped) = draw(&a, &labels, None);
    assert!(sampled.is_empty());
    assert_eq!(remapped, labels);
}
