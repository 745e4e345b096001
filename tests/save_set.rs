//! `PartialFc::save_set`: every rank's checkpoint written as a set, all or none. A complete set
//! opens and loads on another world size; a rank that cannot write its file, ranks at different
//! steps, or a rank whose rename fails after the others renamed theirs stop every rank, and the
//! folder keeps the set it held, with no temporary or backup file left.

use partial_fc::checkpoint::CheckpointSet;
use partial_fc::collective::ThreadGroup;
use partial_fc::{Collective, CpuBackend, LayerConfig, PartialFc, PfcError};
use std::path::{Path, PathBuf};

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

/// One training step on each of 3 ranks, then `save_set` into `dir` with `epoch` in the
/// metadata (so that two saves' files differ).
fn train_and_save(dir: &Path, rank1: Rank1, epoch: &str) -> Vec<Result<PathBuf, PfcError>> {
    ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
        let x = partial_fc::init::normal_rows(5, rank as u64 * 4, 4, 8, 1.0);
        let labels: Vec<i64> = (0..4).map(|i| (rank as i64 * 29 + i * 7) % 90).collect();
        layer.forward_backward(&x, &labels).unwrap();
        layer.step(0.1).unwrap();
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
    train_and_save(&out, Rank1::Same, "3")
        .into_iter()
        .for_each(|r| drop(r.unwrap()));
    let before = listing(&out);
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
    train_and_save(&out, Rank1::Same, "3")
        .into_iter()
        .for_each(|r| drop(r.unwrap()));
    let before = listing(&out);
    let results = train_and_save(&out, Rank1::AtAnotherStep, "4");
    for r in &results {
        let err = r.as_ref().unwrap_err().to_string();
        assert!(err.contains("would save another set"), "{err}");
    }
    assert_eq!(listing(&out), before);
}

/// The same review: a rename failing on one rank after the others had renamed theirs left a
/// mixed set while they returned Ok. Every rank now puts back the file it replaced.
#[test]
fn a_rename_that_fails_on_one_rank_is_undone_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latest");
    train_and_save(&out, Rank1::Same, "3")
        .into_iter()
        .for_each(|r| drop(r.unwrap()));
    // A folder (not empty) where rank 1 would keep its old file's backup: its file is written,
    // the first agreement passes, and its step before the rename fails, after the other ranks
    // renamed theirs.
    let blocker = out.join(format!(
        ".rank1-of-3.safetensors.prev{}",
        std::process::id()
    ));
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("x"), b"x").unwrap();
    let before = listing_files(&out);
    let results = train_and_save(&out, Rank1::Same, "4");
    assert!(results[1].is_err(), "{results:?}");
    for r in [0, 2] {
        let err = results[r].as_ref().unwrap_err().to_string();
        assert!(err.contains("rank 1 could not rename"), "{err}");
    }
    assert_eq!(
        listing_files(&out),
        before,
        "ranks 0 and 2 kept the new files"
    );
}

/// The regular files of `dir` and their bytes (a folder in it is left out).
fn listing_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}
