//! Checkpoints across world sizes: a run saved by k ranks resumes on k' ranks and trains on as
//! if nothing had changed; `reshard` rewrites the files for any world size; every mismatch is a
//! typed error that leaves the layer (or the output folder) untouched.

use partial_fc::checkpoint::{reshard, shard_file_name, CheckpointSet};
use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::{Collective, CpuBackend, LayerConfig, PartialFc, PfcError, Shard};
use std::path::{Path, PathBuf};

mod common;

use common::full_softmax::{config, BATCH, CLASSES, DIM};

fn batch(step: u64) -> (Vec<f32>, Vec<i64>) {
    common::full_softmax::batch(100 + step, step)
}

/// Trains `steps` steps from `from` (checkpoint files of any world size; none: a fresh layer),
/// saves every rank into `save_to` (if given), and returns the losses and the whole classifier.
fn train(
    world: usize,
    from: &[PathBuf],
    steps: u64,
    save_to: Option<&Path>,
) -> (Vec<f32>, Vec<f32>) {
    let parts = ThreadGroup::run(world, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(world), CpuBackend, comm).unwrap();
        if !from.is_empty() {
            layer.load_resharded(from).unwrap();
        }
        let rows = Shard::of(BATCH as u64, world, rank);
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let mut losses = Vec::new();
        for _ in 0..steps {
            let (x, labels) = batch(layer.steps());
            let out = layer
                .forward_backward(&x[r0 * DIM..r1 * DIM], &labels[r0..r1])
                .unwrap();
            layer.step(0.5).unwrap();
            losses.push(out.loss);
        }
        if let Some(dir) = save_to {
            layer
                .save(&dir.join(format!("rank{rank}.safetensors")))
                .unwrap();
        }
        (losses, layer.weight().unwrap())
    });
    let losses = parts[0].0.clone();
    (losses, parts.into_iter().flat_map(|p| p.1).collect())
}

fn files(dir: &Path, world: usize) -> Vec<PathBuf> {
    (0..world)
        .map(|r| dir.join(format!("rank{r}.safetensors")))
        .collect()
}

/// Within the rounding of a different reduction order (world size 1 runs the one-kernel online
/// softmax, others the three passes): 1e-5 of the values' scale (weights are ~0.01 to 0.1 here).
fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * scale, "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn a_run_saved_by_three_ranks_resumes_on_two_four_and_one_as_if_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("k3");
    std::fs::create_dir(&saved).unwrap();
    // Three steps on 3 ranks, saved; then two more on 3 ranks: the reference.
    train(3, &[], 3, Some(&saved));
    let (want_losses, want_w) = train(3, &files(&saved, 3), 2, None);
    for world in [2, 4, 1] {
        let (losses, w) = train(world, &files(&saved, 3), 2, None);
        assert_close(&format!("losses on {world} ranks"), &losses, &want_losses);
        assert_close(&format!("weights on {world} ranks"), &w, &want_w);
    }
    // The files rewritten for 2 ranks are what 2 ranks would load: same trajectory again, and
    // `load` (same world size) takes them.
    let two = reshard(&files(&saved, 3), 2, &dir.path().join("k2"), &|_| {}).unwrap();
    assert_eq!(
        two,
        vec![
            dir.path().join("k2").join(shard_file_name(2, 0)),
            dir.path().join("k2").join(shard_file_name(2, 1))
        ]
    );
    let (losses, w) = train(2, &two, 2, None);
    assert_close("losses from resharded files", &losses, &want_losses);
    assert_close("weights from resharded files", &w, &want_w);
    let loaded = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::zeroed(config(2), CpuBackend, comm).unwrap();
        layer.load(&two[rank]).unwrap();
        (
            layer.steps(),
            layer.weight().unwrap(),
            layer.momentum().unwrap(),
        )
    });
    assert!(loaded.iter().all(|l| l.0 == 3), "the step counter moves");
    assert!(loaded.iter().all(|l| l.2.is_some()), "the momentum moves");
}

#[test]
fn merging_and_splitting_again_gives_back_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("k3");
    std::fs::create_dir(&saved).unwrap();
    train(3, &[], 1, Some(&saved));
    let merged = reshard(&files(&saved, 3), 1, &dir.path().join("one"), &|_| {}).unwrap();
    let set = CheckpointSet::open(&merged).unwrap();
    assert_eq!(
        (set.world_size(), set.num_classes(), set.dim(), set.step()),
        (1, CLASSES, DIM, 1)
    );
    // The merged file is one layer's shard: the whole classifier, in class order.
    let mut single = PartialFc::zeroed(config(1), CpuBackend, SingleRank).unwrap();
    single.load(&merged[0]).unwrap();
    let whole = single.weight().unwrap();
    let ranks = ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::zeroed(config(3), CpuBackend, comm).unwrap();
        layer.load(&files(&saved, 3)[rank]).unwrap();
        layer.weight().unwrap()
    });
    assert_eq!(whole, ranks.concat());
    // Split back into 3 (the progress callback counts every value once): the same bytes as the
    // files the run saved.
    let counted = std::sync::atomic::AtomicU64::new(0);
    let again = reshard(&merged, 3, &dir.path().join("k3again"), &|n| {
        counted.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(counted.into_inner(), set.total_values());
    for (a, b) in again.iter().zip(files(&saved, 3)) {
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{}",
            a.display()
        );
    }
}

fn refusal(e: PfcError) -> String {
    match e {
        PfcError::Checkpoint { reason, .. } | PfcError::Param { reason, .. } => reason,
        other => panic!("not a checkpoint or parameter error: {other}"),
    }
}

