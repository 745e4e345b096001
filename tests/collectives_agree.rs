//! The generic step with k ranks gives the same result whichever collective runs it: the thread
//! group directly, or the thread group staged through host copies (the adapter the "virtual
//! ranks" GPU mode uses), and both equal one rank.

use partial_fc::collective::{HostStaged, SingleRank, ThreadGroup};
use partial_fc::{Collective, CpuBackend, PartialFc};

mod common;

use common::full_softmax::{batch, config, BATCH, DIM};

fn data() -> (Vec<f32>, Vec<i64>) {
    batch(11, 0)
}

/// Loss, concatenated embedding gradient and concatenated weights after one SGD step.
fn run<C: partial_fc::Collective<CpuBackend>>(
    world: usize,
    make: impl Fn(partial_fc::collective::ThreadCollective) -> C + Sync,
) -> (f32, Vec<f32>, Vec<f32>) {
    let (x, labels) = data();
    let parts = ThreadGroup::run(world, |comm| {
        let rows = partial_fc::Shard::of(BATCH as u64, world, comm.rank());
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let mut layer = PartialFc::new(config(world), CpuBackend, make(comm)).unwrap();
        let out = layer
            .forward_backward(&x[r0 * DIM..r1 * DIM], &labels[r0..r1])
            .unwrap();
        layer.step(0.5).unwrap();
        (out.loss, out.grad_embeddings, layer.weight().unwrap())
    });
    let loss = parts[0].0;
    let gx = parts.iter().flat_map(|p| p.1.clone()).collect();
    let w = parts.iter().flat_map(|p| p.2.clone()).collect();
    (loss, gx, w)
}

fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 + 1e-5 * y.abs(),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn thread_group_and_host_staged_agree_with_one_rank() {
    let (x, labels) = data();
    let mut single = PartialFc::new(config(1), CpuBackend, SingleRank).unwrap();
    let out = single.forward_backward(&x, &labels).unwrap();
    single.step(0.5).unwrap();
    let w1 = single.weight().unwrap();
    for world in [2, 3, 4] {
        let direct = run(world, |c| c);
        let staged = run(world, HostStaged::new);
        // Same reductions in the same order: the two collectives agree bit for bit.
        assert_eq!(direct, staged, "world {world}");
        assert!(
            (direct.0 - out.loss).abs() <= 1e-5 * out.loss.abs(),
            "loss, world {world}"
        );
        assert_close("grad_embeddings", &direct.1, &out.grad_embeddings);
        assert_close("weights after step", &direct.2, &w1);
    }
}

/// A rank whose own arguments are refused breaks the group: its peer, already waiting in that
/// collective, fails instead of waiting out the timeout, and the refused rank's next call cannot
/// pair with the peer's pending one (before, both then returned Ok with rank 0's second call
/// reduced against rank 1's first).
/// Rank 0 makes a call its own buffer cannot serve, then a valid one; rank 1 one valid call.
fn refused_then_valid<C: Collective<CpuBackend>>(comm: C) -> (bool, bool) {
    use partial_fc::ReduceOp;
    let mut v = vec![1.0f32, 100.0];
    if comm.rank() == 0 {
        // count 3 on a buffer of 2: refused on this rank
        let first = comm.all_reduce_f32(&CpuBackend, &mut v, 3, ReduceOp::Sum);
        let second = comm.all_reduce_f32(&CpuBackend, &mut v, 2, ReduceOp::Sum);
        (first.is_ok(), second.is_ok())
    } else {
        let only = comm.all_reduce_f32(&CpuBackend, &mut v, 2, ReduceOp::Sum);
        (only.is_ok(), true)
    }
}

#[test]
fn a_rank_refused_before_a_collective_breaks_the_group_for_its_peers() {
    for staged in [false, true] {
        let results = ThreadGroup::run(2, |comm| {
            if staged {
                refused_then_valid(HostStaged::new(comm))
            } else {
                refused_then_valid(comm)
            }
        });
        assert_eq!(results[0], (false, false), "staged {staged}: rank 0");
        assert!(!results[1].0, "staged {staged}: rank 1's call must fail");
    }
}
