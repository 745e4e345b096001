//! The whole step on the CUDA backend against the CPU reference over randomly drawn layer
//! configurations: world size 1 (the one-kernel softmax) and 2–3 virtual ranks through the
//! host-staged collective (the three passes with their all-reduces), odd and tiny embedding
//! dimensions, sample counts that are not a multiple of the logits' row alignment, partial and
//! empty per-rank batches, every margin option but the inter-class filter, random and hard
//! negatives, sparse and dense updates, and the f32/f16/bf16 all-gather wires. The fixed-shape
//! tests (tests/cuda_kernels.rs, tests/cuda_nccl.rs) each vary one option; this one crosses them.
//!
//! Each case is printed before it runs, so a failure names its configuration. `PFC_FUZZ_CASES`
//! (default 24) and `PFC_FUZZ_SEED` (default 1) draw other cases. The inter-class filter is left
//! out on purpose: the two backends' GEMMs round differently, so a cosine within an f32 rounding
//! of the threshold would be filtered on one and not the other; the kernel tests check the filter
//! on identical cosines. Hard negatives carry the same risk at the selection boundary (a tie
//! between two classes' best cosines): a swap of one or two classes there is reported and ends
//! the case's comparison; any other difference of the sample fails.
#![cfg(feature = "cuda")]

mod common;
mod cuda_device;
mod golden_support;
mod hard_sample;

use common::{reference, to_f64, RefMargin, Rng};
use cuda_device::gpu;
use golden_support::assert_close_in_row;
use hard_sample::{check_hard_sample, Pass};
use partial_fc::collective::{HostStaged, ThreadGroup};
use partial_fc::cuda::CudaBackend;
use partial_fc::plan::Dtype;
use partial_fc::{
    Backend, Collective, CpuBackend, GradMode, LayerConfig, Margin, NegativeSampler, Optimizer,
    PartialFc, TargetFallback, UpdateMode,
};

/// Picks one of `from`.
fn pick<T: Copy>(rng: &mut Rng, from: &[T]) -> T {
    from[rng.below(from.len() as u64) as usize]
}

/// One drawn case: the layer's configuration, the world size, and each rank's rows per step.
#[derive(Debug)]
struct Case {
    world: usize,
    cfg: LayerConfig,
    /// rows[step][rank]: how many rows the rank passes (0..=batch_per_rank).
    rows: Vec<Vec<usize>>,
    data_seed: u64,
}

fn draw(rng: &mut Rng) -> Case {
    let world = 1 + rng.below(3) as usize;
    let dim = pick(rng, &[1usize, 2, 3, 5, 8, 17, 32, 33, 64, 130]);
    let batch = 1 + rng.below(40) as usize;
    let classes = world as u64 * 2 + rng.below(6000);
    let mut cfg = LayerConfig::new(classes, dim, batch);
    cfg.sample_rate = pick(rng, &[0.0, 0.013, 0.1, 0.37, 1.0]);
    cfg.margin = match rng.below(4) {
        0 => Margin::arcface(),
        1 => Margin::cosface(),
        2 => Margin::combined(30.0, 1.0, 0.3, 0.2),
        _ => Margin::combined(16.0, 1.5, 0.2, 0.1),
    };
    // The Exact slope m1·sin(m1·θ + m2)/sin θ is ill-conditioned near θ = 0 (its derivative
    // grows as 1/θ², and at d = 1, where every cosine is ±1, it is singular: sin θ floored at
    // 1e-6). At d <= 5 random rows put target angles that close to 0 often, and there one ulp
    // of the cosine, which cuBLAS and the CPU GEMM round their own ways, moves the slope by
    // percents: a difference of conditioning, not of the kernels. The draw is made either way,
    // so the sequence of cases stays the same.
    if rng.below(2) == 0 && dim > 5 {
        cfg.margin.grad_mode = GradMode::Exact;
    }
    if rng.below(2) == 0 {
        cfg.margin.fallback = TargetFallback::Monotonic;
    }
    cfg.sampler = match rng.below(3) {
        0 => NegativeSampler::Hard {
            fraction: pick(rng, &[0.25, 1.0]),
        },
        _ => NegativeSampler::Random,
    };
    cfg.update = pick(rng, &[UpdateMode::Sparse, UpdateMode::Dense]);
    cfg.wire = pick(rng, &[Dtype::F32, Dtype::F32, Dtype::F16, Dtype::Bf16]);
    cfg.seed = rng.next_u64();
    let mut rows: Vec<Vec<usize>> = (0..2)
        .map(|_| {
            (0..world)
                .map(|_| match rng.below(4) {
                    0 => rng.below(batch as u64 + 1) as usize, // a partial (or empty) batch
                    _ => batch,
                })
                .collect()
        })
        .collect();
    for step in &mut rows {
        if step.iter().all(|&r| r == 0) {
            step[0] = 1; // some rank must pass a row, or there is no loss
        }
    }
    Case {
        world,
        cfg,
        rows,
        data_seed: rng.next_u64(),
    }
}

