//! `predict_top_k`: the k nearest classes over every shard equal a brute-force search of the
//! whole classifier, for any world size and ragged batches; bad input is refused on every rank
//! together; a prediction leaves training as it was.

use partial_fc::checkpoint::CheckpointSet;
use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::{Collective, CpuBackend, LayerConfig, PartialFc, PfcError, Prediction, Shard};

const CLASSES: u64 = 1003;
const DIM: usize = 24;
const BATCH: usize = 30;

fn config(world: usize, classes: u64) -> LayerConfig {
    LayerConfig::new(classes, DIM, BATCH.div_ceil(world))
}

/// Embeddings: random rows, and every fifth row a class center plus a little noise (so that
/// class is first by a wide margin).
fn embeddings(weight: &[f32], rows: usize) -> Vec<f32> {
    let mut x = partial_fc::init::normal_rows(77, 0, rows, DIM, 1.0);
    for r in (0..rows).step_by(5) {
        let class = (r * 131 + 7) % (weight.len() / DIM);
        for j in 0..DIM {
            x[r * DIM + j] = weight[class * DIM + j] * 100.0 + 0.001 * x[r * DIM + j];
        }
    }
    x
}

fn normalized(v: &[f32]) -> Vec<f64> {
    let n = v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|&a| f64::from(a) / n).collect()
}

/// Every class's cosine with every row, in f64.
fn cosines(weight: &[f32], x: &[f32]) -> Vec<Vec<f64>> {
    let w: Vec<Vec<f64>> = weight.chunks(DIM).map(normalized).collect();
    x.chunks(DIM)
        .map(|row| {
            let r = normalized(row);
            w.iter()
                .map(|c| c.iter().zip(&r).map(|(a, b)| a * b).sum())
                .collect()
        })
        .collect()
}

/// The prediction is the brute-force top k: scores within 1e-5, ids equal except where two
/// classes' true cosines are within 1e-5 (the f32 GEMM may order those either way); equal
/// scores in id order.
fn assert_is_top_k(p: &Prediction, cos: &[Vec<f64>], k: usize) {
    assert_eq!(p.classes.len(), cos.len() * k);
    for (row, c) in cos.iter().enumerate() {
        let mut order: Vec<usize> = (0..c.len()).collect();
        order.sort_by(|&a, &b| c[b].total_cmp(&c[a]).then(a.cmp(&b)));
        for j in 0..k.min(c.len()) {
            let (got, want) = (p.classes[row * k + j], order[j] as i64);
            let score = p.scores[row * k + j];
            assert!(
                (f64::from(score) - c[order[j]]).abs() < 1e-5,
                "row {row} slot {j}: score {score} vs {}",
                c[order[j]]
            );
            assert!(
                got == want || (c[got as usize] - c[order[j]]).abs() < 1e-5,
                "row {row} slot {j}: class {got} vs {want}"
            );
            if j > 0 && score == p.scores[row * k + j - 1] {
                assert!(
                    got > p.classes[row * k + j - 1],
                    "row {row}: tie out of id order"
                );
            }
        }
        for j in c.len()..k {
            assert_eq!(
                (p.classes[row * k + j], p.scores[row * k + j]),
                (-1, f32::NEG_INFINITY)
            );
        }
    }
}

/// Each rank's prediction for its part of the batch (rows of `rows_of(rank)`), concatenated.
fn predict(world: usize, classes: u64, x: &[f32], k: usize, rows: &[usize]) -> Prediction {
    let parts = ThreadGroup::run(world, |comm| {
        let rank = comm.rank();
        let first: usize = rows[..rank].iter().sum();
        let mine = &x[first * DIM..(first + rows[rank]) * DIM];
        let mut layer = PartialFc::new(config(world, classes), CpuBackend, comm).unwrap();
        layer.predict_top_k(mine, k).unwrap()
    });
    Prediction {
        k,
        classes: parts.iter().flat_map(|p| p.classes.clone()).collect(),
        scores: parts.iter().flat_map(|p| p.scores.clone()).collect(),
    }
}

fn whole_weight(classes: u64) -> Vec<f32> {
    PartialFc::new(config(1, classes), CpuBackend, SingleRank)
        .unwrap()
        .weight()
        .unwrap()
}

#[test]
fn the_top_k_over_every_shard_is_the_brute_force_top_k() {
    let weight = whole_weight(CLASSES);
    let x = embeddings(&weight, BATCH);
    let cos = cosines(&weight, &x);
    for k in [1, 5, 10] {
        let even = |world: usize| -> Vec<usize> {
            (0..world)
                .map(|r| Shard::of(BATCH as u64, world, r).len as usize)
                .collect()
        };
        for world in [1, 2, 3] {
            let p = predict(world, CLASSES, &x, k, &even(world));
            assert_is_top_k(&p, &cos, k);
        }
        // Ragged: rank 1 passes no rows, rank 0 and 2 fewer than N.
        let p = predict(3, CLASSES, &x[..20 * DIM], k, &[10, 0, 10]);
        assert_is_top_k(&p, &cos[..20], k);
    }
    // Rows built from a center find it first, at cosine ~1.
    let p = predict(2, CLASSES, &x, 3, &[15, 15]);
    for r in (0..BATCH).step_by(5) {
        assert_eq!(p.row(r)[0], ((r * 131 + 7) % CLASSES as usize) as i64);
        assert!(p.scores[r * 3] > 0.999);
    }
}

