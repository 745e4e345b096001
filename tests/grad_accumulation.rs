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
    // The samples differed between passes (else the test would not tell a sum from a copy).
    assert!(sum.iter().filter(|g| **g != 0.0).count() > 2 * BATCH * DIM);

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