/// Embeddings away from zero (|v| >= 0.05, so no row is rejected as zero) and labels anywhere.
fn batch(case: &Case, step: usize, rank: usize) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng::new(case.data_seed ^ ((step as u64 * 1_000_003 + rank as u64 + 1) * 0x9E37));
    let n = case.rows[step][rank];
    let d = case.cfg.dim;
    let x = (0..n * d)
        .map(|_| {
            let v = (0.05 + 0.95 * rng.uniform()) as f32;
            if rng.below(2) == 0 {
                v
            } else {
                -v
            }
        })
        .collect();
    let labels = (0..n)
        .map(|_| rng.below(case.cfg.num_classes) as i64)
        .collect();
    (x, labels)
}

/// The whole gathered batch of `step` (every rank's real rows, in rank order) as each rank
/// normalizes it: after the wire's rounding.
fn gathered(case: &Case, step: usize) -> (Vec<f32>, Vec<i64>) {
    let (mut x, mut labels) = (vec![], vec![]);
    for rank in 0..case.world {
        let (xr, lr) = batch(case, step, rank);
        x.extend(xr.iter().map(|&v| match case.cfg.wire {
            Dtype::F32 => v,
            wire => partial_fc::cpu::wire::from_wire(partial_fc::cpu::wire::to_wire(v, wire), wire),
        }));
        labels.extend(lr);
    }
    (x, labels)
}

/// What one rank saw over two steps.
#[derive(Debug)]
struct RankRun {
    shard_start: u64,
    /// The weights before each step's pass.
    before: Vec<Vec<f32>>,
    losses: Vec<f32>,
    samples: Vec<Vec<i64>>,
    grads: Vec<Vec<f32>>,
    /// d loss / d weights of the shard (dense).
    weight_grads: Vec<Vec<f32>>,
    weights: Vec<Vec<f32>>,
}

fn two_steps<B: Backend, C: Collective<B>>(
    case: &Case,
    rank: usize,
    layer: &mut PartialFc<B, C>,
) -> RankRun {
    // Class centers of norm ~1 in every dimension (the default init, N(0, 0.01²), gives rows
    // of norm 0.01·√d: at d = 2 the normalization's backward scales the gradient by ~70 and a
    // step at this learning rate turns the row around, so the two backends' f32 roundings
    // grow by orders of magnitude from one step to the next, which says nothing of the kernels).
    let shard = layer.shard();
    let d = case.cfg.dim;
    let w = partial_fc::init::normal_rows(case.data_seed, shard.start, shard.len as usize, d, 1.0);
    let w: Vec<f32> = w.iter().map(|v| v / (d as f32).sqrt()).collect();
    layer.set_weight(&w).unwrap();
    let mut run = RankRun {
        shard_start: shard.start,
        before: vec![],
        losses: vec![],
        samples: vec![],
        grads: vec![],
        weight_grads: vec![],
        weights: vec![],
    };
    for step in 0..2 {
        let (x, labels) = batch(case, step, rank);
        run.before.push(layer.weight().unwrap());
        let out = layer.forward_backward(&x, &labels).unwrap();
        run.losses.push(out.loss);
        run.samples.push(layer.sampled_classes().unwrap());
        run.grads.push(out.grad_embeddings);
        run.weight_grads.push(layer.weight_grad_dense().unwrap());
        layer.step(LR).unwrap();
        run.weights.push(layer.weight().unwrap());
    }
    run
}