#[test]
fn k_beyond_a_shard_takes_classes_from_the_others() {
    // 10 classes over 3 ranks hold 4, 3 and 3: k = 7 and k = 10 need every shard.
    let weight = whole_weight(10);
    let x = embeddings(&weight, BATCH);
    let cos = cosines(&weight, &x);
    for k in [7, 10] {
        let p = predict(3, 10, &x, k, &[10, 10, 10]);
        assert_is_top_k(&p, &cos, k);
        for r in 0..BATCH {
            let mut all = p.row(r).to_vec();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), k, "row {r}: distinct classes");
        }
    }
}

#[test]
fn equal_centers_come_in_class_order() {
    let mut layer = PartialFc::new(config(1, 50), CpuBackend, SingleRank).unwrap();
    let mut w = layer.weight().unwrap();
    // Classes 3, 20 and 41 share a center, 41 twice as long (the cosine is the same).
    let center: Vec<f32> = w[3 * DIM..4 * DIM].to_vec();
    w[20 * DIM..21 * DIM].copy_from_slice(&center);
    for (j, c) in center.iter().enumerate() {
        w[41 * DIM + j] = 2.0 * c;
    }
    layer.set_weight(&w).unwrap();
    let p = layer.predict_top_k(&center, 4).unwrap();
    assert_eq!(&p.classes[..3], &[3, 20, 41]);
    assert_eq!(p.scores[0], p.scores[1]);
}

fn refusal(e: PfcError) -> String {
    e.to_string()
}

#[test]
fn bad_input_is_refused_on_every_rank_together() {
    let weight = whole_weight(CLASSES);
    let x = embeddings(&weight, BATCH);
    let mut one = PartialFc::new(config(1, CLASSES), CpuBackend, SingleRank).unwrap();
    for k in [0, 257] {
        let e = refusal(one.predict_top_k(&x[..2 * DIM], k).unwrap_err());
        assert!(e.contains("between 1 and 256"), "{e}");
    }
    // recall@100, the k extreme classification reports, is within TOP_K_MAX.
    let p = one.predict_top_k(&x[..2 * DIM], 100).unwrap();
    assert_eq!((p.rows(), p.classes.len()), (2, 200));
    let too_many = [x.clone(), x[..DIM].to_vec()].concat();
    let e = refusal(one.predict_top_k(&too_many, 3).unwrap_err());
    assert!(e.contains("at most 30 per rank"), "{e}");
    let e = refusal(one.predict_top_k(&x[..DIM + 1], 3).unwrap_err());
    assert!(e.contains("not a multiple of dim 24"), "{e}");
    let mut small = PartialFc::new(config(1, 5), CpuBackend, SingleRank).unwrap();
    let e = refusal(small.predict_top_k(&x[..DIM], 6).unwrap_err());
    assert!(e.contains("between 1 and 5"), "{e}");

    // A NaN on rank 1, a k that differs, a call that differs: every rank refuses, none hangs.
    type Case = fn(usize, &[f32]) -> (Vec<f32>, usize, bool);
    let cases: [(Case, [&str; 2]); 3] = [
        (
            |rank, x| {
                let mut mine = x[..4 * DIM].to_vec();
                if rank == 1 {
                    mine[DIM + 3] = f32::NAN;
                }
                (mine, 5, true)
            },
            ["rank 1 rejected its input", "row 1"],
        ),
        (
            |rank, x| (x[..4 * DIM].to_vec(), 5 + rank, true),
            ["predict_top_k's k", "predict_top_k's k"],
        ),
        (
            |rank, x| (x[..4 * DIM].to_vec(), 5, rank == 0),
            [
                "rank 1 called forward_backward while rank 0 called predict_top_k",
                "rank 0 called predict_top_k while rank 1 called forward_backward",
            ],
        ),
    ];
    for (case, whys) in cases {
        let errors = ThreadGroup::run(2, |comm| {
            let rank = comm.rank();
            let (mine, k, predict) = case(rank, &x);
            let mut layer = PartialFc::new(config(2, CLASSES), CpuBackend, comm).unwrap();
            let e = if predict {
                layer.predict_top_k(&mine, k).unwrap_err()
            } else {
                let labels = vec![1i64; mine.len() / DIM];
                layer.forward_backward(&mine, &labels).unwrap_err()
            };
            // The group still works: a good prediction on both ranks.
            layer.predict_top_k(&x[..2 * DIM], 2).unwrap();
            refusal(e)
        });
        for (e, why) in errors.iter().zip(whys) {
            assert!(e.contains(why), "{e}");
        }
    }
}