#[test]
fn files_that_do_not_make_one_run_are_refused_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    train(3, &[], 1, Some(&a));
    train(3, &[], 2, Some(&b));
    let a3 = files(&a, 3);
    let b3 = files(&b, 3);
    let none: [PathBuf; 0] = [];
    let cases: Vec<(Vec<PathBuf>, &str)> = vec![
        (vec![a3[0].clone(), b3[1].clone()], "not of the same run"),
        (vec![a3[0].clone(), a3[0].clone()], "rank 0 is also given"),
        (none.to_vec(), "at least one checkpoint file"),
    ];
    for (paths, why) in cases {
        let e = refusal(CheckpointSet::open(&paths).err().unwrap());
        assert!(e.contains(why), "{e}");
    }
    // A missing rank: fine to open, refused where its classes are needed.
    let partial = vec![a3[0].clone(), a3[2].clone()];
    let set = CheckpointSet::open(&partial).unwrap();
    assert_eq!(set.missing_ranks().collect::<Vec<_>>(), vec![1]);
    assert!(!set.is_complete());
    let out = dir.path().join("out");
    let e = refusal(reshard(&partial, 2, &out, &|_| {}).unwrap_err());
    assert!(e.contains("no file is given for rank 1"), "{e}");
    assert!(!out.exists(), "nothing written");
    // The old ranks held 0..335, 335..669 and 669..1003; the new ones hold 0..502 and
    // 502..1003, each partly in the missing old rank 1: neither loads, both stay as they were.
    let results = ThreadGroup::run(2, |comm| {
        let mut layer = PartialFc::new(config(2), CpuBackend, comm).unwrap();
        let before = layer.weight().unwrap();
        let e = layer.load_resharded(&partial).unwrap_err();
        (refusal(e), before == layer.weight().unwrap())
    });
    assert!(
        results[0]
            .0
            .contains("rank 1's file of the run's 3 is not among the 2 given files")
            && results[0].0.contains("class 335"),
        "{}",
        results[0].0
    );
    assert!(results[1].0.contains("class 502"), "{}", results[1].0);
    assert!(results.iter().all(|r| r.1), "layers unchanged");
    // Old ranks 0 and 1 cover new rank 0's classes (0..502) but not new rank 1's: rank 1's
    // check fails, and the ranks agree, so rank 0 refuses too (it used to load and train on,
    // alone) and neither layer changes.
    let first_two = vec![a3[0].clone(), a3[1].clone()];
    let results = ThreadGroup::run(2, |comm| {
        let mut layer = PartialFc::new(config(2), CpuBackend, comm).unwrap();
        let before = layer.weight().unwrap();
        let e = layer.load_resharded(&first_two).unwrap_err();
        let text = e.to_string();
        (e, text, before == layer.weight().unwrap())
    });
    assert!(
        matches!(&results[0].0, PfcError::Collective(m) if m.contains("rank 1 could not load")),
        "{}",
        results[0].0
    );
    assert!(
        matches!(&results[1].0, PfcError::Checkpoint { .. })
            && results[1].1.contains("rank 2's file of the run's 3"),
        "{}",
        results[1].1
    );
    assert!(results.iter().all(|r| r.2), "layers unchanged");
    // A world size that cannot hold the classes, and an output onto an input.
    let e = refusal(reshard(&a3, 0, &out, &|_| {}).unwrap_err());
    assert!(e.contains("between 1 and the number of classes"), "{e}");
    let e = refusal(reshard(&a3, CLASSES as usize + 1, &out, &|_| {}).unwrap_err());
    assert!(e.contains("between 1 and the number of classes"), "{e}");
    let inputs: Vec<PathBuf> = (0..3)
        .map(|r| {
            let p = a.join(shard_file_name(3, r));
            std::fs::copy(&a3[r], &p).unwrap();
            p
        })
        .collect();
    let before = std::fs::read(&inputs[0]).unwrap();
    let e = refusal(reshard(&inputs, 3, &a, &|_| {}).unwrap_err());
    assert!(e.contains("is one of the input files"), "{e}");
    assert_eq!(
        std::fs::read(&inputs[0]).unwrap(),
        before,
        "input untouched"
    );
}

#[test]
fn a_layer_that_does_not_match_the_files_is_refused_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    train(3, &[], 1, Some(dir.path()));
    let paths = files(dir.path(), 3);
    let mut other_dim = LayerConfig::new(CLASSES, DIM + 1, 8);
    other_dim.sample_rate = 1.0;
    let mut other_classes = LayerConfig::new(CLASSES + 1, DIM, 8);
    other_classes.sample_rate = 1.0;
    for (cfg, why) in [
        (other_dim, "this layer 1003 of d = 25"),
        (other_classes, "this layer 1004 of d = 24"),
    ] {
        let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
        let before = layer.weight().unwrap();
        let e = refusal(layer.load_resharded(&paths).unwrap_err());
        assert!(e.contains(why), "{e}");
        // A layer with more classes is told how to grow the files; one of another d is not.
        assert_eq!(e.contains("reshard_grown"), why.contains("1004"), "{e}");
        assert_eq!(layer.weight().unwrap(), before);
    }
    // Files without momentum (saved by a layer with no optimizer) into a layer with one.
    let bare_dir = dir.path().join("bare");
    std::fs::create_dir(&bare_dir).unwrap();
    let mut cfg = config(1);
    cfg.optimizer = None;
    let bare = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let bare_path = bare_dir.join("rank0.safetensors");
    bare.save(&bare_path).unwrap();
    let mut layer = PartialFc::new(config(1), CpuBackend, SingleRank).unwrap();
    let e = refusal(layer.load_resharded(&[&bare_path]).unwrap_err());
    assert!(
        e.contains("no optimizer state") && e.contains("momentum"),
        "{e}"
    );
    // The other way round is fine: a layer without optimizer takes the weights only.
    let mut weights_only = PartialFc::zeroed(cfg, CpuBackend, SingleRank).unwrap();
    weights_only.load_resharded(&paths).unwrap();
    assert_eq!(weights_only.steps(), 1);
}

#[test]
fn a_non_finite_value_in_any_file_is_refused_before_the_layer_changes() {
    let dir = tempfile::tempdir().unwrap();
    train(3, &[], 1, Some(dir.path()));
    let paths = files(dir.path(), 3);
    // Poison one weight of rank 1's file (class 335 + 2, column 5).
    poison(&paths[1], 2, 5, f32::NAN);
    let mut layer = PartialFc::new(config(1), CpuBackend, SingleRank).unwrap();
    let before = layer.weight().unwrap();
    let e = refusal(layer.load_resharded(&paths).unwrap_err());
    assert!(e.contains("weight holds NaN at class 337, column 5"), "{e}");
    assert_eq!(layer.weight().unwrap(), before);
    let out = dir.path().join("out");
    let e = refusal(reshard(&paths, 2, &out, &|_| {}).unwrap_err());
    assert!(e.contains("NaN at class 337"), "{e}");
    assert!(
        !out.join(shard_file_name(2, 0)).exists(),
        "rank 0 of 2 holds class 337: its file is not written"
    );
    assert!(!out.exists(), "the folder made for the files is removed");
}