fn cpu(case: &Case) -> Vec<RankRun> {
    ThreadGroup::run(case.world, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(case.cfg.clone(), CpuBackend, comm).unwrap();
        two_steps(case, rank, &mut layer)
    })
}

fn cuda(case: &Case) -> Vec<RankRun> {
    ThreadGroup::run(case.world, |comm| {
        let rank = comm.rank();
        let g = CudaBackend::new(0).unwrap();
        let mut layer = PartialFc::new(case.cfg.clone(), g, HostStaged::new(comm)).unwrap();
        assert_eq!(
            layer.memory_report(),
            layer.planned_memory(),
            "rank {rank}: allocation != planner"
        );
        two_steps(case, rank, &mut layer)
    })
}

/// The learning rate of every step.
const LR: f32 = 0.3;

/// f32's unit roundoff, 2⁻²⁴.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// At d = 1, per class: a bound on |d loss / d ŵ| (the gradient before the normalization's
/// backward, ŵ = ±1), from the f64 reference over the pass's whole sample: the sum over the
/// rows of the magnitudes of its terms, s·|p − y|/M each (straight-through: the draw keeps
/// `GradMode::Exact` off at d <= 5).
fn d1_grad_w_hat_bound(
    case: &Case,
    want: &[RankRun],
    step: usize,
    x: &[f32],
    labels: &[i64],
) -> Vec<f64> {
    assert_eq!(case.cfg.margin.grad_mode, GradMode::StraightThrough);
    let mut w = vec![0.0; case.cfg.num_classes as usize];
    let mut cols = vec![];
    for run in want {
        let start = run.shard_start as usize;
        let before = &run.before[step];
        w[start..start + before.len()].copy_from_slice(&to_f64(before));
        cols.extend(run.samples[step].iter().map(|&c| c as usize));
    }
    cols.sort_unstable();
    let margin = RefMargin::of(&case.cfg.margin);
    reference(&to_f64(x), &w, labels, 1, &cols, &margin).grad_w_hat_abs
}