#[test]
fn a_prediction_between_a_pass_and_its_step_changes_nothing() {
    let weight = whole_weight(CLASSES);
    let x = embeddings(&weight, BATCH);
    let labels: Vec<i64> = (0..BATCH as i64).map(|i| i * 31 % CLASSES as i64).collect();
    let run = |predict: bool| {
        let mut layer = PartialFc::new(config(1, CLASSES), CpuBackend, SingleRank).unwrap();
        let out = layer.forward_backward(&x, &labels).unwrap();
        if predict {
            layer.predict_top_k(&x[..7 * DIM], 4).unwrap();
        }
        layer.step(0.5).unwrap();
        let next = layer.forward_backward(&x, &labels).unwrap();
        (out, next, layer.weight().unwrap(), layer.steps())
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn prediction_from_checkpoint_files_equals_the_layers() {
    // A 3-rank layer, trained a few steps (so the centers are not the initial ones), saves its
    // files and predicts; the files then predict the same on the host.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let x = embeddings(&whole_weight(CLASSES), BATCH);
    let k = 7;
    let parts = ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let rows = Shard::of(BATCH as u64, 3, rank);
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let mut layer = PartialFc::new(config(3, CLASSES), CpuBackend, comm).unwrap();
        for step in 0..3i64 {
            let labels: Vec<i64> = (r0 as i64..r1 as i64)
                .map(|i| (i * 37 + step * 11) % CLASSES as i64)
                .collect();
            layer
                .forward_backward(&x[r0 * DIM..r1 * DIM], &labels)
                .unwrap();
            layer.step(0.5).unwrap();
        }
        layer
            .save(&root.join(format!("rank{rank}.safetensors")))
            .unwrap();
        (
            layer.predict_top_k(&x[r0 * DIM..r1 * DIM], k).unwrap(),
            layer.weight().unwrap(),
        )
    });
    let layer = Prediction {
        k,
        classes: parts.iter().flat_map(|p| p.0.classes.clone()).collect(),
        scores: parts.iter().flat_map(|p| p.0.scores.clone()).collect(),
    };
    let weight: Vec<f32> = parts.iter().flat_map(|p| p.1.clone()).collect();
    // Files in any order.
    let paths: Vec<_> = [2, 0, 1]
        .iter()
        .map(|r| dir.path().join(format!("rank{r}.safetensors")))
        .collect();
    let set = CheckpointSet::open(&paths).unwrap();
    let files = set.predict_top_k(&x, k, &|_| {}).unwrap();
    assert_is_top_k(&files, &cosines(&weight, &x), k);
    assert_eq!(files.classes, layer.classes);
    for (a, b) in files.scores.iter().zip(&layer.scores) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn pfc_predict_writes_the_top_k_and_scores_the_labels() {
    use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let weight: Vec<f32> = ThreadGroup::run(2, |comm| {
        let path = root.join(format!("rank{}.safetensors", comm.rank()));
        let layer = PartialFc::new(config(2, CLASSES), CpuBackend, comm).unwrap();
        layer.save(&path).unwrap();
        layer.weight().unwrap()
    })
    .concat();
    // Every fifth row is built from class (r·131 + 7) mod C (embeddings()): label the rows
    // with those classes and the others with class 0, which none of them is near.
    let x = embeddings(&weight, BATCH);
    let labels: Vec<i64> = (0..BATCH)
        .map(|r| {
            if r % 5 == 0 {
                ((r * 131 + 7) % CLASSES as usize) as i64
            } else {
                0
            }
        })
        .collect();
    let input = dir.path().join("x.safetensors");
    let tensors = [
        OutTensor::F32("embeddings", vec![BATCH, DIM], &x),
        OutTensor::I64("labels", vec![BATCH], &labels),
    ];
    write_atomic(&input, &tensors, Default::default()).unwrap();
    let out = dir.path().join("top.safetensors");
    let ckpt = |r: usize| dir.path().join(format!("rank{r}.safetensors"));
    let pfc = |out: &std::path::Path, ckpts: &[std::path::PathBuf]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
            .args(["predict", "--k", "3", "--quiet", "--embeddings"])
            .arg(&input)
            .arg("--out")
            .arg(out)
            .args(ckpts)
            .output()
            .unwrap()
    };
    let done = pfc(&out, &[ckpt(1), ckpt(0)]);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    // 6 of 30 rows are found first; the others' label (class 0) is not in their top 3 unless
    // the random row happens to be nearest to it, which the brute force below decides.
    let cos = cosines(&weight, &x);
    let rank_of_label = |r: usize| {
        let c = &cos[r];
        let l = labels[r] as usize;
        c.iter().filter(|&&v| v > c[l]).count()
    };
    let expect = |j: usize| (0..BATCH).filter(|&r| rank_of_label(r) < j).count();
    for j in 1..=3 {
        let line = format!(
            "top-{j} accuracy: {:.2}%",
            100.0 * expect(j) as f64 / BATCH as f64
        );
        assert!(stdout.contains(&line), "{line} not in {stdout}");
    }
    assert!(
        expect(1) >= 6,
        "the rows built from centers are found first"
    );
    let file = TensorFile::read(&out).unwrap();
    let (classes, shape) = file.i64("classes").unwrap().unwrap();
    assert_eq!(shape, vec![BATCH, 3]);
    let (scores, _) = file.f32("scores").unwrap().unwrap();
    assert_is_top_k(
        &Prediction {
            k: 3,
            classes,
            scores,
        },
        &cos,
        3,
    );
    // Without --out the first rows are shown; row 0 is built from class 7's center.
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(["predict", "--k", "2", "--quiet", "--embeddings"])
        .arg(&input)
        .args([ckpt(0), ckpt(1)])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(stdout.contains("row 0: 7 (1.0000), "), "{stdout}");
    assert!(stdout.contains("... 20 more rows"), "{stdout}");
    // Refusals: an incomplete run, an output that is an input or a folder; nothing is written.
    let refused = pfc(&dir.path().join("none.safetensors"), &[ckpt(1)]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no file is given for rank 0"), "{stderr}");
    assert!(!dir.path().join("none.safetensors").exists());
    let refused = pfc(&ckpt(0), &[ckpt(0), ckpt(1)]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is one of the input files"), "{stderr}");
    assert!(
        CheckpointSet::open(&[ckpt(0), ckpt(1)]).is_ok(),
        "the checkpoint is intact"
    );
    // Labels that are not classes are counted as misses, and said so; no rows, no accuracy.
    let mut odd = labels.clone();
    odd[1] = -1;
    odd[2] = CLASSES as i64;
    let run_on = |x: &[f32], labels: &[i64]| {
        let rows = labels.len();
        let file = dir.path().join(format!("x{rows}.safetensors"));
        let tensors = [
            OutTensor::F32("embeddings", vec![rows, DIM], x),
            OutTensor::I64("labels", vec![rows], labels),
        ];
        write_atomic(&file, &tensors, Default::default()).unwrap();
        let done = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
            .args(["predict", "--k", "2", "--quiet", "--embeddings"])
            .arg(&file)
            .args([ckpt(0), ckpt(1)])
            .output()
            .unwrap();
        assert!(done.status.success());
        String::from_utf8_lossy(&done.stdout).into_owned()
    };
    let stdout = run_on(&x, &odd);
    // the whole line: a review found the note cut by a run of spaces from a bad line join
    assert!(
        stdout.contains(
            "note: 2 of 30 labels are not classes of this classifier (0 .. 1003): those rows \
             count as misses\n"
        ),
        "{stdout}"
    );
    let stdout = run_on(&x[..DIM], &[-1]);
    assert!(
        stdout.contains(
            "1 row against 1003 classes (d = 24, step 0, 2 files), k = 2\nnote: 1 of 1 label \
             is not a class of this classifier (0 .. 1003): that row counts as a miss\n"
        ),
        "{stdout}"
    );
    let typo = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(["predict", "--quiet", "--labels", "lables", "--embeddings"])
        .arg(&input)
        .args([ckpt(0), ckpt(1)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert_eq!(typo.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--labels lables: no I64 tensor"),
        "{stderr}"
    );
    let stdout = run_on(&[], &[]);
    assert!(stdout.contains("no rows: no accuracy"), "{stdout}");
    assert!(!stdout.contains("top-1 accuracy"), "{stdout}");
    // Arguments that can be refused without the embeddings are refused before they are read:
    // here the embeddings file does not exist, and the error names the argument instead.
    let early = |args: &[&str]| {
        let done = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
            .args(["predict", "--quiet", "--embeddings"])
            .arg(dir.path().join("absent.safetensors"))
            .args(args)
            .args([ckpt(0), ckpt(1)])
            .output()
            .unwrap();
        assert_eq!(done.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&done.stderr).into_owned()
    };
    assert!(early(&["--k", "0"]).contains("--k 0: must be between 1 and 256"));
    assert!(early(&["--k", "257"]).contains("--k 257: must be between 1 and 256"));
    let missing_folder = dir.path().join("no/such/top.safetensors");
    let stderr = early(&["--out", missing_folder.to_str().unwrap()]);
    assert!(stderr.contains("does not exist"), "{stderr}");
    if !cfg!(feature = "cuda") {
        let stderr = early(&["--backend", "cuda"]);
        assert!(stderr.contains("without the `cuda` feature"), "{stderr}");
    }
}

/// `pfc predict --out` refuses an existing file unless `--force` is given, and a partial-fc
/// checkpoint shard (here another run's, truncated or whole) or an input even with `--force`:
/// a user review found a shard of another run replaced by a 408-byte prediction, exit 0.
/// Nothing is written when it refuses, not even a temporary file.
#[test]
fn pfc_predict_out_replaces_only_with_force_and_never_a_checkpoint_shard() {
    use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
    let dir = tempfile::tempdir().unwrap();
    let (run, other) = (dir.path().join("run"), dir.path().join("other"));
    for root in [&run, &other] {
        std::fs::create_dir(root).unwrap();
        let root = root.clone();
        ThreadGroup::run(2, move |comm| {
            let path = root.join(format!("rank{}.safetensors", comm.rank()));
            let layer = PartialFc::new(config(2, CLASSES), CpuBackend, comm).unwrap();
            layer.save(&path).unwrap();
        });
    }
    let ckpts: Vec<_> = (0..2)
        .map(|r| run.join(format!("rank{r}.safetensors")))
        .collect();
    let x = partial_fc::init::normal_rows(5, 0, 4, DIM, 1.0);
    let input = dir.path().join("x.safetensors");
    write_atomic(
        &input,
        &[OutTensor::F32("embeddings", vec![4, DIM], &x)],
        Default::default(),
    )
    .unwrap();
    let names = |d: &std::path::Path| {
        let mut n: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    let before = names(dir.path());
    let predict = |out: &std::path::Path, force: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"));
        cmd.args(["predict", "--k", "2", "--quiet", "--embeddings"])
            .arg(&input)
            .arg("--out")
            .arg(out)
            .args(&ckpts);
        if force {
            cmd.arg("--force");
        }
        let done = cmd.output().unwrap();
        (
            done.status.code(),
            String::from_utf8_lossy(&done.stderr).into_owned(),
        )
    };
    // An existing file: refused without --force, replaced with it.
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();
    let (code, stderr) = predict(&notes, false);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("notes.txt exists: give --force to replace it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me");
    let (code, stderr) = predict(&notes, true);
    assert_eq!(code, Some(0), "{stderr}");
    let file = TensorFile::read(&notes).unwrap();
    assert_eq!(file.i64("classes").unwrap().unwrap().1, vec![4, 2]);
    // A new file needs no --force.
    let fresh = dir.path().join("top.safetensors");
    assert_eq!(predict(&fresh, false).0, Some(0));
    // Another run's shard, whole or truncated (only its header is read): never replaced.
    let shard = other.join("rank0.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let truncated = other.join("rank1.safetensors");
    let whole = std::fs::read(&truncated).unwrap();
    let header = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
    let cut = &whole[..8 + header + 16]; // the header and a few bytes of the weights
    std::fs::write(&truncated, cut).unwrap();
    for force in [false, true] {
        let (code, stderr) = predict(&shard, force);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains(
                "rank0.safetensors is a partial-fc checkpoint shard (rank 0 of 2, step 0): it is \
                 never replaced, --force or not"
            ),
            "{stderr}"
        );
        let (code, stderr) = predict(&truncated, force);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains("(rank 1 of 2, step 0)"), "{stderr}");
        // and the inputs, --force or not
        let (code, stderr) = predict(&ckpts[1], force);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains("is one of the input files"), "{stderr}");
        let (code, _) = predict(&input, force);
        assert_eq!(code, Some(2));
    }
    assert_eq!(std::fs::read(&shard).unwrap(), bytes);
    assert_eq!(std::fs::read(&truncated).unwrap(), cut);
    assert!(CheckpointSet::open(&ckpts).is_ok(), "the inputs are intact");
    let mut expected = before;
    expected.extend(["notes.txt".to_string(), "top.safetensors".to_string()]);
    expected.sort();
    assert_eq!(names(dir.path()), expected, "no temporary file is left");
    assert_eq!(names(&other), ["rank0.safetensors", "rank1.safetensors"]);
    // --force means nothing without --out; --help says what it does
    let done = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(["predict", "--force", "--embeddings"])
        .arg(&input)
        .args(&ckpts)
        .output()
        .unwrap();
    assert_eq!(done.status.code(), Some(2));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(["predict", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("An existing file is refused unless --force is given"),
        "{help}"
    );
}

/// `predict_top_k_all` takes any number of rows per rank: the ranks agree on the number of
/// chunks of `batch_per_rank` rows, those with fewer pass empty ones. Here 3 ranks of N = 10
/// rows each pass 47, 0 and 13 rows (5, 0 and 2 chunks), and get the brute-force top k.
#[test]
fn any_number_of_rows_per_rank_in_chunks() {
    let weight = whole_weight(CLASSES);
    let rows = [47usize, 0, 13];
    let total: usize = rows.iter().sum();
    let x = partial_fc::init::normal_rows(5, 0, total, DIM, 1.0);
    let cos = cosines(&weight, &x);
    let k = 4;
    let parts = ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let first: usize = rows[..rank].iter().sum();
        let mine = &x[first * DIM..(first + rows[rank]) * DIM];
        let mut layer = PartialFc::new(config(3, CLASSES), CpuBackend, comm).unwrap();
        layer.predict_top_k_all(mine, k).unwrap()
    });
    for (rank, p) in parts.iter().enumerate() {
        assert_eq!(p.classes.len(), rows[rank] * k, "rank {rank}");
    }
    let p = Prediction {
        k,
        classes: parts.iter().flat_map(|p| p.classes.clone()).collect(),
        scores: parts.iter().flat_map(|p| p.scores.clone()).collect(),
    };
    assert_is_top_k(&p, &cos, k);
    // A rank's ragged row is refused on every rank, at the first chunk.
    let refused = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(2, CLASSES), CpuBackend, comm).unwrap();
        let len = if rank == 1 { 25 * DIM + 3 } else { 25 * DIM };
        layer.predict_top_k_all(&x[..len], k).is_err()
    });
    assert_eq!(refused, [true, true]);
}

