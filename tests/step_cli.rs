//! `pfc step` on a step file written here (no ../shared needed): overrides, and the refusals
//! that protect the input.

use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

const B: usize = 6;
const D: usize = 8;
const C: usize = 40;

/// A step file whose `sampled_index` holds 10 of the 40 classes (the 6 labels among them).
fn write_case(path: &Path) {
    let x = partial_fc::init::normal_rows(1, 0, B, D, 1.0);
    let w = partial_fc::init::normal_rows(2, 0, C, D, 0.1);
    let labels: Vec<i64> = (0..B as i64).map(|i| i * 3).collect();
    let index: Vec<i64> = vec![0, 3, 6, 9, 12, 15, 20, 25, 30, 35];
    let meta = HashMap::from([("sample_rate".to_string(), "0.25".to_string())]);
    let tensors = [
        OutTensor::F32("embeddings", vec![B, D], &x),
        OutTensor::I64("labels", vec![B], &labels),
        OutTensor::F32("weight", vec![C, D], &w),
        OutTensor::I64("sampled_index", vec![index.len()], &index),
    ];
    write_atomic(path, &tensors, meta).unwrap();
}

fn pfc(args: &[&str], input: &Path, output: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfc"))
        .arg("step")
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(args)
        .output()
        .unwrap()
}

fn sampled(path: &Path) -> Vec<i64> {
    let file = TensorFile::read(path).unwrap();
    file.i64("sampled_index").unwrap().unwrap().0
}

#[test]
fn the_files_sample_is_used_unless_the_rate_or_seed_is_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (dir.path().join("in.st"), dir.path().join("out.st"));
    write_case(&input);
    let done = pfc(&[], &input, &out);
    assert!(done.status.success(), "{done:?}");
    assert_eq!(sampled(&out), vec![0, 3, 6, 9, 12, 15, 20, 25, 30, 35]);
    // --sample-rate 1 draws a new sample: every class.
    let done = pfc(&["--sample-rate", "1"], &input, &out);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{done:?}");
    assert!(stdout.contains("drawing a new sample"), "{stdout}");
    assert_eq!(sampled(&out), (0..C as i64).collect::<Vec<_>>());
    // --seed alone redraws at the file's rate (10 of 40), positives included.
    let done = pfc(&["--seed", "7"], &input, &out);
    assert!(done.status.success(), "{done:?}");
    let s = sampled(&out);
    assert_eq!(s.len(), 10);
    assert!((0..B as i64).all(|i| s.contains(&(i * 3))), "{s:?}");
}

#[test]
fn bad_arguments_are_refused_and_the_input_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.st");
    write_case(&input);
    let before = std::fs::read(&input).unwrap();
    let done = pfc(&[], &input, &input);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is the input file"), "{stderr}");
    assert_eq!(std::fs::read(&input).unwrap(), before);
    let out = dir.path().join("out.st");
    let done = pfc(&["--interclass-filter", "NaN"], &input, &out);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--interclass-filter NaN"), "{stderr}");
    // A negative scale reaches the layer's range check instead of clap's "unexpected argument".
    let done = pfc(&["--scale", "-1"], &input, &out);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
    assert!(stderr.contains("scale"), "{stderr}");
    assert!(!out.exists());
}

/// Class centers whose sum of squares overflows f32 are refused (the step would normalize them to
/// NaN and write NaN results), and so is a world of more thread ranks than one process runs.
#[test]
fn centers_that_overflow_and_thousands_of_ranks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("huge.st");
    let x = partial_fc::init::normal_rows(1, 0, B, D, 1.0);
    let w = vec![3e38f32; C * D];
    let labels: Vec<i64> = (0..B as i64).collect();
    let tensors = [
        OutTensor::F32("embeddings", vec![B, D], &x),
        OutTensor::I64("labels", vec![B], &labels),
        OutTensor::F32("weight", vec![C, D], &w),
    ];
    write_atomic(&input, &tensors, HashMap::new()).unwrap();
    let out = dir.path().join("out.st");
    let done = pfc(&[], &input, &out);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("sum of squares overflows f32"), "{stderr}");
    assert!(stderr.contains("row 0, class 0"), "{stderr}");
    assert!(!out.exists());
    let ok = dir.path().join("ok.st");
    write_case(&ok);
    // B = 6 rows allow at most 6 ranks anyway; the thread cap is checked in the library.
    let case = partial_fc::golden::StepCase::read(&ok).unwrap();
    let e = case
        .run_threads(partial_fc::golden::MAX_THREAD_RANKS + 1)
        .unwrap_err();
    assert!(e.to_string().contains("threads of one process"), "{e}");
}

/// `--output` replaces an existing file (a step's result is rewritten run after run), but
/// never a partial-fc checkpoint shard: a typo must not cost a run its file.
#[test]
fn a_checkpoint_shard_is_never_the_output() {
    use partial_fc::collective::SingleRank;
    use partial_fc::{CpuBackend, LayerConfig, PartialFc};
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.st");
    write_case(&input);
    let shard = dir.path().join("rank0.safetensors");
    PartialFc::new(LayerConfig::new(10, 4, 2), CpuBackend, SingleRank)
        .unwrap()
        .save(&shard)
        .unwrap();
    let before = std::fs::read(&shard).unwrap();
    let done = pfc(&[], &input, &shard);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is a partial-fc checkpoint shard (rank 0 of 1, step 0)"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&shard).unwrap(), before);
    // any other file is replaced, as before
    let out = dir.path().join("out.st");
    std::fs::write(&out, "old").unwrap();
    let done = pfc(&[], &input, &out);
    assert!(done.status.success(), "{done:?}");
    assert_eq!(sampled(&out).len(), 10);
}

/// A review: after the header parser learned to skip large metadata, a shard saved with 2 MiB
/// of a trainer's metadata was no longer recognized and `pfc step --output` replaced it. A
/// shard with any metadata the readers accept is still refused.
#[test]
fn a_shard_with_large_user_metadata_is_never_replaced() {
    use partial_fc::collective::SingleRank;
    use partial_fc::{CpuBackend, LayerConfig, PartialFc};
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.st");
    write_case(&input);
    let shard = dir.path().join("rank0.safetensors");
    let layer = PartialFc::new(LayerConfig::new(10, 4, 2), CpuBackend, SingleRank).unwrap();
    let note = "x".repeat(2 << 20);
    layer
        .save_with_metadata(&shard, &[("note", &note)])
        .unwrap();
    let before = std::fs::read(&shard).unwrap();
    let done = pfc(&[], &input, &shard);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is a partial-fc checkpoint shard"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&shard).unwrap(), before);
    // And metadata past what a reader accepts is refused before anything is written.
    let huge = "x".repeat(17 << 20);
    let other = dir.path().join("rank0-huge.safetensors");
    let err = layer
        .save_with_metadata(&other, &[("note", &huge)])
        .unwrap_err();
    assert!(err.to_string().contains("bytes of metadata"), "{err}");
    assert!(!other.exists());
}