/// The weights of one rank after `step` at d = 1, where each center's gradient is the rounding
/// noise of an exact cancellation: the normalization's backward `(g − ŵ(g·ŵ))/|w|` with ŵ = ±1.
///
/// Each backend computes ŵ = w·fl(1/fl(√fl(w²))), within 3.5u of ±1 (u = 2⁻²⁴), so ŵ² is within
/// 7u of 1; `fl(g·ŵ)` adds u and `ŵ·dot`, rounded or fused, another: `g − ŵ·dot` is at most
/// 9u·|g| before its own rounding and the product by `fl(1/|w|)` (2u more, relative). So
/// |d loss / d w| <= 10u·G/|w| on either backend, G the sum of the magnitudes of g's terms
/// (`d1_grad_w_hat_bound`; an f32 sum of them and their f32 probabilities stay within 1% of
/// it), and the two backends' gradients differ by at most twice that.
///
/// SGD then moves the difference as it moves the gradient (`v ← μv + g + λw`,
/// `w ← w − lr·v`): the momentum difference is μ·(the last one) + 2·10u·G/|w| + λ·(the weight
/// difference), and each step adds lr times it to the weights' difference, plus each
/// backend's rounding of `w − lr·v` (u·|w| each, the momentum's own roundings, scaled by lr,
/// are orders of magnitude smaller: u more covers them). A row the step does not touch (sparse,
/// not sampled) keeps both differences. Also each backend's gradient itself is held to its
/// noise bound.
fn assert_d1_weights(
    case: &Case,
    step: usize,
    rank: usize,
    want: &[RankRun],
    got: &[RankRun],
    grad_w_hat: &[Vec<f64>],
) {
    let (w, g) = (&want[rank], &got[rank]);
    let what = format!("rank {rank}, step {step}");
    let Some(Optimizer::Sgd(sgd)) = case.cfg.optimizer else {
        panic!("the d = 1 bound models SGD with momentum")
    };
    let (lr, mu, decay) = (
        f64::from(LR),
        f64::from(sgd.momentum),
        f64::from(sgd.weight_decay),
    );
    let noise = |k: usize, j: usize| {
        let global = w.shard_start as usize + j;
        10.0 * U * grad_w_hat[k][global] / f64::from(w.before[k][j]).abs()
    };
    let (mut worst_grad, mut worst) = (0.0f64, 0.0f64);
    for (run, who) in [(w, "cpu"), (g, "gpu")] {
        for (j, &gj) in run.weight_grads[step].iter().enumerate() {
            let bound = noise(step, j);
            if gj != 0.0 {
                worst_grad = worst_grad.max(f64::from(gj).abs() / bound);
            }
            assert!(
                f64::from(gj).abs() <= bound,
                "{what}: {who} d loss / d w[{j}] at d = 1 should be noise-small: {gj:e},                  bound {bound:e}"
            );
        }
    }
    for (j, (&gw, &ww)) in g.weights[step].iter().zip(&w.weights[step]).enumerate() {
        let (mut dv, mut dw) = (0.0f64, 0.0f64);
        for k in 0..=step {
            let global = w.shard_start as i64 + j as i64;
            let touched = case.cfg.update == UpdateMode::Dense || w.samples[k].contains(&global);
            if touched {
                dv = mu * dv + 2.0 * noise(k, j) + decay * dw;
                dw += lr * dv + 3.0 * U * f64::from(w.weights[k][j]).abs();
            }
        }
        let err = (f64::from(gw) - f64::from(ww)).abs();
        if err > 0.0 {
            worst = worst.max(err / dw);
        }
        assert!(
            err <= dw,
            "{what}: weights[{j}] at d = 1: gpu {gw} cpu {ww}, error {err:e} > bound {dw:e}              (|w| {:e})",
            ww.abs()
        );
    }
    eprintln!(
        "  {what}: d = 1 noise: worst gradient {worst_grad:.2e} of its bound, worst weight \
         error {worst:.2e} of its bound"
    );
}