/// A user's trainer diverged (a learning rate of 1e38) and still got an answer from
/// `predict_top_k`: the nearest of the classes left finite. Now every rank refuses, naming a
/// class whose center is not finite (1e38: values overflow to inf) or whose norm overflows
/// (1e25: finite values, sum of squares past f32; found by a review), a rank without rows too;
/// and the group stays whole, so the next call gets the same answer, not an aborted group.
#[test]
fn a_diverged_classifier_refuses_to_predict_on_every_rank() {
    for (lr, steps) in [(1e38f32, 4), (1e25, 1)] {
        let results = ThreadGroup::run(2, |comm| {
            let rank = comm.rank();
            let mut cfg = LayerConfig::new(40, 8, 3);
            cfg.sample_rate = 1.0;
            let mut layer = PartialFc::new(cfg, CpuBackend, comm).unwrap();
            let x = partial_fc::init::normal_rows(7 + rank as u64, 0, 3, 8, 1.0);
            let labels = [rank as i64, 10 + rank as i64, 30];
            for _ in 0..steps {
                layer.forward_backward(&x, &labels).unwrap();
                layer.step(lr).unwrap();
            }
            let w = layer.weight().unwrap();
            let finite = w.iter().all(|v| v.is_finite());
            // Rank 1 passes no rows: it must refuse with rank 0.
            let mine = if rank == 0 { &x[..] } else { &x[..0] };
            let first = layer.predict_top_k(mine, 2).map(|_| ());
            let again = layer.predict_top_k(mine, 2).map(|_| ());
            (finite, first, again)
        });
        if lr < 1e30 {
            assert!(
                results.iter().all(|(finite, _, _)| *finite),
                "lr {lr:e} must leave the values finite (the norm overflows)"
            );
        }
        for (rank, (_, first, again)) in results.iter().enumerate() {
            for out in [first, again] {
                assert!(
                    matches!(out, Err(PfcError::Diverged { .. })),
                    "lr {lr:e}, rank {rank}: {out:?}"
                );
            }
        }
    }
}