/// Puts `value`'s bytes at row `row`, column `column` of the `weight` of the checkpoint file at
/// `path` (rewritten in place).
fn poison(path: &Path, row: usize, column: usize, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let head: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
    let start = head["weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + header + start + 4 * (row * DIM + column);
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Every entry of `dir` by name, with a file's bytes (a folder's: none), temporary files too.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Option<Vec<u8>>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = e
                .file_type()
                .unwrap()
                .is_file()
                .then(|| std::fs::read(e.path()).unwrap());
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

/// A run of 3 ranks, saved in `dir`, whose old rank 2 holds -inf at class 669 + 2 = 671,
/// column 5: rewritten for 2 ranks, rank 0 (classes 0..502) is written, rank 1 (502..1003)
/// fails.
fn run_failing_on_rank_1_of_2(dir: &Path) -> Vec<PathBuf> {
    train(3, &[], 1, Some(dir));
    let paths = files(dir, 3);
    poison(&paths[2], 2, 5, f32::NEG_INFINITY);
    paths
}

/// The output set is all or none: a reshard whose second rank fails leaves no new file and no
/// temporary file, removes the folder it made, and leaves an old complete set of the same names
/// (a --force over it) byte for byte as it was, not the new rank 0 beside the old rank 1.
#[test]
fn a_rank_that_fails_leaves_the_output_folder_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let paths = run_failing_on_rank_1_of_2(&inputs);
    let check = |e: PfcError, out: &Path| {
        match &e {
            PfcError::Checkpoint { path, .. } => {
                assert_eq!(path, &out.join(shard_file_name(2, 1)), "{e}")
            }
            other => panic!("not a checkpoint error: {other}"),
        }
        let e = e.to_string();
        assert!(
            e.contains("writing rank 1 of 2")
                && e.contains("weight holds -inf at class 671, column 5"),
            "{e}"
        );
    };
    // A folder this call makes: removed.
    let fresh = dir.path().join("fresh");
    check(reshard(&paths, 2, &fresh, &|_| {}).unwrap_err(), &fresh);
    assert!(
        !fresh.exists(),
        "{:?}",
        fresh.exists().then(|| snapshot(&fresh))
    );
    // A folder that was there, empty: kept, empty.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    check(reshard(&paths, 2, &empty, &|_| {}).unwrap_err(), &empty);
    assert!(snapshot(&empty).is_empty(), "{:?}", snapshot(&empty));
    // A folder holding another run's complete set for 2 ranks (other weights than the new
    // rank 0's), and another file.
    let old = dir.path().join("old");
    let other_run = dir.path().join("other");
    std::fs::create_dir(&other_run).unwrap();
    train(3, &[], 2, Some(&other_run));
    reshard(&files(&other_run, 3), 2, &old, &|_| {}).unwrap();
    std::fs::write(old.join("notes.txt"), "keep me").unwrap();
    let before = snapshot(&old);
    assert_eq!(before.len(), 3);
    check(reshard(&paths, 2, &old, &|_| {}).unwrap_err(), &old);
    assert!(snapshot(&old) == before, "{:?}", snapshot(&old).keys());
    CheckpointSet::open(&[
        old.join(shard_file_name(2, 0)),
        old.join(shard_file_name(2, 1)),
    ])
    .unwrap()
    .require_complete()
    .unwrap();
    // The same inputs without the -inf write the whole set over it.
    poison(&paths[2], 2, 5, 0.5);
    let written = reshard(&paths, 2, &old, &|_| {}).unwrap();
    let after = snapshot(&old);
    assert_eq!(after.len(), 3, "{:?}", after.keys());
    for path in &written {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(after[name] != before[name], "{name} replaced");
    }
}

/// An output name that is a folder (or a device, a pipe) is refused while its rank is written,
/// before any rank takes its name: nothing is replaced, no temporary file is left, the folder
/// is kept. (The renames themselves are one per file, not a transaction; with this refusal a
/// rename can fail only through what the file system does in between.)
#[test]
fn an_output_name_that_is_a_folder_is_refused_before_any_rename() {
    let dir = tempfile::tempdir().unwrap();
    train(3, &[], 1, Some(dir.path()));
    let out = dir.path().join("out");
    let blocked = out.join(shard_file_name(2, 1));
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("inside"), "x").unwrap();
    let e = reshard(&files(dir.path(), 3), 2, &out, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("writing rank 1 of 2") && e.contains("not a regular file"),
        "{e}"
    );
    let left = snapshot(&out);
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        [&shard_file_name(2, 1)],
        "no rank 0 and no temporary file"
    );
    assert!(left[&shard_file_name(2, 1)].is_none(), "the folder is kept");
}

/// `pfc reshard --force` over a complete set, with an input that fails rank 1 of 2: the old
/// set is left as it was, and the error names the rank.
#[test]
fn pfc_reshard_that_fails_on_a_rank_names_it_and_keeps_the_old_set() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    // Another run's set for 2 ranks (two steps: other bytes than the new files').
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    train(2, &[], 2, Some(&out));
    std::fs::rename(
        out.join("rank0.safetensors"),
        out.join(shard_file_name(2, 0)),
    )
    .unwrap();
    std::fs::rename(
        out.join("rank1.safetensors"),
        out.join(shard_file_name(2, 1)),
    )
    .unwrap();
    let before = snapshot(&out);
    let paths = run_failing_on_rank_1_of_2(&inputs);
    let run = |out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
            .args([
                "reshard",
                "--world-size",
                "2",
                "--quiet",
                "--force",
                "--out",
            ])
            .arg(out)
            .args(&paths)
            .output()
            .unwrap()
    };
    let done = run(&out);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("rank1-of-2.safetensors")
            && stderr.contains("writing rank 1 of 2")
            && stderr.contains("-inf at class 671"),
        "{stderr}"
    );
    assert!(snapshot(&out) == before, "{:?}", snapshot(&out).keys());
    let fresh = dir.path().join("fresh");
    let done = run(&fresh);
    assert_eq!(done.status.code(), Some(2));
    assert!(!fresh.exists(), "the folder made for the files is removed");
}