#[test]
fn random_configurations_match_cpu() {
    if gpu().is_none() {
        return;
    }
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (cases, seed) = (var("PFC_FUZZ_CASES", 24), var("PFC_FUZZ_SEED", 1));
    let mut rng = Rng::new(0x5EED_F0F0 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut padded = 0;
    for i in 0..cases {
        let case = draw(&mut rng);
        let c = &case.cfg;
        println!(
            "case {i} (PFC_FUZZ_SEED={seed}): world {}, C {}, d {}, N {}, r {}, {:?}, {:?}, \
             {:?} wire, margin s={} m=({}, {}, {}) {:?} {:?}, rows {:?}",
            case.world,
            c.num_classes,
            c.dim,
            c.batch_per_rank,
            c.sample_rate,
            c.sampler,
            c.update,
            c.wire,
            c.margin.scale,
            c.margin.m1,
            c.margin.m2,
            c.margin.m3,
            c.margin.grad_mode,
            c.margin.fallback,
            case.rows
        );
        let (want, got) = (cpu(&case), cuda(&case));
        // At d = 1, per step: the bound of each class's d loss / d ŵ (see below).
        let mut grad_w_hat = vec![];
        'steps: for step in 0..2 {
            let (x, labels) = gathered(&case, step);
            for (rank, (w, g)) in want.iter().zip(&got).enumerate() {
                // Random negatives come from the same counter-based keys: always the same. Hard
                // ones rank classes by a cosine each backend's GEMM rounds its own way, so
                // classes within an f32 rounding of the selection boundary may swap: each sample
                // must be one the sampler could draw from these inputs with scores that close to
                // the exact ones (tests/hard_sample), and a swap of a class or two is allowed,
                // after which the two runs have different inputs.
                let what = format!("case {i}, rank {rank}, step {step}");
                let pass = Pass {
                    shard_start: w.shard_start,
                    dim: c.dim,
                    weight: &w.before[step],
                    other_weight: &g.before[step],
                    x: &x,
                    labels: &labels,
                    seed: c.seed,
                    step: step as u64,
                    fraction: match c.sampler {
                        NegativeSampler::Hard { fraction } => fraction,
                        NegativeSampler::Random => 0.0,
                    },
                };
                let boundary = check_hard_sample(&what, &pass, &w.samples[step], &g.samples[step]);
                if matches!(c.sampler, NegativeSampler::Hard { .. }) {
                    println!("  {boundary}");
                }
                if g.samples[step] == w.samples[step] {
                    continue;
                }
                let only_in = |a: &[i64], b: &[i64]| a.iter().filter(|c| !b.contains(c)).count();
                let swapped = only_in(&g.samples[step], &w.samples[step])
                    .max(only_in(&w.samples[step], &g.samples[step]));
                assert!(swapped <= 2, "{what}: sample differs in {swapped} classes");
                println!(
                    "{what}: {swapped} hard negative(s) swapped at the selection boundary; the \
                     rest of the case is not compared"
                );
                break 'steps;
            }
            if c.dim == 1 {
                grad_w_hat.push(d1_grad_w_hat_bound(&case, &want, step, &x, &labels));
            }
            for (rank, (w, g)) in want.iter().zip(&got).enumerate() {
                let what = format!("case {i}, rank {rank}, step {step}");
                padded += usize::from(w.samples[step].len() % 8 != 0);
                let (gl, wl) = (g.losses[step], w.losses[step]);
                assert!(
                    (gl - wl).abs() <= 1e-6 + 1e-4 * wl.abs(),
                    "{what}: loss gpu {gl} cpu {wl}"
                );
                if c.dim == 1 {
                    // At d = 1 the normalization's backward projects the whole gradient out
                    // (x̂ = ±1): both backends return the rounding noise of that cancellation,
                    // which differs wherever any rounding does. Both must be noise-small: a
                    // few ulps of the terms that cancel, |∂L/∂x̂| <= 2s/M, over |x|.
                    let (x, _) = batch(&case, step, rank);
                    let m: usize = case.rows[step].iter().sum();
                    let terms = 2.0 * c.margin.scale as f32 / m as f32;
                    for (i, xi) in x.iter().enumerate() {
                        let noise = 128.0 * 2f32.powi(-24) * terms / xi.abs();
                        let (gi, wi) = (g.grads[step][i], w.grads[step][i]);
                        assert!(
                            gi.abs() <= noise && wi.abs() <= noise,
                            "{what}: grad_embeddings[{i}] at d = 1 should be ~0: gpu {gi:e}, \
                             cpu {wi:e}, bound {noise:e}"
                        );
                    }
                } else {
                    assert_close_in_row(
                        &format!("{what}: grad_embeddings"),
                        &g.grads[step],
                        &w.grads[step],
                        c.dim,
                    );
                }
                if c.dim == 1 {
                    assert_d1_weights(&case, step, rank, &want, &got, &grad_w_hat);
                } else {
                    assert_close_in_row(
                        &format!("{what}: weights"),
                        &g.weights[step],
                        &w.weights[step],
                        c.dim,
                    );
                }
            }
        }
    }
    // The draw must reach the padded logits layout, or the test checks less than it says.
    assert!(
        padded > 0 || cases < 8,
        "no case sampled a count that is not a multiple of 8"
    );
    println!(
        "{cases} random configurations: the CUDA step matches the CPU ({padded} padded samples)"
    );
}