/// The files of a run saved just after its norms overflowed (finite values, so `save` takes
/// them) refuse a prediction too, on the CPU path `pfc predict` uses.
#[test]
fn checkpoint_files_of_a_diverged_run_refuse_to_predict() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rank0.safetensors");
    let mut cfg = LayerConfig::new(40, 8, 3);
    cfg.sample_rate = 1.0;
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let x = partial_fc::init::normal_rows(9, 0, 3, 8, 1.0);
    layer.forward_backward(&x, &[1, 2, 3]).unwrap();
    layer.step(1e25).unwrap();
    layer.save(&path).unwrap();
    let set = CheckpointSet::open(&[path]).unwrap();
    let out = set.predict_top_k(&x, 2, &|_| {});
    assert!(matches!(out, Err(PfcError::Diverged { .. })), "{out:?}");
}

/// `pfc predict` with a `[rows, width]` label tensor (a set per row, padded with -1) prints
/// P@j, nDCG@j and recall@j, the values `Prediction::ranking_metrics` gives for the prediction
/// it wrote; a row with no label is noted.
#[test]
fn pfc_predict_scores_label_sets() {
    use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("rank0.safetensors");
    let layer = PartialFc::new(config(1, CLASSES), CpuBackend, SingleRank).unwrap();
    layer.save(&ckpt).unwrap();
    let weight = layer.weight().unwrap();
    let x = embeddings(&weight, BATCH);
    // Row r's set: the class its embedding was built from (every fifth row), two others, a
    // repeat and padding; the last row has no label at all.
    let width = 5;
    let mut labels = Vec::with_capacity(BATCH * width);
    for r in 0..BATCH {
        let own = ((r * 131 + 7) % CLASSES as usize) as i64;
        let row = if r == BATCH - 1 {
            [-1; 5]
        } else {
            [own, (own + 1) % CLASSES as i64, 3, 3, -1]
        };
        labels.extend(row);
    }
    let input = dir.path().join("x.safetensors");
    let tensors = [
        OutTensor::F32("embeddings", vec![BATCH, DIM], &x),
        OutTensor::I64("labels", vec![BATCH, width], &labels),
    ];
    write_atomic(&input, &tensors, Default::default()).unwrap();
    let out = dir.path().join("top.safetensors");
    let done = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(["predict", "--k", "3", "--quiet", "--embeddings"])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .arg(&ckpt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let file = TensorFile::read(&out).unwrap();
    let (classes, _) = file.i64("classes").unwrap().unwrap();
    let (scores, _) = file.f32("scores").unwrap().unwrap();
    let p = Prediction {
        k: 3,
        classes,
        scores,
    };
    let sets: Vec<&[i64]> = labels.chunks(width).collect();
    let m = p.ranking_metrics(&sets).unwrap();
    assert_eq!(m.rows_with_labels, BATCH - 1);
    assert!(
        m.precision[0] > 0.0,
        "rows built from a center find it first"
    );
    for j in 0..3 {
        let line = format!(
            "P@{0}: {1:.2}%  nDCG@{0}: {2:.2}%  recall@{0}: {3:.2}%",
            j + 1,
            100.0 * m.precision[j],
            100.0 * m.ndcg[j],
            100.0 * m.recall[j]
        );
        assert!(stdout.contains(&line), "{line} not in {stdout}");
    }
    assert!(
        stdout.contains("note: 1 row of 30 without a label (all negative: padding) score 0"),
        "{stdout}"
    );
    assert!(!stdout.contains("top-1 accuracy"), "{stdout}");
    // A label tensor of another shape is refused, naming both accepted shapes.
    let bad = dir.path().join("bad.safetensors");
    let tensors = [
        OutTensor::F32("embeddings", vec![BATCH, DIM], &x),
        OutTensor::I64("labels", vec![BATCH * width], &labels),
    ];
    write_atomic(&bad, &tensors, Default::default()).unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(["predict", "--quiet", "--embeddings"])
        .arg(&bad)
        .arg(&ckpt)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("[30] (one class per row) or [30, width]"),
        "{stderr}"
    );
}

