//! Gradient accumulation (`forward_backward_accumulate`): the class centers' gradient that `step`
//! applies is the sum of the passes' gradients since the last step, each pass with its own
//! sample, as PyTorch's `backward()` sums into `weight.grad`. Checked against a twin layer that
//! runs the same passes one at a time (the sampler is keyed by the pass counter, so both draw the
//! same samples), on one rank and on three thread ranks, with the refusals around it.

mod common;

use common::Rng;
use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::{Collective, CpuBackend, LayerConfig, PartialFc, PfcError, Sgd, UpdateMode};

const CLASSES: u64 = 503;
const DIM: usize = 12;
const BATCH: usize = 9;

fn config(update: UpdateMode) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH);
    cfg.sample_rate = 0.2;
    cfg.update = update;
    cfg.optimizer = Some(Sgd::default().into());
    cfg.seed = 7;
    cfg
}

/// Micro-batch `i` of a rank: embeddings and labels.
fn batch(i: u64, rank: usize) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng::new(1000 * i + rank as u64);
    let x = rng.normal_vec(BATCH * DIM, 1.0);
    let labels = (0..BATCH).map(|_| rng.below(CLASSES) as i64).collect();
    (x, labels)
}

fn add(sum: &mut [f32], g: &[f32]) {
    for (s, g) in sum.iter_mut().zip(g) {
        *s += g;
    }
}

