//! `PartialFc::save_set`: every rank's checkpoint written as a set, all or none. A complete set
//! opens and loads on another world size; a rank that cannot write its file stops every rank,
//! and the folder keeps the set it held, with no temporary file left.

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

/// One training step on each of 3 ranks, then `save_set` into `dir`; rank `failing` (if any)
/// first sets its step counter to u64::MAX, which a save refuses.
fn train_and_save(dir: &Path, failing: Option<usize>) -> Vec<Result<PathBuf, PfcError>> {
    ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
        let x = partial_fc::init::normal_rows(5, rank as u64 * 4, 4, 8, 1.0);
        let labels: Vec<i64> = (0..4).map(|i| (rank as i64 * 29 + i * 7) % 90).collect();
        layer.forward_backward(&x, &labels).unwrap();
        layer.step(0.1).unwrap();
        if failing == Some(rank) {
            layer.set_steps(u64::MAX);
        }
        layer.save_set(dir, &[("epoch", "3")])
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
    let files: Vec<PathBuf> = train_and_save(&out, None)
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
}

#[test]
fn one_rank_that_cannot_write_stops_every_rank_and_the_old_set_stays() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latest");
    train_and_save(&out, None)
        .into_iter()
        .for_each(|r| drop(r.unwrap()));
    let before = listing(&out);
    let results = train_and_save(&out, Some(1));
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