/// `predict_top_k_all` on one rank and another call on the other is refused on both by name,
/// and the group stays whole (its chunk counts went through an agreement of its own; before,
/// a bare all-reduce paired with the other call's collectives and broke the group).
#[test]
fn predict_top_k_all_against_another_call_is_refused_by_name() {
    for other in ["forward_backward", "predict_top_k"] {
        let results = ThreadGroup::run(2, |comm| {
            let rank = comm.rank();
            let mut layer = PartialFc::new(config(2, CLASSES), CpuBackend, comm).unwrap();
            let x = embeddings(&layer.weight().unwrap(), 3);
            let labels = vec![1i64, 2, 3];
            let refused = if rank == 0 {
                layer.predict_top_k_all(&x, 2).map(|_| ())
            } else if other == "forward_backward" {
                layer.forward_backward(&x, &labels).map(|_| ())
            } else {
                layer.predict_top_k(&x, 2).map(|_| ())
            };
            // The group still works: the same call on both ranks now succeeds.
            let after = layer.forward_backward(&x, &labels).map(|_| ());
            (refused, after)
        });
        for (rank, (refused, after)) in results.into_iter().enumerate() {
            let e = refused.unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, PfcError::Collective(_)),
                "{other}, rank {rank}: {msg}"
            );
            assert!(
                msg.contains("called predict_top_k_all")
                    && (msg.contains(&format!("called {other} while"))
                        || msg.contains(&format!("called {other}:"))),
                "{other}, rank {rank}: {msg}"
            );
            after.unwrap_or_else(|e| panic!("{other}, rank {rank}: the group broke: {e}"));
        }
    }
}

/// A partial row on one rank and nothing on the others: every rank refuses together (a review
/// found the ragged rank falling back to predict_top_k alone while its peers returned, leaving
/// its agreement to pair with their next call).
#[test]
fn predict_top_k_all_with_a_partial_row_is_refused_on_every_rank() {
    let results = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(2, CLASSES), CpuBackend, comm).unwrap();
        let x = if rank == 0 {
            vec![0.5f32; DIM / 2]
        } else {
            Vec::new()
        };
        let refused = layer.predict_top_k_all(&x, 2).map(|p| p.rows());
        let after = layer.predict_top_k_all(&[], 2).map(|p| p.rows());
        (refused, after)
    });
    for (rank, (refused, after)) in results.into_iter().enumerate() {
        let e = refused.unwrap_err();
        assert!(
            matches!(e, PfcError::Shape(_) | PfcError::Collective(_)),
            "rank {rank}: {e}"
        );
        assert_eq!(after.unwrap(), 0, "rank {rank}: the group broke");
    }
}