/// One rank's check: `passes` accumulated passes against the same passes run one at a time, then
/// the update from their sum.
fn accumulate_and_compare<C, D>(acc_comm: C, plain_comm: D, rank: usize, passes: u64)
where
    C: Collective<CpuBackend>,
    D: Collective<CpuBackend>,
{
    let cfg = config(UpdateMode::Dense);
    let mut acc = PartialFc::new(cfg.clone(), CpuBackend, acc_comm).unwrap();
    let mut plain = PartialFc::new(cfg, CpuBackend, plain_comm).unwrap();
    let mut sum = vec![0.0f32; acc.shard().len as usize * DIM];
    for i in 0..passes {
        let (x, labels) = batch(i, rank);
        let a = acc.forward_backward_accumulate(&x, &labels).unwrap();
        let p = plain.forward_backward(&x, &labels).unwrap();
        // The pass itself is the plain one: same sample, loss and embedding gradient.
        assert_eq!(a, p, "pass {i}");
        assert_eq!(
            acc.sampled_classes().unwrap(),
            plain.sampled_classes().unwrap()
        );
        add(&mut sum, &plain.weight_grad_dense().unwrap());
        assert_eq!(acc.weight_grad_dense().unwrap(), sum, "sum after pass {i}");
    }
    // The samples differed between passes (else the test would not tell a sum from a copy):
    // the sum has rows of more classes than one pass samples.
    let rows_in_sum = sum
        .chunks(DIM)
        .filter(|r| r.iter().any(|g| *g != 0.0))
        .count();
    let one_sample = acc.sampled_classes().unwrap().len();
    assert!(
        passes == 1 || rows_in_sum > one_sample,
        "{rows_in_sum} rows in the sum, {one_sample} in one sample"
    );

    // One update from the sum: SGD from zero momentum is w ← w − lr (g + λ w).
    let (lr, wd) = (0.5f32, Sgd::default().weight_decay);
    let before = acc.weight().unwrap();
    acc.step(lr).unwrap();
    let after = acc.weight().unwrap();
    for (k, ((w0, w1), g)) in before.iter().zip(&after).zip(&sum).enumerate() {
        let want = w0 - lr * (g + wd * w0);
        assert!(
            (w1 - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "rank {rank} weight {k}: {w1} after the update, want {want}"
        );
    }
    assert_eq!(acc.optimizer_steps(), 1);
    // After the step it still reports the gradient it applied.
    assert_eq!(acc.weight_grad_dense().unwrap(), sum);
}

#[test]
fn step_applies_the_sum_of_the_accumulated_passes() {
    accumulate_and_compare(SingleRank, SingleRank, 0, 4);
}

#[test]
fn thread_ranks_each_sum_their_shard() {
    let world = 3;
    let (acc, plain) = (ThreadGroup::handles(world), ThreadGroup::handles(world));
    std::thread::scope(|s| {
        for (rank, (a, p)) in acc.into_iter().zip(plain).enumerate() {
            s.spawn(move || accumulate_and_compare(a, p, rank, 3));
        }
    });
}

#[test]
fn a_single_accumulated_pass_is_a_plain_pass() {
    accumulate_and_compare(SingleRank, SingleRank, 0, 1);
}

#[test]
fn the_sum_starts_over_after_a_step_and_a_plain_pass_replaces_it() {
    let cfg = config(UpdateMode::Dense);
    let mut acc = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let mut plain = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let run = |layer: &mut PartialFc<CpuBackend, SingleRank>, i: u64, accumulate: bool| {
        let (x, labels) = batch(i, 0);
        if accumulate {
            layer.forward_backward_accumulate(&x, &labels).unwrap();
        } else {
            layer.forward_backward(&x, &labels).unwrap();
        }
        layer.weight_grad_dense().unwrap()
    };
    run(&mut acc, 0, true);
    run(&mut acc, 1, true);
    // lr = 0 leaves the weights (and so the next gradients) as they were.
    acc.step(0.0).unwrap();
    run(&mut plain, 0, false);
    run(&mut plain, 1, false);
    plain.step(0.0).unwrap();
    // A new sum: only the pass after the step.
    assert_eq!(run(&mut acc, 2, true), run(&mut plain, 2, false));
    // A plain pass drops the sum so far.
    run(&mut acc, 3, true);
    run(&mut plain, 3, false);
    assert_eq!(run(&mut acc, 4, false), run(&mut plain, 4, false));
}

#[test]
fn a_refused_pass_keeps_the_sum() {
    let cfg = config(UpdateMode::Dense);
    let mut acc = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let mut plain = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let mut sum = vec![0.0f32; CLASSES as usize * DIM];
    for i in 0..2 {
        let (x, labels) = batch(i, 0);
        acc.forward_backward_accumulate(&x, &labels).unwrap();
        plain.forward_backward(&x, &labels).unwrap();
        add(&mut sum, &plain.weight_grad_dense().unwrap());
        if i == 0 {
            let (x, mut labels) = batch(9, 0);
            labels[3] = CLASSES as i64;
            let e = acc.forward_backward_accumulate(&x, &labels).unwrap_err();
            assert!(matches!(e, PfcError::Label { .. }), "{e}");
            assert_eq!(acc.steps(), 1, "a refused pass does not draw");
        }
    }
    assert_eq!(acc.weight_grad_dense().unwrap(), sum);
}

#[test]
fn a_sparse_layer_refuses_accumulation_and_keeps_its_gradient() {
    let mut layer = PartialFc::new(config(UpdateMode::Sparse), CpuBackend, SingleRank).unwrap();
    let (x, labels) = batch(0, 0);
    layer.forward_backward(&x, &labels).unwrap();
    let pending = layer.weight_grad_dense().unwrap();
    let e = layer.forward_backward_accumulate(&x, &labels).unwrap_err();
    match &e {
        PfcError::Param { name, .. } => assert_eq!(*name, "update"),
        other => panic!("want a Param error, got {other:?}"),
    }
    assert!(e.to_string().contains("UpdateMode::Dense"), "{e}");
    assert_eq!(layer.weight_grad_dense().unwrap(), pending);
    layer.step(0.1).unwrap();
}

#[test]
fn ranks_that_do_not_all_accumulate_are_refused_together() {
    let errors = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(UpdateMode::Dense), CpuBackend, comm).unwrap();
        let (x, labels) = batch(0, rank);
        let out = if rank == 0 {
            layer.forward_backward_accumulate(&x, &labels)
        } else {
            layer.forward_backward(&x, &labels)
        };
        (out.unwrap_err(), layer.steps())
    });
    for (rank, (e, steps)) in errors.into_iter().enumerate() {
        assert!(matches!(e, PfcError::Collective(_)), "rank {rank}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("forward_backward_accumulate") && msg.contains("every rank must make"),
            "rank {rank}: {msg}"
        );
        assert_eq!(steps, 0, "rank {rank} drew a sample");
    }
}