#[test]
fn pfc_reshard_merges_a_run_and_refuses_an_incomplete_one() {
    let dir = tempfile::tempdir().unwrap();
    train(3, &[], 1, Some(dir.path()));
    let paths = files(dir.path(), 3);
    let out = dir.path().join("merged");
    let run = |paths: &[PathBuf]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
            .args(["reshard", "--world-size", "1", "--quiet", "--out"])
            .arg(&out)
            .args(paths)
            .output()
            .unwrap()
    };
    let done = run(&paths);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "3 files of a run of 3 ranks: 1003 classes, d = 24, step 1, weights and momentum"
        ),
        "{stdout}"
    );
    let set = CheckpointSet::open(&[out.join(shard_file_name(1, 0))]).unwrap();
    assert_eq!((set.world_size(), set.num_classes()), (1, CLASSES));
    let refused = run(&paths[..2]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no file is given for rank 2"), "{stderr}");
    // --num-classes grows it (a count as `pfc plan` takes them); shrinking is refused.
    let grow = |classes: &str, out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
            .args([
                "reshard",
                "--world-size",
                "2",
                "--quiet",
                "--num-classes",
                classes,
            ])
            .arg("--out")
            .arg(out)
            .args(&paths)
            .output()
            .unwrap()
    };
    let grown = grow("1.1k", &dir.path().join("grown"));
    let stdout = String::from_utf8_lossy(&grown.stdout);
    assert!(grown.status.success(), "{stdout}");
    assert!(
        stdout.contains("grew the classifier to 1100 classes: 97 new, from class 1003 on"),
        "{stdout}"
    );
    let set = CheckpointSet::open(&[
        dir.path().join("grown").join(shard_file_name(2, 0)),
        dir.path().join("grown").join(shard_file_name(2, 1)),
    ])
    .unwrap();
    assert_eq!((set.world_size(), set.num_classes()), (2, 1100));
    let shrunk = grow("1000", &dir.path().join("shrunk"));
    let stderr = String::from_utf8_lossy(&shrunk.stderr);
    assert_eq!(shrunk.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("can grow, not shrink"), "{stderr}");
    assert!(!dir.path().join("shrunk").exists());
}

/// `pfc reshard --out DIR` refuses a DIR that holds files of the names it would write (the
/// library's `reshard` replaces them; a user found a folder's files overwritten silently),
/// before anything is read or written; `--force` replaces them; files of other names, such as
/// another world size's, are left alone. Its lines count in the right number.
#[test]
fn pfc_reshard_refuses_files_it_would_replace_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    train(2, &[], 1, Some(dir.path()));
    let paths = files(dir.path(), 2);
    let out = dir.path().join("resharded");
    let run = |world: &str, force: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"));
        cmd.args(["reshard", "--world-size", world, "--quiet", "--out"])
            .arg(&out)
            .args(&paths);
        if force {
            cmd.arg("--force");
        }
        let done = cmd.output().unwrap();
        (
            done.status.code(),
            String::from_utf8_lossy(&done.stdout).into_owned(),
            String::from_utf8_lossy(&done.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run("1", false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("2 files of a run of 2 ranks: 1003 classes"),
        "{stdout}"
    );
    assert!(stdout.contains("wrote 1 file for 1 rank to"), "{stdout}");
    let merged = out.join(shard_file_name(1, 0));
    let notes = out.join("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();
    // a file of that name, whatever it holds, is refused and left as it is
    std::fs::write(&merged, "a file of the same name").unwrap();
    let (code, stdout, stderr) = run("1", false);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("already holds rank0-of-1.safetensors: give --force to replace it"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "refused before anything: {stdout}");
    assert_eq!(
        std::fs::read_to_string(&merged).unwrap(),
        "a file of the same name"
    );
    // another world size's names are free; then both of them are taken
    let (code, stdout, stderr) = run("3", false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("wrote 3 files for 3 ranks"), "{stdout}");
    let (code, _, stderr) = run("3", false);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr
            .contains("already holds rank0-of-3.safetensors (and 2 more of the 3 files to write)"),
        "{stderr}"
    );
    let (code, _, stderr) = run("1", true);
    assert_eq!(code, Some(0), "{stderr}");
    let set = CheckpointSet::open(&[merged]).unwrap();
    assert_eq!((set.world_size(), set.num_classes()), (1, CLASSES));
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me");
}

#[test]
fn runs_with_another_seed_at_the_same_step_do_not_mix() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    train(3, &[], 1, Some(&a));
    ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut cfg = config(3);
        cfg.seed += 1;
        let mut layer = PartialFc::new(cfg, CpuBackend, comm).unwrap();
        layer.set_steps(1);
        layer
            .save(&b.join(format!("rank{rank}.safetensors")))
            .unwrap();
    });
    let mixed = vec![
        files(&a, 3)[0].clone(),
        files(&b, 3)[1].clone(),
        files(&a, 3)[2].clone(),
    ];
    let e = refusal(CheckpointSet::open(&mixed).err().unwrap());
    assert!(
        e.contains("not of the same run") && e.contains("seed"),
        "{e}"
    );
}

/// The user's case: two runs that differ only in their negative sampler, saved at the same step
/// with the same seed. A glob over the wrong folder mixed them; the files record the margin,
/// sampler and optimizer, so the mix is refused, and a resharded copy carries the record on.
#[test]
fn runs_with_another_sampler_at_the_same_step_do_not_mix() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    for (folder, hard) in [(&a, false), (&b, true)] {
        ThreadGroup::run(3, |comm| {
            let rank = comm.rank();
            let mut cfg = config(3);
            if hard {
                cfg.sampler = partial_fc::NegativeSampler::Hard { fraction: 0.5 };
            }
            let mut layer = PartialFc::new(cfg, CpuBackend, comm).unwrap();
            layer.set_steps(1);
            layer
                .save(&folder.join(format!("rank{rank}.safetensors")))
                .unwrap();
        });
    }
    let mixed = vec![
        files(&a, 3)[0].clone(),
        files(&a, 3)[1].clone(),
        files(&b, 3)[2].clone(),
    ];
    let e = refusal(CheckpointSet::open(&mixed).err().unwrap());
    assert!(
        e.contains("not of the same run") && e.contains("Hard") && e.contains("Random"),
        "{e}"
    );
    let set = CheckpointSet::open(&files(&b, 3)).unwrap();
    assert!(set.config().unwrap().contains("Hard"), "{:?}", set.config());
    let merged = dir.path().join("merged");
    reshard(&files(&b, 3), 1, &merged, &|_| {}).unwrap();
    let copy = CheckpointSet::open(&[merged.join(shard_file_name(1, 0))]).unwrap();
    assert_eq!(copy.config(), set.config());
}