/// A row of zeros (an empty document's embedding) has no direction: its prediction is empty
/// (classes −1, scores −∞), the other rows' are what they would be without it, and the
/// metrics count it as a miss, instead of the whole evaluation failing (an XMC user trial).
/// The layer over ranks and the checkpoint files agree.
#[test]
fn a_zero_row_gets_an_empty_prediction_and_counts_as_a_miss() {
    let weight = whole_weight(CLASSES);
    let x = embeddings(&weight, BATCH);
    let mut zeroed = x.clone();
    zeroed[7 * DIM..8 * DIM].fill(0.0);
    zeroed[7 * DIM] = -0.0;
    let rows = [10, 10, 10];
    let got = predict(3, CLASSES, &zeroed, 4, &rows);
    let want = predict(3, CLASSES, &x, 4, &rows);
    for r in 0..BATCH {
        if r == 7 {
            assert_eq!(got.row(r), &[-1; 4]);
            assert!(got.scores[r * 4..(r + 1) * 4]
                .iter()
                .all(|&s| s == f32::NEG_INFINITY));
        } else {
            assert_eq!(got.row(r), want.row(r), "row {r}");
        }
    }
    let truth: Vec<i64> = (0..BATCH).map(|r| want.row(r)[0]).collect();
    let accuracy = got.top_accuracy(&truth).unwrap();
    assert!((accuracy[0] - (BATCH - 1) as f64 / BATCH as f64).abs() < 1e-12);
    let sets: Vec<[i64; 1]> = truth.iter().map(|&c| [c]).collect();
    let metrics = got.ranking_metrics(&sets).unwrap();
    assert!((metrics.precision[0] - accuracy[0]).abs() < 1e-12);
    // The same from the checkpoint files, and over predict_top_k_all's chunks.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.safetensors");
    let mut one = PartialFc::new(config(1, CLASSES), CpuBackend, SingleRank).unwrap();
    one.save(&path).unwrap();
    let set = partial_fc::checkpoint::CheckpointSet::open(&[&path]).unwrap();
    let from_files = set.predict_top_k(&zeroed, 4, &|_| {}).unwrap();
    assert_eq!(from_files.classes, got.classes);
    let chunked = one.predict_top_k_all(&zeroed, 4).unwrap();
    assert_eq!(chunked.classes, got.classes);
    // Training still refuses a zero row: it has no gradient direction.
    let labels = vec![1i64; 10];
    assert!(matches!(
        one.forward_backward(&zeroed[..10 * DIM], &labels),
        Err(PfcError::ZeroRow { row: 7 })
    ));
}