#[test]
fn pending_passes_counts_and_discard_grad_drops_the_sum() {
    let mut layer = PartialFc::new(config(UpdateMode::Dense), CpuBackend, SingleRank).unwrap();
    assert_eq!(layer.pending_passes(), 0);
    let (x, labels) = batch(0, 0);
    layer.forward_backward(&x, &labels).unwrap();
    assert_eq!(layer.pending_passes(), 1);
    for want in 2..=3 {
        layer.forward_backward_accumulate(&x, &labels).unwrap();
        assert_eq!(layer.pending_passes(), want);
    }
    let (before, steps) = (layer.weight().unwrap(), layer.optimizer_steps());
    layer.discard_grad();
    assert_eq!(layer.pending_passes(), 0);
    assert!(layer.weight_grad_dense().unwrap().iter().all(|g| *g == 0.0));
    let e = layer.step(0.1).unwrap_err();
    assert!(matches!(e, PfcError::Order(_)), "{e}");
    assert!(e.to_string().contains("discard_grad"), "{e}");
    assert_eq!(
        layer.weight().unwrap(),
        before,
        "discard_grad moved the weights"
    );
    assert_eq!(layer.optimizer_steps(), steps);
    // The next accumulating pass starts a new sum: its gradient alone.
    let mut fresh = PartialFc::new(config(UpdateMode::Dense), CpuBackend, SingleRank).unwrap();
    fresh.set_steps(layer.steps());
    let (x, labels) = batch(1, 0);
    layer.forward_backward_accumulate(&x, &labels).unwrap();
    fresh.forward_backward(&x, &labels).unwrap();
    assert_eq!(layer.pending_passes(), 1);
    assert_eq!(
        layer.weight_grad_dense().unwrap(),
        fresh.weight_grad_dense().unwrap()
    );
    layer.step(0.1).unwrap();
    assert_eq!(layer.pending_passes(), 0);
    // New weights drop a sum too.
    layer.forward_backward_accumulate(&x, &labels).unwrap();
    let w = layer.weight().unwrap();
    layer.set_weight(&w).unwrap();
    assert_eq!(layer.pending_passes(), 0);
    assert!(matches!(layer.step(0.1), Err(PfcError::Order(_))));
}

/// The mean's update (PyTorch's `loss / K`) from K accumulated passes, two ways: with
/// `set_grad_scale(1 / K)` and the hyperparameters as they are; or from the plain sum, with SGD
/// built with weight decay K·λ and stepped with lr / K (the momentum then holds K times the
/// mean's, and lr / K scales it back), AdamW with ε·K (m and v hold K and K² times theirs).
/// docs/design.md states both; two windows, so the momentum carried between them counts.
#[test]
fn sum_with_scaled_hyperparameters_is_the_mean_update() {
    use partial_fc::AdamW;
    const K: u64 = 3;
    let k = K as f32;
    // (AdamW?, with set_grad_scale(1 / K) instead of the scaled hyperparameters?)
    for (adam, scaled) in [(false, false), (true, false), (false, true), (true, true)] {
        let (lr, wd, mu, (b1, b2, eps)) = (0.3f32, 5e-3f32, 0.9f32, (0.9f32, 0.999f32, 1e-3f32));
        // Without the gradient scale, the hyperparameters absorb K.
        let h = if scaled { 1.0 } else { k };
        let mut cfg = config(UpdateMode::Dense);
        cfg.optimizer = Some(if adam {
            AdamW {
                beta1: b1,
                beta2: b2,
                eps: eps * h,
                weight_decay: wd,
                ..AdamW::default()
            }
            .into()
        } else {
            Sgd {
                momentum: mu,
                weight_decay: wd * h,
                ..Sgd::default()
            }
            .into()
        });
        let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
        if scaled {
            layer.set_grad_scale(1.0 / k).unwrap();
        }
        // The mean's update, from the definitions, in f64.
        let mut w: Vec<f64> = layer.weight().unwrap().iter().map(|&v| v as f64).collect();
        let (mut m, mut v) = (vec![0f64; w.len()], vec![0f64; w.len()]);
        for window in 0..2u64 {
            for pass in 0..K {
                let (x, labels) = batch(10 * window + pass, 0);
                layer.forward_backward_accumulate(&x, &labels).unwrap();
            }
            let mean: Vec<f64> = layer
                .weight_grad_dense()
                .unwrap()
                .iter()
                .map(|&g| g as f64 / h as f64)
                .collect();
            let t = (window + 1) as i32;
            for i in 0..w.len() {
                if adam {
                    m[i] = b1 as f64 * m[i] + (1.0 - b1 as f64) * mean[i];
                    v[i] = b2 as f64 * v[i] + (1.0 - b2 as f64) * mean[i] * mean[i];
                    let m_hat = m[i] / (1.0 - (b1 as f64).powi(t));
                    let v_hat = v[i] / (1.0 - (b2 as f64).powi(t));
                    w[i] = w[i] * (1.0 - (lr * wd) as f64)
                        - lr as f64 * m_hat / (v_hat.sqrt() + eps as f64);
                } else {
                    m[i] = mu as f64 * m[i] + mean[i] + wd as f64 * w[i];
                    w[i] -= lr as f64 * m[i];
                }
            }
            let step_lr = if adam { lr } else { lr / h };
            layer.step(step_lr).unwrap();
            let got = layer.weight().unwrap();
            let worst = got
                .iter()
                .zip(&w)
                .map(|(g, r)| (*g as f64 - r).abs())
                .fold(0.0, f64::max);
            // f32 arithmetic against f64 over two updates of size ~lr: 1e-5 of lr is far
            // above its rounding and far below a wrong scaling (which moves weights by ~lr).
            assert!(
                worst <= 1e-5 * lr as f64,
                "{}{} window {window}: weights off the mean's update by {worst:e}",
                if adam { "AdamW" } else { "SGD" },
                if scaled { " with set_grad_scale" } else { "" }
            );
        }
    }
}