/// A checkpoint file with the given metadata and an f32 `weight` of `rows × dim`.
fn crafted(path: &Path, meta: &[(&str, String)], rows: usize, dim: usize) {
    use partial_fc::tensor_file::{write_atomic, OutTensor};
    let values = vec![0.5f32; rows * dim];
    let meta = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    write_atomic(
        path,
        &[OutTensor::F32("weight", vec![rows, dim], &values)],
        meta,
    )
    .unwrap();
}

#[test]
fn crafted_metadata_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let base = |classes: u64, world: u64, dim: usize| {
        vec![
            ("format", partial_fc::checkpoint::FORMAT.to_string()),
            ("num_classes", classes.to_string()),
            ("world_size", world.to_string()),
            ("rank", "0".to_string()),
            ("shard_start", "0".to_string()),
            ("shard_len", "1".to_string()),
            ("dim", dim.to_string()),
            ("step", "0".to_string()),
        ]
    };
    // More ranks than classes (a world size of 2^40 would make any walk over ranks hang).
    crafted(&path, &base(1 << 26, 1 << 40, 4), 1, 4);
    let e = refusal(CheckpointSet::open(&[&path]).err().unwrap());
    assert!(
        e.contains("world size 1099511627776 over 67108864 classes"),
        "{e}"
    );
    // d = 0.
    crafted(&path, &base(1 << 26, 1 << 26, 0), 1, 0);
    let e = refusal(CheckpointSet::open(&[&path]).err().unwrap());
    assert!(e.contains("dim is 0"), "{e}");
    // One class per rank of 2^26 ranks: fine to open, and the missing ranks come lazily.
    crafted(&path, &base(1 << 26, 1 << 26, 4), 1, 4);
    let set = CheckpointSet::open(&[&path]).unwrap();
    assert_eq!(
        set.missing_ranks().take(3).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let e = refusal(reshard(&[&path], 1, &dir.path().join("out"), &|_| {}).unwrap_err());
    assert!(
        e.contains("no file is given for ranks 1, 2, 3, 4, 5, 6, 7, 8, ..."),
        "{e}"
    );
    // A classifier whose values cannot be addressed (class × dim overflows): refused at open,
    // not a multiplication overflow when a shard is written (a panic hunt found it).
    let mut huge = base(u64::MAX, u64::MAX, 8);
    huge[3].1 = (u64::MAX - 1).to_string(); // the last rank's one class
    huge[4].1 = (u64::MAX - 1).to_string();
    crafted(&path, &huge, 1, 8);
    let e = refusal(CheckpointSet::open(&[&path]).err().unwrap());
    assert!(e.contains("cannot be addressed"), "{e}");
    // `load` and the set read the metadata alike: "010" is 10 to both, a seed of -1 neither.
    let mut padded = base(10, 1, 4);
    padded[1].1 = "010".to_string();
    padded[5].1 = "10".to_string();
    crafted(&path, &padded, 10, 4);
    assert!(CheckpointSet::open(&[&path]).is_ok());
    let mut weights_only = LayerConfig::new(10, 4, 2);
    weights_only.optimizer = None;
    let mut layer = PartialFc::zeroed(weights_only, CpuBackend, SingleRank).unwrap();
    layer.load(&path).unwrap();
    padded.push(("seed", "-1".to_string()));
    crafted(&path, &padded, 10, 4);
    let e = CheckpointSet::open(&[&path]).err().unwrap().to_string();
    assert!(e.contains("seed = \"-1\" does not parse"), "{e}");
    let e = layer.load(&path).unwrap_err().to_string();
    assert!(e.contains("seed = \"-1\" does not parse"), "{e}");
    // A step counter `load` refuses is refused by the set too (reshard would copy it out).
    let mut stuck = base(1 << 26, 1 << 26, 4);
    stuck[7].1 = u64::MAX.to_string();
    crafted(&path, &stuck, 1, 4);
    let e = refusal(CheckpointSet::open(&[&path]).err().unwrap());
    assert!(e.contains("step is u64::MAX"), "{e}");
}

#[test]
fn a_file_replaced_while_it_is_read_is_an_error_not_a_mix() {
    let dir = tempfile::tempdir().unwrap();
    train(3, &[], 1, Some(dir.path()));
    let paths = files(dir.path(), 3);
    // After the first block (rank 0 of the new run), a save replaces the old rank 2's file.
    let replaced = std::cell::Cell::new(false);
    let tmp = dir.path().join("tmp");
    let e = reshard(&paths, 3, &dir.path().join("out"), &|_| {
        if !replaced.replace(true) {
            std::fs::copy(&paths[2], &tmp).unwrap();
            std::fs::rename(&tmp, &paths[2]).unwrap();
        }
    })
    .unwrap_err();
    assert!(e.to_string().contains("changed since it was opened"), "{e}");
}

/// Tensors of more than one 64 MiB block (2^24 values), with d = 257 so that a block ends
/// inside a row and inside an old file: a merge and a load read at non-zero offsets.
#[test]
fn shards_larger_than_a_block_move_exactly() {
    const BIG: u64 = 70_001;
    const D: usize = 257;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let cfg = || LayerConfig::new(BIG, D, 4);
    let saved = ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(cfg(), CpuBackend, comm).unwrap();
        // A momentum that differs from the weights, so that a tensor mix-up shows.
        let w = layer.weight().unwrap();
        let m: Vec<f32> = w.iter().map(|v| -2.0 * v).collect();
        layer.set_momentum(&m).unwrap();
        let path = root.join(format!("rank{rank}.safetensors"));
        layer.save(&path).unwrap();
        (path, w, m)
    });
    let paths: Vec<PathBuf> = saved.iter().map(|s| s.0.clone()).collect();
    assert!(
        BIG as usize * D > 1 << 24,
        "the merged tensor spans two blocks"
    );
    let merged = reshard(&paths, 1, &root.join("one"), &|_| {}).unwrap();
    let mut one = PartialFc::zeroed(cfg(), CpuBackend, SingleRank).unwrap();
    one.load(&merged[0]).unwrap();
    let whole_w: Vec<f32> = saved.iter().flat_map(|s| s.1.clone()).collect();
    let whole_m: Vec<f32> = saved.iter().flat_map(|s| s.2.clone()).collect();
    assert!(one.weight().unwrap() == whole_w, "merged weight");
    assert!(
        one.momentum().unwrap().unwrap() == whole_m,
        "merged momentum"
    );
    drop(one);
    let again = reshard(&merged, 3, &root.join("three"), &|_| {}).unwrap();
    for (a, b) in again.iter().zip(&paths) {
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{}",
            a.display()
        );
    }
}