/// `pfc predict --train-labels FILE` prints PSP@j and PSnDCG@j with propensities from the
/// training labels' counts: the same as the library's from those counts; a row of zeros is
/// reported as an empty prediction; bad `--propensity` and missing test labels are refused.
#[test]
fn pfc_predict_prints_propensity_scored_metrics() {
    use partial_fc::layer::inverse_propensities;
    use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("rank0.safetensors");
    let layer = PartialFc::new(config(1, CLASSES), CpuBackend, SingleRank).unwrap();
    layer.save(&ckpt).unwrap();
    let mut x = embeddings(&layer.weight().unwrap(), BATCH);
    x[..DIM].fill(0.0); // an empty document
    let width = 3;
    let labels: Vec<i64> = (0..BATCH)
        .flat_map(|r| {
            let own = ((r * 131 + 7) % CLASSES as usize) as i64;
            // Its own class, a frequent one, and one beyond the classifier.
            [own, 5, if r % 4 == 0 { CLASSES as i64 + 9 } else { -1 }]
        })
        .collect();
    let input = dir.path().join("x.safetensors");
    write_atomic(
        &input,
        &[
            OutTensor::F32("embeddings", vec![BATCH, DIM], &x),
            OutTensor::I64("labels", vec![BATCH, width], &labels),
        ],
        Default::default(),
    )
    .unwrap();
    // Training labels: class 5 in every row (a repeat too), class r mod C in row r, padding.
    let train_rows = 200usize;
    let train: Vec<i64> = (0..train_rows)
        .flat_map(|r| [5, (r % CLASSES as usize) as i64, 5, -1])
        .collect();
    let train_path = dir.path().join("train.safetensors");
    write_atomic(
        &train_path,
        &[OutTensor::I64("labels", vec![train_rows, 4], &train)],
        Default::default(),
    )
    .unwrap();
    let out = dir.path().join("top.safetensors");
    let pfc = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
            .args(["predict", "--k", "3", "--quiet", "--force", "--embeddings"])
            .arg(&input)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .arg(&ckpt)
            .output()
            .unwrap()
    };
    let train_arg = train_path.to_str().unwrap();
    let done = pfc(&["--train-labels", train_arg, "--propensity", "0.6,2.6"]);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        stdout.contains("note: 1 row of zeros has no direction: no prediction, counted as a miss"),
        "{stdout}"
    );
    // The library's numbers from the same counts (the class beyond the classifier: count 0).
    let mut counts = vec![0u64; CLASSES as usize + 1];
    for row in train.chunks(4) {
        let mut set: Vec<i64> = row.iter().copied().filter(|&c| c >= 0).collect();
        set.sort_unstable();
        set.dedup();
        for c in set {
            counts[c as usize] += 1;
        }
    }
    let inv = inverse_propensities(&counts, train_rows as u64, 0.6, 2.6).unwrap();
    let remapped: Vec<i64> = labels
        .iter()
        .map(|&c| {
            if c >= CLASSES as i64 {
                CLASSES as i64
            } else {
                c
            }
        })
        .collect();
    let file = TensorFile::read(&out).unwrap();
    let (classes, _) = file.i64("classes").unwrap().unwrap();
    let p = Prediction {
        k: 3,
        scores: vec![0.0; classes.len()],
        classes,
    };
    assert_eq!(p.row(0), &[-1, -1, -1], "the zero row");
    let m = p
        .propensity_scored_metrics(remapped.chunks(width), &inv)
        .unwrap();
    assert!(m.psp[0] > 0.0 && m.psp[0] < 1.0, "{m:?}");
    for j in 0..3 {
        let line = format!(
            "PSP@{0}: {1:.2}%  PSnDCG@{0}: {2:.2}%",
            j + 1,
            100.0 * m.psp[j],
            100.0 * m.psndcg[j]
        );
        assert!(stdout.contains(&line), "{line} not in {stdout}");
    }
    assert!(
        stdout.contains("propensities from 200 training rows"),
        "{stdout}"
    );
    // Refusals: a malformed --propensity, and --train-labels without test labels.
    let bad = pfc(&["--train-labels", train_arg, "--propensity", "0.6"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("A,B expected"));
    // Parameters that give no finite propensity are refused before the scoring, by name, and
    // nothing is written.
    std::fs::remove_file(&out).unwrap();
    let wild = pfc(&["--train-labels", train_arg, "--propensity", "1e308,1e308"]);
    let stderr = String::from_utf8_lossy(&wild.stderr);
    assert_eq!(wild.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--propensity"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&wild.stdout).is_empty(),
        "no scoring printed"
    );
    assert!(!out.exists());
    // The output never replaces an input, --force or not: the training labels neither.
    let before = std::fs::read(&train_path).unwrap();
    let onto_train = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(["predict", "--quiet", "--force", "--embeddings"])
        .arg(&input)
        .arg("--train-labels")
        .arg(&train_path)
        .arg("--out")
        .arg(&train_path)
        .arg(&ckpt)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&onto_train.stderr);
    assert_eq!(onto_train.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is one of the input files"), "{stderr}");
    assert_eq!(std::fs::read(&train_path).unwrap(), before);
    let unlabelled = dir.path().join("u.safetensors");
    write_atomic(
        &unlabelled,
        &[OutTensor::F32("embeddings", vec![BATCH, DIM], &x)],
        Default::default(),
    )
    .unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args([
            "predict",
            "--quiet",
            "--train-labels",
            train_arg,
            "--embeddings",
        ])
        .arg(&unlabelled)
        .arg(&ckpt)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("has no labels to score"), "{stderr}");
}

/// Every row zero, one rank's rows all zero, and a row a 16-bit wire rounds to zeros: all get
/// empty predictions (the last reaches the layer as zeros, as an exact zero row does), from the
/// layer and from the checkpoint files; the other rank's rows are predicted as usual.
#[test]
fn rows_that_arrive_as_zeros_get_empty_predictions_everywhere() {
    let d = 8;
    let mut cfg = LayerConfig::new(20, d, 4);
    cfg.wire = partial_fc::plan::Dtype::F16;
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let zeros = vec![0.0f32; 4 * d];
    let p = layer.predict_top_k(&zeros, 20).unwrap();
    assert!(p.classes.iter().all(|&c| c == -1));
    assert!((0..4).all(|r| p.is_empty_row(r)));
    let p = layer.predict_top_k_all(&vec![0.0f32; 9 * d], 3).unwrap();
    assert_eq!(p.classes.len(), 27);
    assert!(p.classes.iter().all(|&c| c == -1));
    let m = p.ranking_metrics(vec![vec![1i64, 2]; 9]).unwrap();
    assert_eq!(m.precision, vec![0.0; 3]);
    // 1e-30 is zero in f16: the row reaches the layer as zeros.
    let mut tiny: Vec<f32> = (0..4 * d).map(|i| 1.0 + i as f32).collect();
    tiny[..d].fill(1e-30);
    let p = layer.predict_top_k(&tiny, 2).unwrap();
    assert!(p.is_empty_row(0) && !p.is_empty_row(1), "{:?}", p.classes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    layer.save(&path).unwrap();
    let set = partial_fc::checkpoint::CheckpointSet::open(&[&path]).unwrap();
    let p = set.predict_top_k(&zeros, 5, &|_| {}).unwrap();
    assert!(p.classes.iter().all(|&c| c == -1));
    assert!(p.scores.iter().all(|&s| s == f32::NEG_INFINITY));
    // From the files the rows stay f32: 1e-30 has a direction there.
    let p = set.predict_top_k(&tiny, 2, &|_| {}).unwrap();
    assert!(!p.is_empty_row(0));
    let got = ThreadGroup::run(2, move |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(LayerConfig::new(20, d, 4), CpuBackend, comm).unwrap();
        let x: Vec<f32> = if rank == 0 {
            vec![0.0; 3 * d]
        } else {
            (0..3 * d).map(|i| i as f32 + 1.0).collect()
        };
        layer.predict_top_k(&x, 4).unwrap()
    });
    assert!(got[0].classes.iter().all(|&c| c == -1));
    assert!(got[1].classes.iter().all(|&c| c >= 0));
}
