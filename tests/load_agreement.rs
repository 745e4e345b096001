//! `load_resharded` is a collective call: the ranks agree after their checks, as a pass does.
//! These cases came from a review of its first version (a bare all-reduce of failure flags).

use partial_fc::collective::{ThreadCollective, ThreadGroup};
use partial_fc::{Collective, CpuBackend, PartialFc, PfcError, Result, Shard};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod common;

use common::full_softmax::{config, BATCH, DIM};
use common::hooked::{Hook, Hooked, Op};

fn batch(step: u64) -> (Vec<f32>, Vec<i64>) {
    common::full_softmax::batch(100 + step, step)
}

/// One step on 3 ranks, saved into `dir` as rank{r}.safetensors.
fn save3(dir: &Path) -> Vec<PathBuf> {
    save3_after(dir, 1)
}

/// `steps` steps on 3 ranks, saved into `dir` as rank{r}.safetensors.
fn save3_after(dir: &Path, steps: u64) -> Vec<PathBuf> {
    ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(3), CpuBackend, comm).unwrap();
        let rows = Shard::of(BATCH as u64, 3, rank);
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        for step in 0..steps {
            let (x, l) = batch(step);
            layer
                .forward_backward(&x[r0 * DIM..r1 * DIM], &l[r0..r1])
                .unwrap();
            layer.step(0.5).unwrap();
        }
        let p = dir.join(format!("rank{rank}.safetensors"));
        layer.save(&p).unwrap();
        p
    })
}

fn rows_of(world: usize, rank: usize, step: u64) -> (Vec<f32>, Vec<i64>) {
    let rows = Shard::of(BATCH as u64, world, rank);
    let (r0, r1) = (rows.start as usize, rows.end() as usize);
    let (x, l) = batch(step);
    (x[r0 * DIM..r1 * DIM].to_vec(), l[r0..r1].to_vec())
}

/// A damaged value that only new rank 1 reads (old rank 2's file, class 671) stops
/// both ranks; weights, momentum, both counters and a pending gradient are untouched.
#[test]
fn a_value_damaged_for_one_rank_only_stops_both_and_keeps_a_pending_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let paths = save3(dir.path());
    let bytes = std::fs::read(&paths[2]).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let head: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
    let start = head["weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + header + start + 4 * (2 * DIM + 5);
    let mut poisoned = bytes.clone();
    poisoned[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&paths[2], poisoned).unwrap();
    let run = |try_load: bool| {
        ThreadGroup::run(2, |comm| {
            let rank = comm.rank();
            let mut layer = PartialFc::new(config(2), CpuBackend, comm).unwrap();
            let (x, l) = rows_of(2, rank, 7);
            layer.forward_backward(&x, &l).unwrap();
            let before = (
                layer.weight().unwrap(),
                layer.momentum().unwrap(),
                layer.steps(),
                layer.optimizer_steps(),
            );
            let err = try_load.then(|| layer.load_resharded(&paths).unwrap_err().to_string());
            let after = (
                layer.weight().unwrap(),
                layer.momentum().unwrap(),
                layer.steps(),
                layer.optimizer_steps(),
            );
            assert_eq!(before, after, "rank {rank} unchanged");
            layer.step(0.5).unwrap(); // the pending gradient is still there
            (err, layer.weight().unwrap())
        })
    };
    let with = run(true);
    let without = run(false);
    assert!(
        with[0]
            .0
            .as_deref()
            .unwrap()
            .contains("rank 1 could not load"),
        "{:?}",
        with[0].0
    );
    assert!(
        with[1].0.as_deref().unwrap().contains("NaN at class 671"),
        "{:?}",
        with[1].0
    );
    assert_eq!(with[0].1, without[0].1);
    assert_eq!(with[1].1, without[1].1);
}