#[test]
fn an_output_folder_that_is_a_file_or_has_no_parent_is_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    train(2, &[], 1, Some(dir.path()));
    let paths = files(dir.path(), 2);
    let a_file = dir.path().join("notes.txt");
    std::fs::write(&a_file, "keep me").unwrap();
    let e = reshard(&paths, 1, &a_file, &|_| {}).unwrap_err();
    assert!(refusal(e).contains("is a file"));
    assert_eq!(std::fs::read_to_string(&a_file).unwrap(), "keep me");
    let deep = dir.path().join("typo").join("merged");
    let e = reshard(&paths, 1, &deep, &|_| {}).unwrap_err();
    assert!(refusal(e).contains("does not exist"));
    assert!(!dir.path().join("typo").exists(), "no folder was made");
    // a new folder under an existing parent is made
    let fresh = dir.path().join("merged");
    let written = reshard(&paths, 1, &fresh, &|_| {}).unwrap();
    assert_eq!(written, vec![fresh.join(shard_file_name(1, 0))]);
}

/// docs/training.md's recipe for changing the sample rate: save at r = 0.1, build layers at
/// r = 1 and load_resharded the files; weights, momentum and step carry over, and the next pass
/// samples every class of the shard.
#[test]
fn a_run_saved_at_one_sample_rate_resumes_at_another() {
    let dir = tempfile::tempdir().unwrap();
    let world = 2;
    let saved = ThreadGroup::run(world, |comm| {
        let rank = comm.rank();
        let mut cfg = config(world);
        cfg.sample_rate = 0.1;
        let mut layer = PartialFc::new(cfg, CpuBackend, comm).unwrap();
        let rows = Shard::of(BATCH as u64, world, rank);
        let (x, labels) = batch(0);
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        layer
            .forward_backward(&x[r0 * DIM..r1 * DIM], &labels[r0..r1])
            .unwrap();
        assert!(layer.sampled_classes().unwrap().len() < layer.shard().len as usize);
        layer.step(0.5).unwrap();
        let path = dir.path().join(format!("rank{rank}.safetensors"));
        layer.save(&path).unwrap();
        (layer.weight().unwrap(), layer.steps())
    });
    let paths = files(dir.path(), world);
    let resumed = ThreadGroup::run(world, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(world), CpuBackend, comm).unwrap(); // r = 1
        layer.load_resharded(&paths).unwrap();
        let loaded = (layer.weight().unwrap(), layer.steps());
        let rows = Shard::of(BATCH as u64, world, rank);
        let (x, labels) = batch(1);
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        layer
            .forward_backward(&x[r0 * DIM..r1 * DIM], &labels[r0..r1])
            .unwrap();
        let all = layer.sampled_classes().unwrap().len() == layer.shard().len as usize;
        (loaded, all)
    });
    for (rank, ((loaded, all), saved)) in resumed.iter().zip(&saved).enumerate() {
        assert_eq!(loaded, saved, "rank {rank}: weights and step carried over");
        assert!(all, "rank {rank}: r = 1 samples the whole shard");
    }
}

/// A classifier grown by `reshard_grown` (a dataset added identities after the old ids): the
/// run's classes keep their trained weights and momentum exactly, each new class starts with
/// the weights a fresh layer of the grown size gives it (same seed) and zero momentum, and the
/// grown layer trains on labels of the new classes.
#[test]
fn a_grown_classifier_keeps_the_trained_classes_and_starts_the_new_ones_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let (_, trained) = train(3, &[], 2, Some(dir.path()));
    let grown_classes = CLASSES + 50;
    let out = dir.path().join("grown");
    let grown = partial_fc::checkpoint::reshard_grown(
        &files(dir.path(), 3),
        2,
        Some(grown_classes),
        None,
        &out,
        &|_| {},
    )
    .unwrap();
    let set = CheckpointSet::open(&grown).unwrap();
    assert_eq!((set.num_classes(), set.world_size()), (grown_classes, 2));
    let grown_config = |world| {
        let mut c = config(world);
        c.num_classes = grown_classes;
        c
    };
    let fresh = ThreadGroup::run(2, |comm| {
        let layer = PartialFc::new(grown_config(2), CpuBackend, comm).unwrap();
        layer.weight().unwrap()
    })
    .concat();
    let loaded = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(grown_config(2), CpuBackend, comm).unwrap();
        layer.load_resharded(&grown).unwrap();
        assert_eq!(
            (layer.steps(), layer.optimizer_steps()),
            (2, 2),
            "counters carried over"
        );
        let state = (layer.weight().unwrap(), layer.momentum().unwrap().unwrap());
        // Train on: half the batch's labels are new classes.
        let rows = Shard::of(BATCH as u64, 2, rank);
        let (x, mut labels) = batch(layer.steps());
        for (i, l) in labels.iter_mut().enumerate().filter(|(i, _)| i % 2 == 0) {
            *l = (CLASSES + (i as u64 % 50)) as i64;
        }
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let out = layer
            .forward_backward(&x[r0 * DIM..r1 * DIM], &labels[r0..r1])
            .unwrap();
        layer.step(0.5).unwrap();
        (state, out.loss, layer.weight().unwrap())
    });
    let weight: Vec<f32> = loaded.iter().flat_map(|p| p.0 .0.clone()).collect();
    let momentum: Vec<f32> = loaded.iter().flat_map(|p| p.0 .1.clone()).collect();
    let old = CLASSES as usize * DIM;
    // The run's momentum, read back from its own files by one rank.
    let mut original = PartialFc::new(config(1), CpuBackend, SingleRank).unwrap();
    original.load_resharded(&files(dir.path(), 3)).unwrap();
    assert!(
        momentum[..old] == original.momentum().unwrap().unwrap()[..],
        "the trained classes' momentum, bit for bit"
    );
    assert_eq!(weight.len(), grown_classes as usize * DIM);
    assert_eq!(
        &weight[..old],
        &trained[..],
        "the trained classes, bit for bit"
    );
    assert_eq!(
        &weight[old..],
        &fresh[old..],
        "the new classes, as a fresh layer's"
    );
    assert!(
        momentum[..old].iter().any(|&m| m != 0.0),
        "the trained classes' momentum is kept"
    );
    assert!(
        momentum[old..].iter().all(|&m| m == 0.0),
        "new classes start without momentum"
    );
    assert!(loaded[0].1.is_finite());
    // The new classes trained on: the rows of the new labels moved.
    let after: Vec<f32> = loaded.iter().flat_map(|p| p.2.clone()).collect();
    let moved = (0..50)
        .filter(|i| {
            let row = (CLASSES as usize + i) * DIM;
            after[row..row + DIM] != weight[row..row + DIM]
        })
        .count();
    assert!(moved > 0, "no new class moved");
}

