//! `PartialFc::save_set`: every rank's checkpoint written as a set, all or none. A complete set
//! opens and loads on another world size; a rank that cannot write its file, ranks at different
//! steps, or a rank whose rename fails after the others renamed theirs stop every rank, and the
//! folder keeps the set it held, with no temporary or backup file left.

use partial_fc::checkpoint::CheckpointSet;
use partial_fc::collective::{ThreadCollective, ThreadGroup};
use partial_fc::{Backend, Collective, CpuBackend, LayerConfig, PartialFc, PfcError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

mod common;

use common::hooked::{Hook, Hooked, Op};

const CLASSES: u64 = 90;

fn config() -> LayerConfig {
    let mut c = LayerConfig::new(CLASSES, 8, 4);
    c.sample_rate = 0.5;
    c
}

/// How rank 1 differs from the others before the save.
#[derive(Clone, Copy, PartialEq)]
enum Rank1 {
    Same,
    /// Its step counter at u64::MAX, which a save refuses.
    CannotWrite,
    /// Its step counter elsewhere: a set of two steps.
    AtAnotherStep,
}

fn train_one_step<B: Backend, C: Collective<B>>(layer: &mut PartialFc<B, C>, rank: usize) {
    let x = partial_fc::init::normal_rows(5, rank as u64 * 4, 4, 8, 1.0);
    let labels: Vec<i64> = (0..4).map(|i| (rank as i64 * 29 + i * 7) % 90).collect();
    layer.forward_backward(&x, &labels).unwrap();
    layer.step(0.1).unwrap();
}

/// One training step on each of 3 ranks, then `save_set` into `dir` with `epoch` in the
/// metadata (so that two saves' files differ).
fn train_and_save(dir: &Path, rank1: Rank1, epoch: &str) -> Vec<Result<PathBuf, PfcError>> {
    ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
        train_one_step(&mut layer, rank);
        match (rank, rank1) {
            (1, Rank1::CannotWrite) => layer.set_steps(u64::MAX),
            (1, Rank1::AtAnotherStep) => layer.set_steps(7),
            _ => {}
        }
        layer.save_set(dir, &[("epoch", epoch)])
    })
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_saved_set_is_complete_and_loads_on_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("step1");
    let files: Vec<PathBuf> = train_and_save(&out, Rank1::Same, "3")
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        files,
        (0..3)
            .map(|r| out.join(format!("rank{r}-of-3.safetensors")))
            .collect::<Vec<_>>()
    );
    let set = CheckpointSet::open(&files).unwrap();
    assert!(set.is_complete());
    assert_eq!(
        (set.world_size(), set.step(), set.optimizer_steps()),
        (3, 1, 1)
    );
    assert_eq!(
        partial_fc::checkpoint::user_metadata(&files[2]).unwrap()["epoch"],
        "3"
    );
    let loaded = ThreadGroup::run(2, |comm| {
        let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
        layer.load_resharded(&files).map(|()| layer.steps())
    });
    assert!(loaded.iter().all(|r| matches!(r, Ok(1))), "{loaded:?}");
    // A second save over the first replaces the three files and leaves no backup behind.
    train_and_save(&out, Rank1::Same, "4")
        .into_iter()
        .for_each(|r| drop(r.unwrap()));
    let names: Vec<String> = listing(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(
        partial_fc::checkpoint::user_metadata(&files[0]).unwrap()["epoch"],
        "4"
    );
}

#[test]
fn one_rank_that_cannot_write_stops_every_rank_and_the_old_set_stays() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latest");
    let before = saved_once(&out);
    let results = train_and_save(&out, Rank1::CannotWrite, "4");
    assert!(
        matches!(&results[1], Err(PfcError::Checkpoint { .. })),
        "{results:?}"
    );
    for r in [0, 2] {
        let err = results[r].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("rank 1 could not write its checkpoint file"),
            "{err}"
        );
    }
    assert_eq!(listing(&out), before, "a refused set changed the folder");
}

/// A review: the ranks agreed only that each wrote its file, so ranks at different steps (one
/// that skipped a step after a loss-scale overflow, a counter set apart) all saved, over the
/// good set, files that `CheckpointSet::open` refuses.
#[test]
fn ranks_at_different_steps_save_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latest");
    let before = saved_once(&out);
    let results = train_and_save(&out, Rank1::AtAnotherStep, "4");
    for r in &results {
        let err = r.as_ref().unwrap_err().to_string();
        assert!(err.contains("would save another set"), "{err}");
    }
    assert_eq!(listing(&out), before);
}

/// The same review: a rank failing after the others renamed their files left a mixed set while
/// they returned Ok. Here rank 1's part of the second agreement (the renames' check) fails
/// before it sends, after every rank renamed: every rank puts back the file it replaced.
#[test]
fn a_failure_after_the_renames_is_undone_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latest");
    let before = saved_once(&out);
    let results = std::thread::scope(|s| {
        let joins: Vec<_> = ThreadGroup::with_timeout(3, Duration::from_secs(5))
            .into_iter()
            .map(|inner| {
                let out = &out;
                s.spawn(move || {
                    let rank = inner.rank();
                    let hook = FailsBefore {
                        rank1: rank == 1,
                        armed: AtomicBool::new(false),
                        calls: AtomicUsize::new(0),
                    };
                    let mut layer =
                        PartialFc::new(config(), CpuBackend, Hooked::new(inner, hook)).unwrap();
                    train_one_step(&mut layer, rank);
                    layer.collective().hook.armed.store(true, Ordering::SeqCst);
                    layer.save_set(out, &[("epoch", "4")])
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert_eq!(
        listing(&out),
        before,
        "a rank kept its new file or a backup"
    );
}

/// Rank 1's third all-reduce once armed (a save's first agreement makes two), failed before it
/// is made.
struct FailsBefore {
    rank1: bool,
    armed: AtomicBool,
    calls: AtomicUsize,
}

impl Hook<ThreadCollective> for FailsBefore {
    fn before(&self, op: &Op<'_>, _: &ThreadCollective) -> partial_fc::Result<()> {
        if self.rank1
            && self.armed.load(Ordering::SeqCst)
            && matches!(op, Op::AllReduce)
            && self.calls.fetch_add(1, Ordering::SeqCst) == 2
        {
            return Err(PfcError::Collective("injected: rank 1 fails".into()));
        }
        Ok(())
    }
}

/// A first, good save of the 3 ranks into `out` (epoch 3); the folder's files after it.
fn saved_once(out: &Path) -> Vec<(String, Vec<u8>)> {
    train_and_save(out, Rank1::Same, "3")
        .into_iter()
        .for_each(|r| drop(r.unwrap()));
    listing(out)
}