/// A rank in `load_resharded` and a peer in `forward_backward` (only the ranks that found a
/// checkpoint resume) are refused as a mix of calls on both ranks. A bare all-reduce of flags
/// used to pair with the pass's first one: rank 0 was told that rank 1 "could not load the
/// checkpoint files" (it never tried), and the calls stayed paired off by one.
#[test]
fn a_peer_in_another_call_is_refused_as_such_not_reported_as_a_failed_load() {
    let dir = tempfile::tempdir().unwrap();
    let paths = save3(dir.path());
    let handles = ThreadGroup::with_timeout(2, Duration::from_secs(5));
    let errors: Vec<Vec<String>> = std::thread::scope(|s| {
        let joins: Vec<_> = handles
            .into_iter()
            .map(|comm| {
                let paths = &paths;
                s.spawn(move || {
                    let rank = comm.rank();
                    let mut layer = PartialFc::new(config(2), CpuBackend, comm).unwrap();
                    let mut errs = Vec::new();
                    if rank == 0 {
                        if let Err(e) = layer.load_resharded(paths) {
                            errs.push(format!("load: {e}"));
                        }
                    }
                    for step in 0..2 {
                        let (x, l) = rows_of(2, rank, step);
                        if let Err(e) = layer.forward_backward(&x, &l) {
                            errs.push(format!("pass {step}: {e}"));
                        }
                    }
                    errs
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    eprintln!("{errors:#?}");
    let load = &errors[0][0];
    assert!(
        load.contains("called forward_backward while rank 0 called load_resharded"),
        "rank 0: {load}"
    );
    assert!(
        errors[1][0].contains("called load_resharded while rank 1 called forward_backward"),
        "rank 1: {:?}",
        errors[1]
    );
    assert!(
        errors[1]
            .iter()
            .all(|e| !e.contains("configuration differs")),
        "rank 1 is told the (identical) configurations differ: {:?}",
        errors[1]
    );
}

/// A collective whose rank `fail_rank` reports an error after the inner all-reduce completed
/// (as HostStaged does when its upload after the host all-reduce fails, or as a failed download
/// of the flags would): the peers got the result.
struct FailsAfter {
    fail: AtomicBool,
}

impl Hook<ThreadCollective> for FailsAfter {
    fn after(&self, op: &Op<'_>, _: &ThreadCollective) -> Result<()> {
        if matches!(op, Op::AllReduce) && self.fail.swap(false, Ordering::SeqCst) {
            return Err(PfcError::Collective(
                "injected: upload after the all-reduce failed".into(),
            ));
        }
        Ok(())
    }
}

/// A failure of the agreement on one rank after its peers got the result (the all-reduce's
/// last upload, the flags' download) breaks the group: the ranks do not train on together on a
/// classifier half resumed (rank 0) and half fresh (rank 1), as they did before.
#[test]
fn a_rank_whose_agreement_fails_after_its_peers_does_not_train_on_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let paths = save3(dir.path());
    let results = std::thread::scope(|s| {
        let joins: Vec<_> = ThreadGroup::with_timeout(2, Duration::from_secs(5))
            .into_iter()
            .map(|inner| {
                let paths = &paths;
                s.spawn(move || {
                    let rank = inner.rank();
                    let fail = AtomicBool::new(rank == 1);
                    let comm = Hooked::new(inner, FailsAfter { fail });
                    let mut layer = PartialFc::new(config(2), CpuBackend, comm).unwrap();
                    let load = layer.load_resharded(paths).map_err(|e| e.to_string());
                    let steps = layer.steps();
                    let (x, l) = rows_of(2, rank, 3);
                    let pass = layer
                        .forward_backward(&x, &l)
                        .map(|o| o.loss)
                        .map_err(|e| e.to_string());
                    (load, steps, pass)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap())
            .collect::<Vec<_>>()
    });
    eprintln!("{results:#?}");
    assert!(results[1].0.is_err(), "rank 1's agreement failed");
    assert!(
        results.iter().all(|r| r.2.is_err()) || results.iter().all(|r| r.0.is_err()),
        "rank 1 failed its load but the ranks train on together: {results:?}"
    );
}

/// Ranks given checkpoints of different steps (each set whole and sound by itself) are refused
/// together, naming the other rank, and no layer changes: before, each resumed from its own
/// files and the job trained on with a classifier from two steps.
#[test]
fn ranks_given_checkpoints_of_different_steps_are_refused_together() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sets = [save3_after(one.path(), 1), save3_after(two.path(), 2)];
    let results = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(2), CpuBackend, comm).unwrap();
        let before = (layer.weight().unwrap(), layer.steps());
        let err = layer.load_resharded(&sets[rank]).unwrap_err().to_string();
        assert_eq!(
            before,
            (layer.weight().unwrap(), layer.steps()),
            "rank {rank} unchanged"
        );
        // The same files on both ranks still load.
        layer.load_resharded(&sets[1]).unwrap();
        (err, layer.steps())
    });
    assert!(
        results[0]
            .0
            .contains("rank 1 loaded another checkpoint than rank 0 (step 1,"),
        "{}",
        results[0].0
    );
    assert!(
        results[1]
            .0
            .contains("rank 0 loaded another checkpoint than rank 1 (step 2,"),
        "{}",
        results[1].0
    );
    assert_eq!((results[0].1, results[1].1), (2, 2));
}