#[test]
fn the_gradient_scale_scales_both_gradients_and_must_agree() {
    let mut layer = PartialFc::new(config(UpdateMode::Dense), CpuBackend, SingleRank).unwrap();
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            layer.set_grad_scale(bad),
            Err(PfcError::Param {
                name: "grad_scale",
                ..
            })
        ));
    }
    assert_eq!(layer.grad_scale(), 1.0);
    let (x, labels) = batch(0, 0);
    let mut twin = PartialFc::new(config(UpdateMode::Dense), CpuBackend, SingleRank).unwrap();
    let full = twin.forward_backward(&x, &labels).unwrap();
    layer.set_grad_scale(0.125).unwrap();
    let scaled = layer.forward_backward(&x, &labels).unwrap();
    assert_eq!(scaled.loss, full.loss, "the reported loss is not scaled");
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .all(|(s, f)| (s - f / 8.0).abs() <= 1e-6 * (f.abs() + 1e-6))
    };
    assert!(close(&scaled.grad_embeddings, &full.grad_embeddings));
    assert!(close(
        &layer.weight_grad_dense().unwrap(),
        &twin.weight_grad_dense().unwrap()
    ));
    // Ranks with different scales are refused together, naming it.
    let errors = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(UpdateMode::Dense), CpuBackend, comm).unwrap();
        layer
            .set_grad_scale(if rank == 0 { 0.5 } else { 1.0 })
            .unwrap();
        let (x, labels) = batch(0, rank);
        layer.forward_backward_accumulate(&x, &labels).unwrap_err()
    });
    for e in errors {
        assert!(
            e.to_string().contains("gradient scale of set_grad_scale"),
            "{e}"
        );
    }
}

/// A rank that discarded its sum while the others stepped leaves shards of different update
/// counts: the run's checkpoint files say so (one run whose ranks did not update together),
/// not that they are of two runs (a user trial found the misleading message).
#[test]
fn ranks_that_did_not_all_update_are_named_at_checkpoint_time() {
    use partial_fc::checkpoint::CheckpointSet;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(UpdateMode::Dense), CpuBackend, comm).unwrap();
        let (x, labels) = batch(0, rank);
        layer.forward_backward_accumulate(&x, &labels).unwrap();
        if rank == 1 {
            layer.discard_grad();
        } else {
            layer.step(0.1).unwrap();
        }
        layer
            .save(&root.join(format!("rank{rank}.safetensors")))
            .unwrap();
    });
    let files = [
        root.join("rank0.safetensors"),
        root.join("rank1.safetensors"),
    ];
    let e = CheckpointSet::open(&files).err().unwrap().to_string();
    assert!(
        e.contains("applied 0 optimizer updates") && e.contains("did not all update together"),
        "{e}"
    );
}

/// The same at the next pass: a rank that stepped (or discarded its sum) alone is refused on
/// every rank with the group kept, before anyone trains on from states that no longer match;
/// after the ranks line up again (`set_optimizer_steps`, `discard_grad` on all), they go on.
#[test]
fn a_rank_that_stepped_alone_is_refused_at_the_next_pass() {
    let results = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(UpdateMode::Dense), CpuBackend, comm).unwrap();
        let (x, labels) = batch(0, rank);
        layer.forward_backward_accumulate(&x, &labels).unwrap();
        if rank == 0 {
            layer.step(0.1).unwrap();
        } else {
            layer.discard_grad();
        }
        let refused = layer.forward_backward(&x, &labels).map(|_| ());
        // Line up: same update count, nothing pending.
        layer.set_optimizer_steps(1);
        layer.discard_grad();
        let after = layer.forward_backward(&x, &labels).map(|_| ());
        (refused, after)
    });
    for (rank, (refused, after)) in results.into_iter().enumerate() {
        let e = refused.unwrap_err().to_string();
        assert!(
            e.contains("did a rank step, discard_grad"),
            "rank {rank}: {e}"
        );
        after.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
}