/// Growing refuses to shrink, a world size the grown classifier cannot be split over, and files
/// that do not record the seed the new weights come from; nothing is written.
#[test]
fn growth_that_cannot_be_done_is_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    train(1, &[], 1, Some(dir.path()));
    let paths = files(dir.path(), 1);
    let out = dir.path().join("out");
    let grow = |classes, world| {
        partial_fc::checkpoint::reshard_grown(&paths, world, Some(classes), None, &out, &|_| {})
    };
    match grow(CLASSES - 1, 1) {
        Err(PfcError::Param { name, .. }) => assert_eq!(name, "num_classes"),
        other => panic!("shrinking must be refused: {other:?}"),
    }
    match grow(CLASSES + 1, CLASSES as usize + 2) {
        Err(PfcError::Param { name, .. }) => assert_eq!(name, "world_size"),
        other => panic!("more ranks than classes must be refused: {other:?}"),
    }
    match grow(u64::MAX / 2, 1) {
        Err(PfcError::Param { name, reason, .. }) => {
            assert_eq!(name, "num_classes");
            assert!(reason.contains("cannot be addressed"), "{reason}");
        }
        other => panic!("an unaddressable classifier must be refused: {other:?}"),
    }
    assert!(!out.exists(), "nothing written");
    // Files without a recorded seed (an older build's) can be resharded, not grown.
    let old = dir.path().join("old.safetensors");
    let meta = vec![
        ("format", partial_fc::checkpoint::FORMAT.to_string()),
        ("num_classes", "10".to_string()),
        ("world_size", "1".to_string()),
        ("rank", "0".to_string()),
        ("shard_start", "0".to_string()),
        ("shard_len", "10".to_string()),
        ("dim", "4".to_string()),
        ("step", "0".to_string()),
    ];
    crafted(&old, &meta, 10, 4);
    let e = partial_fc::checkpoint::reshard_grown(&[&old], 1, Some(12), None, &out, &|_| {});
    match e {
        Err(PfcError::Param { reason, .. }) => assert!(reason.contains("seed"), "{reason}"),
        other => panic!("growth without a seed must be refused: {other:?}"),
    }
    assert!(!out.exists(), "nothing written");
    partial_fc::checkpoint::reshard_grown(&[&old], 1, None, None, &out, &|_| {}).unwrap();
    // Given the run's seed, they grow as files that record it do, and the new files record it.
    let with_seed = dir.path().join("with_seed.safetensors");
    let mut meta_seed = meta.clone();
    meta_seed.push(("seed", "77".to_string()));
    crafted(&with_seed, &meta_seed, 10, 4);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let given =
        partial_fc::checkpoint::reshard_grown(&[&old], 1, Some(12), Some(77), &a, &|_| {}).unwrap();
    let recorded =
        partial_fc::checkpoint::reshard_grown(&[&with_seed], 1, Some(12), None, &b, &|_| {})
            .unwrap();
    assert_eq!(CheckpointSet::open(&given).unwrap().seed(), Some(77));
    let weights = |files: &[std::path::PathBuf]| {
        let mut cfg = LayerConfig::new(12, 4, 2);
        cfg.optimizer = None;
        let mut layer = PartialFc::zeroed(cfg, CpuBackend, SingleRank).unwrap();
        layer.load_resharded(files).unwrap();
        layer.weight().unwrap()
    };
    let grown = weights(&given);
    assert_eq!(grown, weights(&recorded));
    assert!(
        grown[..40].iter().all(|&v| v == 0.5),
        "the run's classes kept"
    );
    assert!(
        grown[40..].iter().all(|&v| v != 0.5 && v.abs() < 0.1),
        "new ones drawn"
    );
    // Another seed than the files' is refused, with nothing written.
    let c = dir.path().join("c");
    match partial_fc::checkpoint::reshard_grown(&[&with_seed], 1, Some(12), Some(78), &c, &|_| {}) {
        Err(PfcError::Param { name, reason, .. }) => {
            assert_eq!(name, "seed");
            assert!(reason.contains("77"), "{reason}");
        }
        other => panic!("a seed other than the files' must be refused: {other:?}"),
    }
    assert!(!c.exists(), "nothing written");
}