/// The sample check itself (tests/hard_sample), on the CPU sampler: it accepts a swap of two
/// classes tied at the selection boundary, also when the swap moves the random fill (a random
/// pick far from the boundary then differs), and refuses a class put anywhere else.
#[test]
fn hard_sample_check_accepts_boundary_swaps_only() {
    use partial_fc::cpu::sampling::sample_classes;
    use partial_fc::SampleArgs;
    let (shard, d, seed, step, fraction) = (300usize, 8usize, 77u64, 3u64, 0.5f64);
    let mut rng = Rng::new(5);
    let x: Vec<f32> = (0..4 * d).map(|_| rng.uniform() as f32 - 0.5).collect();
    let labels: Vec<i64> = vec![3, 150, 151, 299];
    let mut w = partial_fc::init::normal_rows(seed, 0, shard, d, 1.0);
    let args = SampleArgs {
        shard_len: shard,
        shard_start: 0,
        num_sample: 60,
        rows: labels.len(),
        seed,
        step,
        hard_fraction: fraction as f32,
    };
    let scores = |w: &[f32]| -> Vec<f32> {
        let unit = |v: &[f32]| {
            let n = v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
            v.iter().map(|&a| f64::from(a) / n).collect::<Vec<f64>>()
        };
        w.chunks(d)
            .map(|c| {
                let c = unit(c);
                x.chunks(d)
                    .map(|r| unit(r).iter().zip(&c).map(|(a, b)| a * b).sum::<f64>())
                    .fold(f64::NEG_INFINITY, f64::max) as f32
            })
            .collect()
    };
    let sample = |s: &[f32]| -> Vec<i64> {
        let mut local: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
        let (mut keys, mut out) = (vec![0u64; shard], vec![0i32; shard]);
        let n = sample_classes(&args, &mut local, Some(s), &mut keys, &mut out);
        out[..n].iter().map(|&c| i64::from(c)).collect()
    };
    // 56 negative slots: 28 hard, 28 random. Let the class of a random pick `b` tie with the
    // last hard negative `a` (the same center): either may take the hard slot, and where `b`
    // takes it, `a` is left to the random fill, where its key loses: the next key gets in.
    let s = scores(&w);
    let before = sample(&s);
    let mut ranked: Vec<usize> = (0..shard)
        .filter(|c| !labels.contains(&(*c as i64)))
        .collect();
    ranked.sort_by(|&p, &q| s[q].total_cmp(&s[p]).then(p.cmp(&q)));
    let a = ranked[27];
    let b = *before
        .iter()
        .map(|c| *c as usize)
        .filter(|&c| s[c] < s[a] && c > a)
        .collect::<Vec<_>>()
        .first()
        .expect("a random pick above the last hard negative's id");
    let center = w[a * d..(a + 1) * d].to_vec();
    w[b * d..(b + 1) * d].copy_from_slice(&center);
    let mut s = scores(&w);
    let first = sample(&s); // the tie goes to the smaller id, a
    s[b] = f32::from_bits(s[b].to_bits() + 1); // one ulp: now b is hard
    let second = sample(&s);
    let pass = Pass {
        shard_start: 0,
        dim: d,
        weight: &w,
        other_weight: &w,
        x: &x,
        labels: &labels,
        seed,
        step,
        fraction,
    };
    let line = check_hard_sample("swap", &pass, &first, &second);
    println!("{line}");
    let only = |p: &[i64], q: &[i64]| -> Vec<i64> {
        p.iter().filter(|c| !q.contains(c)).copied().collect()
    };
    let (lost, got) = (only(&first, &second), only(&second, &first));
    assert_eq!(lost, vec![a as i64], "the swap drops the tied class");
    assert!(
        got.len() == 1 && got[0] != b as i64,
        "the swap should move the random fill: gained {got:?}"
    );
    // A class put in the place of that random pick, of a hard negative or of the tied one
    // (the lowest-scoring class outside the sample, or another far from the boundary) fails.
    let outside: Vec<i64> = ranked
        .iter()
        .rev()
        .map(|&c| c as i64)
        .filter(|c| !second.contains(c))
        .take(3)
        .collect();
    for (i, drop) in [got[0], ranked[5] as i64, b as i64].into_iter().enumerate() {
        let mut wrong: Vec<i64> = second.iter().copied().filter(|&c| c != drop).collect();
        wrong.push(outside[i]);
        wrong.sort_unstable();
        let refused =
            std::panic::catch_unwind(|| check_hard_sample("wrong", &pass, &first, &wrong));
        let message = refused
            .as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned());
        assert!(
            message.is_some(),
            "class {drop} replaced by {}: not refused",
            outside[i]
        );
        println!(
            "class {drop} replaced by {}: {}",
            outside[i],
            message.unwrap()
        );
    }
}