/// Growth where a rank's shard holds only new classes (10 to 40 classes over 4 ranks), grown
/// again at another world size (40 to 41 over 3), and where a 2^24-value read block starts in
/// the middle of a new row (d = 3): the result equals a fresh layer of the grown size wherever
/// the classes are new, and the old rows are exact.
#[test]
fn growth_with_ranks_of_only_new_classes_and_blocks_starting_mid_row_is_exact() {
    let weights_only = |classes: u64, d: usize| {
        let mut c = LayerConfig::new(classes, d, 2);
        c.optimizer = None;
        c
    };
    let fresh = |classes: u64, d: usize| {
        PartialFc::new(weights_only(classes, d), CpuBackend, SingleRank)
            .unwrap()
            .weight()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = 5;
    let old = dir.path().join("old.safetensors");
    PartialFc::new(weights_only(10, d), CpuBackend, SingleRank)
        .unwrap()
        .save(&old)
        .unwrap();
    let grown = partial_fc::checkpoint::reshard_grown(
        &[&old],
        4,
        Some(40),
        None,
        &dir.path().join("g"),
        &|_| {},
    )
    .unwrap();
    let got = ThreadGroup::run(4, |comm| {
        let mut layer = PartialFc::zeroed(weights_only(40, d), CpuBackend, comm).unwrap();
        layer.load_resharded(&grown).unwrap();
        layer.weight().unwrap()
    })
    .concat();
    assert_eq!(got, fresh(40, d), "old rows are the fresh layer's too here");
    let again = partial_fc::checkpoint::reshard_grown(
        &grown,
        3,
        Some(41),
        None,
        &dir.path().join("h"),
        &|_| {},
    )
    .unwrap();
    let mut layer = PartialFc::zeroed(weights_only(41, d), CpuBackend, SingleRank).unwrap();
    layer.load_resharded(&again).unwrap();
    assert_eq!(layer.weight().unwrap(), fresh(41, d));

    // d = 3: 5,592,000 classes hold 16,776,000 values, just under 2^24; the block after it
    // starts at value 2^24, row 5,592,405, column 1, among the new classes.
    let (d, old_classes, new_classes) = (3, 5_592_000u64, 5_593_000u64);
    let mut layer =
        PartialFc::zeroed(weights_only(old_classes, d), CpuBackend, SingleRank).unwrap();
    let trained: Vec<f32> = (0..old_classes as usize * d)
        .map(|i| 1.0 + (i % 1000) as f32 * 1e-3)
        .collect();
    layer.set_weight(&trained).unwrap();
    let big = dir.path().join("big.safetensors");
    layer.save(&big).unwrap();
    drop(layer);
    let grown = partial_fc::checkpoint::reshard_grown(
        &[&big],
        1,
        Some(new_classes),
        None,
        &dir.path().join("big-grown"),
        &|_| {},
    )
    .unwrap();
    let mut layer =
        PartialFc::zeroed(weights_only(new_classes, d), CpuBackend, SingleRank).unwrap();
    layer.load_resharded(&grown).unwrap();
    let got = layer.weight().unwrap();
    drop(layer);
    assert!(got[..trained.len()] == trained[..], "old rows exact");
    let fresh = fresh(new_classes, d);
    assert!(
        got[trained.len()..] == fresh[trained.len()..],
        "new rows fresh"
    );
}

/// `save_with_metadata`: each rank's own entries under `user.`, read back by `user_metadata`,
/// ignored by `load_resharded` and not carried over by a reshard; bad keys are refused with
/// nothing written.
#[test]
fn user_metadata_rides_with_each_ranks_file() {
    use partial_fc::checkpoint::user_metadata;
    let dir = tempfile::tempdir().unwrap();
    let paths = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let layer = PartialFc::new(LayerConfig::new(20, 4, 2), CpuBackend, comm).unwrap();
        let path = dir.path().join(shard_file_name(2, rank));
        let stats = format!("{} 7.5", 20 + rank);
        layer
            .save_with_metadata(&path, &[("adaface", &stats), ("epoch", "3")])
            .unwrap();
        path
    });
    let meta = user_metadata(&paths[1]).unwrap();
    assert_eq!(meta.len(), 2);
    assert_eq!(
        (meta["adaface"].as_str(), meta["epoch"].as_str()),
        ("21 7.5", "3")
    );
    assert_eq!(user_metadata(&paths[0]).unwrap()["adaface"], "20 7.5");
    let mut one = PartialFc::zeroed(LayerConfig::new(20, 4, 2), CpuBackend, SingleRank).unwrap();
    one.load_resharded(&paths).unwrap();
    let merged = reshard(&paths, 1, &dir.path().join("one"), &|_| {}).unwrap();
    assert!(user_metadata(&merged[0]).unwrap().is_empty());
    let layer = PartialFc::new(LayerConfig::new(20, 4, 2), CpuBackend, SingleRank).unwrap();
    let bad = dir.path().join("bad.safetensors");
    for extra in [
        vec![("", "x")],
        vec![("a b", "x")],
        vec![("k", "1"), ("k", "2")],
    ] {
        let e = layer.save_with_metadata(&bad, &extra).unwrap_err();
        assert!(matches!(e, PfcError::Param { .. }), "{e}");
        assert!(!bad.exists());
    }
}

/// A checkpoint review: `pfc reshard --world-size 1000000000` tried to allocate its list of
/// output names (24 GB) and aborted. A world past `MAX_RESHARD_WORLD` is a typed error before
/// anything is written.
#[test]
fn a_world_past_the_reshard_limit_is_refused_before_any_allocation() {
    use partial_fc::checkpoint::{reshard_grown, MAX_RESHARD_WORLD};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("rank0.safetensors");
    let mut cfg = partial_fc::LayerConfig::new(20, 4, 2);
    cfg.optimizer = None;
    partial_fc::PartialFc::new(
        cfg,
        partial_fc::CpuBackend,
        partial_fc::collective::SingleRank,
    )
    .unwrap()
    .save(&src)
    .unwrap();
    let out = dir.path().join("out");
    let err = reshard_grown(
        &[&src],
        MAX_RESHARD_WORLD + 1,
        Some(1 << 40),
        None,
        &out,
        &|_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    assert!(!out.exists(), "a refused reshard made its folder");
}

/// A user trial: a killed save or reshard leaves hidden temporary files that nothing ever
/// removes or mentions. `pfc reshard` now says when its output folder holds some (and leaves
/// them: only the user knows whether another job is writing there).
#[test]
fn pfc_reshard_mentions_an_interrupted_writes_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    train(1, &[], 1, Some(dir.path()));
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let stale = out.join(".rank0-of-2.safetensors.tmp4242.0");
    std::fs::write(&stale, [0u8; 1000]).unwrap();
    let done = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(["reshard", "--world-size", "2", "--quiet", "--out"])
        .arg(&out)
        .args(files(dir.path(), 1))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(
        stderr.contains("1 temporary file of an interrupted write")
            && stderr.contains(".rank0-of-2.safetensors.tmp4242.0"),
        "{stderr}"
    );
    assert!(stale.exists(), "the note removed a file");
}
