//! Regression tests for the problems a code review found: each asserts the typed error (or the
//! behaviour) that replaced a panic, a hang or silently wrong state.

use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::golden::StepCase;
use partial_fc::rendezvous::UniqueId;
use partial_fc::{Backend, Collective, CpuBackend, LayerConfig, PartialFc, PfcError};
use std::time::{Duration, Instant};

mod common;

use common::hooked::{Hook, Hooked, Op};

fn layer(classes: u64, dim: usize, batch: usize) -> PartialFc<CpuBackend, SingleRank> {
    let mut cfg = LayerConfig::new(classes, dim, batch);
    cfg.sample_rate = 1.0;
    PartialFc::new(cfg, CpuBackend, SingleRank).unwrap()
}

fn batch(dim: usize, rows: usize) -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(3, 0, rows, dim, 1.0);
    (x, (0..rows as i64).collect())
}

#[test]
fn an_empty_batch_everywhere_is_an_error_not_nan_weights() {
    let mut l = layer(100, 8, 4);
    let before = l.weight().unwrap();
    let err = l.forward_backward(&[], &[]).unwrap_err();
    assert!(matches!(err, PfcError::Shape(_)), "{err}");
    assert!(
        l.step(0.1).is_err(),
        "no gradient may be pending after the refusal"
    );
    assert_eq!(l.weight().unwrap(), before);
    let (x, y) = batch(8, 4);
    assert!(l.forward_backward(&x, &y).unwrap().loss.is_finite());
}

#[test]
fn a_rank_that_leaves_early_fails_its_peers_at_once() {
    let mut handles = ThreadGroup::with_timeout(2, Duration::from_secs(30));
    let second = handles.pop().unwrap();
    let first = handles.pop().unwrap();
    drop(second); // before anybody waits
    let t = Instant::now();
    let err = first.barrier().unwrap_err();
    assert!(matches!(err, PfcError::Collective(_)));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        t.elapsed()
    );
}

#[test]
fn an_unbounded_timeout_does_not_overflow() {
    let handles = ThreadGroup::with_timeout(1, Duration::MAX);
    handles[0].barrier().unwrap();
}

#[test]
fn a_non_ascii_nccl_id_is_an_error() {
    let text = format!("a\u{e9}{}", "a".repeat(253));
    assert_eq!(text.len(), 256);
    assert!(matches!(
        UniqueId::from_hex(&text),
        Err(PfcError::Param { .. })
    ));
}

#[test]
fn a_step_case_whose_fields_disagree_is_an_error() {
    let (x, y) = batch(8, 4);
    let mut case = StepCase {
        embeddings: x,
        labels: y,
        weight: vec![0.5; 5],
        dim: 8,
        num_classes: 10,
        sampled_index: None,
        sample_rate: 1.0,
        margin: partial_fc::Margin::arcface(),
        seed: 1,
    };
    assert!(matches!(case.run_threads(2), Err(PfcError::Shape(_))));
    case.weight = vec![0.5; 80];
    case.embeddings.truncate(7);
    assert!(matches!(case.run_threads(1), Err(PfcError::Shape(_))));
}

#[test]
fn buffers_too_large_for_memory_arithmetic_are_refused() {
    let cfg = LayerConfig::new((1 << 31) - 1, 1 << 34, 1);
    assert!(matches!(
        PartialFc::zeroed(cfg, CpuBackend, SingleRank),
        Err(PfcError::Param { .. })
    ));
}

#[test]
fn loading_a_checkpoint_drops_the_pending_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shard.safetensors");
    let mut l = layer(100, 8, 4);
    l.save(&path).unwrap();
    let (x, y) = batch(8, 4);
    l.forward_backward(&x, &y).unwrap();
    l.load(&path).unwrap();
    assert!(
        l.step(0.1).is_err(),
        "the old batch's gradient must not move the loaded weights"
    );
}

#[test]
fn concurrent_saves_beside_each_other_do_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<_> = (0..4).map(|i| layer(100 + i, 8, 4)).collect();
    std::thread::scope(|s| {
        for (i, l) in layers.iter().enumerate() {
            let path = dir.path().join(format!("ckpt.rank{i}"));
            s.spawn(move || {
                for _ in 0..20 {
                    l.save(&path).unwrap();
                }
            });
        }
    });
    for (i, l) in layers.iter().enumerate() {
        let mut fresh = PartialFc::zeroed(l.config().clone(), CpuBackend, SingleRank).unwrap();
        fresh
            .load(&dir.path().join(format!("ckpt.rank{i}")))
            .unwrap();
        assert_eq!(fresh.weight().unwrap(), l.weight().unwrap());
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn the_cpu_backend_refuses_oversized_requests() {
    let b = CpuBackend;
    assert!(matches!(
        b.download(&vec![1.0f32; 2], 5),
        Err(PfcError::Shape(_))
    ));
    assert!(matches!(
        b.zero(&mut vec![1.0f32; 2], 5),
        Err(PfcError::Shape(_))
    ));
    assert!(matches!(
        b.copy(&vec![1.0f32; 2], &mut vec![0.0f32; 9], 5),
        Err(PfcError::Shape(_))
    ));
}

#[test]
fn the_last_sample_and_gradient_stay_readable_after_step() {
    let mut l = layer(100, 8, 4);
    let (x, y) = batch(8, 4);
    l.forward_backward(&x, &y).unwrap();
    let sample = l.sampled_classes().unwrap();
    let grad = l.weight_grad_dense().unwrap();
    l.step(0.1).unwrap();
    assert_eq!(l.sampled_classes().unwrap(), sample);
    assert_eq!(l.weight_grad_dense().unwrap(), grad);
    assert!(grad.iter().any(|&g| g != 0.0));
    l.set_weight(&vec![0.1; 800]).unwrap();
    assert!(
        l.sampled_classes().unwrap().is_empty(),
        "a gradient of replaced weights is gone"
    );
}

#[test]
fn a_given_sample_with_classes_out_of_range_is_an_error() {
    let mut cfg = LayerConfig::new(100, 8, 4);
    cfg.sample_rate = 0.1;
    let mut l = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let (x, y) = batch(8, 4);
    let err = l
        .forward_backward_with_sample(&x, &y, &[-7, 0, 1, 2, 3, 500])
        .unwrap_err();
    assert!(matches!(err, PfcError::Shape(_)), "{err}");
    assert!(l
        .forward_backward_with_sample(&x, &y, &[0, 1, 2, 3])
        .is_ok());
}

#[test]
fn rendezvous_refuses_an_impossible_rank() {
    use partial_fc::rendezvous::Rendezvous;
    let dir = tempfile::tempdir().unwrap();
    let rv = Rendezvous::File {
        path: dir.path().join("id"),
        timeout: Duration::from_millis(10),
    };
    assert!(matches!(
        rv.exchange(0, 0, || Ok(UniqueId([0; 128]))),
        Err(PfcError::Param { .. })
    ));
    assert!(matches!(
        rv.exchange(3, 2, || Ok(UniqueId([0; 128]))),
        Err(PfcError::Param { .. })
    ));
}

/// The CPU sampler at full rate needs no keys: a short `keys` buffer used to panic on a slice
/// before the full-rate return (the backend checks `keys` only below full rate).
#[test]
fn full_rate_sampling_needs_no_keys() {
    let args = partial_fc::SampleArgs {
        shard_len: 10,
        shard_start: 0,
        num_sample: 10,
        rows: 2,
        seed: 1,
        step: 0,
        hard_fraction: 0.0,
    };
    let (mut labels, mut keys, mut sampled) = (vec![1i32, 3], Vec::new(), vec![0i32; 10]);
    let s = CpuBackend
        .sample_classes(&args, &mut labels, None, &mut keys, &mut sampled)
        .unwrap();
    assert_eq!(s, 10);
    assert_eq!(sampled, (0..10).collect::<Vec<i32>>());
    assert_eq!(labels, [1, 3]);
}

/// Local ids are i32: a shard of more than i32::MAX classes used to truncate a label's local id
/// to a negative number other than −1 (read later as "another rank's class").
#[test]
fn localize_labels_refuses_a_shard_beyond_i32() {
    let global = vec![3_000_000_000i64];
    let mut local = vec![0i32];
    let err = CpuBackend
        .localize_labels(&global, 1, 0, 4_000_000_000, &mut local)
        .unwrap_err();
    assert!(matches!(err, PfcError::Shape(_)), "{err}");
}

/// Fails its all-gathers on demand, and records whether the layer aborted the group; it may
/// claim another rank and world than its one-rank inner collective.
struct FlakyGather {
    fail: std::sync::atomic::AtomicBool,
    aborted: std::sync::atomic::AtomicBool,
    rank: usize,
    world: usize,
}

impl FlakyGather {
    fn new(rank: usize, world: usize) -> Hooked<SingleRank, Self> {
        let hook = FlakyGather {
            fail: false.into(),
            aborted: false.into(),
            rank,
            world,
        };
        Hooked::new(SingleRank, hook)
    }
}

impl Hook<SingleRank> for FlakyGather {
    fn before(&self, op: &Op<'_>, _: &SingleRank) -> partial_fc::Result<()> {
        match op {
            Op::AllGather if self.fail.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(PfcError::Collective("injected all-gather failure".into()))
            }
            _ => Ok(()),
        }
    }
    fn aborted(&self, _reason: &str) {
        self.aborted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    fn rank(&self, _: &SingleRank) -> usize {
        self.rank
    }
    fn world_size(&self, _: &SingleRank) -> usize {
        self.world
    }
}

/// A one-rank layer whose all-gathers fail on demand.
type FlakyLayer = PartialFc<CpuBackend, Hooked<SingleRank, FlakyGather>>;

/// A one-rank layer over [`FlakyGather`] after one good pass, its next all-gathers set to fail,
/// and the batch of that pass.
fn layer_with_a_pending_gradient_and_a_failing_gather() -> (FlakyLayer, Vec<f32>, Vec<i64>) {
    let mut cfg = LayerConfig::new(100, 8, 4);
    cfg.sample_rate = 1.0;
    let mut l = PartialFc::new(cfg, CpuBackend, FlakyGather::new(0, 1)).unwrap();
    let (x, y) = batch(8, 4);
    l.forward_backward(&x, &y).unwrap();
    l.collective()
        .hook
        .fail
        .store(true, std::sync::atomic::Ordering::Relaxed);
    (l, x, y)
}

/// A pass that fails in the all-gather used to leave the previous pass's gradient pending, and
/// `step` then applied it; the failure after the agreement now also breaks the group.
#[test]
fn a_pass_that_fails_in_the_all_gather_leaves_no_gradient_and_aborts_the_group() {
    use std::sync::atomic::Ordering::Relaxed;
    let (mut l, x, y) = layer_with_a_pending_gradient_and_a_failing_gather();
    assert!(l.forward_backward(&x, &y).is_err());
    assert!(
        l.collective().hook.aborted.load(Relaxed),
        "the group was not aborted"
    );
    let before = l.weight().unwrap();
    let err = l.step(0.1).unwrap_err();
    assert!(err.to_string().contains("forward_backward"), "{err}");
    assert_eq!(l.weight().unwrap(), before);
}

/// Refusals every rank agrees on do not break the group.
#[test]
fn an_agreed_refusal_does_not_abort_the_group() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut cfg = LayerConfig::new(100, 8, 4);
    cfg.sample_rate = 1.0;
    let mut l = PartialFc::new(cfg, CpuBackend, FlakyGather::new(0, 1)).unwrap();
    let (x, _) = batch(8, 4);
    assert!(
        l.forward_backward(&x, &[0, 1, 2, 1000]).is_err(),
        "label out of range"
    );
    assert!(
        l.forward_backward(&[], &[]).is_err(),
        "empty batch everywhere"
    );
    let (x2, y2) = batch(8, 2);
    assert!(
        l.forward_backward_with_sample(&x2, &y2, &[0, 5]).is_err(),
        "the sample misses class 1"
    );
    assert!(!l.collective().hook.aborted.load(Relaxed));
}

#[test]
fn a_collective_whose_rank_is_outside_its_world_is_refused() {
    let r = PartialFc::new(
        LayerConfig::new(100, 8, 4),
        CpuBackend,
        FlakyGather::new(3, 2),
    );
    assert!(
        matches!(r, Err(PfcError::Param { name: "rank", .. })),
        "{:?}",
        r.err()
    );
}

#[test]
fn configurations_at_the_integer_limits_are_refused_not_overflowed() {
    // 2^40 one-class shards: valid, and the shard bound 2^31·k no longer overflows u64 (a panic
    // with overflow checks, a wrapped bound without)
    let huge_world = 1usize << 40;
    LayerConfig::new(1 << 40, 1, 1)
        .validate(huge_world)
        .unwrap();
    let r = LayerConfig::new(100, 8, (1 << 24) + 1).validate(1);
    assert!(
        matches!(
            r,
            Err(PfcError::Param {
                name: "batch_per_rank",
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn a_step_counter_load_would_refuse_is_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.safetensors");
    let mut l = layer(100, 8, 4);
    l.set_steps(u64::MAX);
    assert!(matches!(l.save(&path), Err(PfcError::Checkpoint { .. })));
    assert!(!path.exists());
}

/// The same with a given sample, whose second agreement comes after the all-gather: a gather
/// that fails before it must drop the pending gradient too.
#[test]
fn a_given_sample_pass_that_fails_in_the_all_gather_leaves_no_gradient() {
    use std::sync::atomic::Ordering::Relaxed;
    let (mut l, x, y) = layer_with_a_pending_gradient_and_a_failing_gather();
    let sample: Vec<i64> = (0..100).collect();
    assert!(l.forward_backward_with_sample(&x, &y, &sample).is_err());
    assert!(l.collective().hook.aborted.load(Relaxed));
    assert!(
        l.step(0.1).is_err(),
        "the earlier pass's gradient must not be applied"
    );
}

/// A prediction that fails after the agreement breaks the group as a training pass does, and
/// leaves the pending gradient (prediction does not touch it).
#[test]
fn a_prediction_that_fails_in_the_all_gather_aborts_and_keeps_the_gradient() {
    use std::sync::atomic::Ordering::Relaxed;
    let (mut l, x, _) = layer_with_a_pending_gradient_and_a_failing_gather();
    assert!(l.predict_top_k(&x, 3).is_err());
    assert!(l.collective().hook.aborted.load(Relaxed));
    l.step(0.1).unwrap();
}

/// From a panic hunt: `predict_top_k_all` sized its result by `k` before any check (a huge `k`
/// aborted the process on the allocation), and with no rows on any rank took any `k`.
#[test]
fn predict_top_k_all_checks_k_first() {
    let mut l = layer(100, 4, 4);
    let x = vec![0.5f32; 8 * 4];
    for k in [0, 101, 257, 1 << 40, usize::MAX] {
        for rows in [&x[..], &[][..]] {
            match l.predict_top_k_all(rows, k) {
                Err(PfcError::Param { name, .. }) => assert_eq!(name, "k"),
                other => panic!("k = {k}, {} values: {other:?}", rows.len()),
            }
        }
    }
    assert_eq!(l.predict_top_k_all(&x, 3).unwrap().rows(), 8);
}

/// From a panic hunt: a `Prediction` built by hand with a huge or zero `k`, or classes that are
/// not rows × k, made `top_accuracy` panic (capacity overflow) or answer for a made-up row
/// count; a -1 label hit a -1 slot.
#[test]
fn malformed_predictions_are_refused_by_the_metrics() {
    use partial_fc::Prediction;
    let bad = [
        Prediction {
            k: usize::MAX,
            classes: vec![],
            scores: vec![],
        },
        Prediction {
            k: 0,
            classes: vec![],
            scores: vec![],
        },
        Prediction {
            k: 2,
            classes: vec![1, 2, 3],
            scores: vec![],
        },
        Prediction {
            k: 1,
            classes: vec![1, 2],
            scores: vec![0.5],
        },
    ];
    for p in &bad {
        let labels = vec![1i64; p.rows()];
        assert!(
            matches!(p.top_accuracy(&labels), Err(PfcError::Shape(_))),
            "{p:?}"
        );
        let sets: Vec<[i64; 1]> = labels.iter().map(|&l| [l]).collect();
        assert!(
            matches!(p.ranking_metrics(&sets), Err(PfcError::Shape(_))),
            "{p:?}"
        );
    }
    let padded = Prediction {
        k: 2,
        classes: vec![3, -1],
        scores: vec![],
    };
    assert_eq!(padded.top_accuracy(&[-1]).unwrap(), vec![0.0, 0.0]);
}

/// From a panic hunt: a directory given as a checkpoint was "not a valid safetensors file
/// (shorter than its 8-byte header length)"; it is an I/O error saying what it is.
#[test]
fn a_directory_given_as_a_checkpoint_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let e = partial_fc::checkpoint::CheckpointSet::open(&[dir.path()])
        .err()
        .unwrap();
    assert!(matches!(e, PfcError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("is a directory"), "{e}");
    let mut l = layer(10, 4, 2);
    let e = l.load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
}

/// From a concurrency review: `HostStaged` checked a short receive buffer only when uploading
/// after the host collective, so that rank failed after its peers had succeeded and the group
/// stayed whole with the ranks out of step. The buffer is checked first, and the refusal breaks
/// the group for every rank (as `ThreadCollective` does).
#[test]
fn host_staged_refuses_a_short_receive_buffer_before_the_collective() {
    use partial_fc::collective::HostStaged;
    let results = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let staged = HostStaged::new(comm);
        let send = vec![1.0f32; 2];
        let mut recv = vec![0.0f32; if rank == 0 { 3 } else { 4 }];
        let gathered = staged.all_gather(&CpuBackend, &send, 2, &mut recv);
        let after = Collective::<CpuBackend>::barrier(&staged);
        (gathered, after)
    });
    let (own, _) = &results[0];
    let e = own.as_ref().unwrap_err().to_string();
    assert!(e.contains("receive buffer of 3 elements, 4 needed"), "{e}");
    for (rank, (_, after)) in results.iter().enumerate() {
        assert!(after.is_err(), "rank {rank}: the group stayed whole");
    }
}

/// A copy of checkpoint `src` at `dst` with `edit` applied to each of its f32 tensors (weight,
/// momentum), metadata kept: a file `save` would not write, as another tool might.
fn rewrite_checkpoint(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl Fn(&str, &mut [f32]),
) {
    use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
    let file = TensorFile::read(src).unwrap();
    let names = ["weight", "momentum"];
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|&name| {
            let shape = file.shape(name).unwrap().to_vec();
            let mut values = file.f32_block(name, 0, shape.iter().product()).unwrap();
            edit(name, &mut values);
            (name, shape, values)
        })
        .collect();
    let out: Vec<OutTensor<'_>> = tensors
        .iter()
        .map(|(n, s, v)| OutTensor::F32(n, s.clone(), v))
        .collect();
    write_atomic(dst, &out, file.metadata().clone()).unwrap();
}

/// A checkpoint review found `load` and `load_resharded` taking a class center whose sum of
/// squares overflows f32 (`set_weight` refuses it): the next pass returned a NaN loss and the
/// step spread NaN to every rank. Both now refuse the file, naming the class, and change nothing.
#[test]
fn a_checkpoint_center_whose_norm_overflows_is_refused_by_both_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
    let l = layer(20, 4, 4);
    l.save(&good).unwrap();
    rewrite_checkpoint(&good, &bad, |name, v| {
        if name == "weight" {
            v[5 * 4..6 * 4].fill(1e20); // row 5: each value finite, its sum of squares not
        }
    });
    let mut fresh = layer(20, 4, 4);
    let before = fresh.weight().unwrap();
    for err in [
        fresh.load(&bad).unwrap_err(),
        fresh.load_resharded(&[&bad]).unwrap_err(),
    ] {
        let text = err.to_string();
        assert!(matches!(err, PfcError::Checkpoint { .. }), "{text}");
        assert!(
            text.contains("class 5") && text.contains("sum of squares"),
            "{text}"
        );
    }
    assert_eq!(
        fresh.weight().unwrap(),
        before,
        "a refused load changed the layer"
    );
    fresh.load(&good).unwrap();
}

/// The same review: a layer whose momentum is kept in bf16 loaded a finite f32 momentum of
/// 3.4e38, which rounds to +inf in bf16, and the next step put inf into the weights.
/// `load`, `load_resharded` and `set_optimizer_state` now refuse values past bf16's range.
#[test]
fn bf16_state_refuses_values_that_would_round_to_infinity() {
    use partial_fc::{Optimizer, Sgd, StateDtype};
    let bf16_layer = || {
        let mut cfg = LayerConfig::new(20, 4, 4);
        cfg.optimizer = Some(Optimizer::Sgd(Sgd {
            state_dtype: StateDtype::Bf16,
            ..Sgd::default()
        }));
        PartialFc::new(cfg, CpuBackend, SingleRank).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
    bf16_layer().save(&good).unwrap();
    rewrite_checkpoint(&good, &bad, |name, v| {
        if name == "momentum" {
            v[9] = 3.4e38; // finite in f32, +inf in bf16
        }
    });
    let mut l = bf16_layer();
    for err in [
        l.load(&bad).unwrap_err(),
        l.load_resharded(&[&bad]).unwrap_err(),
    ] {
        let text = err.to_string();
        assert!(
            text.contains("bf16") && text.contains("row 2, column 1"),
            "{text}"
        );
    }
    let mut momentum = l.optimizer_state("momentum").unwrap();
    momentum[9] = 3.4e38;
    let err = l.set_optimizer_state("momentum", &momentum).unwrap_err();
    assert!(matches!(err, PfcError::Param { .. }), "{err}");
    // An f32 layer takes the same file: the value is in f32's range.
    layer(20, 4, 4).load(&bad).unwrap();
}

/// The checkpoint review: a file's own text (a tensor name with a newline, a dtype with an ANSI
/// escape, a megabyte-long format) reached stderr raw, so a file could forge a line of `pfc`'s
/// output. Errors now escape control characters and cut what they quote.
#[test]
fn errors_quote_a_files_text_escaped_and_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.safetensors");
    let long = "x".repeat(100_000);
    let header = format!(
        r#"{{"__metadata__":{{"format":"{long}"}},"a\npfc: wrote":{{"dtype":"F3\u001b[2J","shape":[1],"data_offsets":[0,4]}}}}"#
    );
    let err = header_error(&path, &header);
    assert!(!err.contains('\n') && !err.contains('\u{1b}'), "{err:?}");
    assert!(err.len() < 2_000, "{} bytes", err.len());
    // Invisible reordering characters (a right-to-left override) are shown as escapes too, and
    // data_offsets of three numbers say what is expected.
    let header = r#"{"x\u202e":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#;
    let err = header_error(&path, header);
    assert!(
        !err.contains('\u{202e}') && err.contains("\\u{202e}"),
        "{err:?}"
    );
    assert!(
        err.contains("holds 3 numbers, 2 (begin, end) expected"),
        "{err}"
    );
}

/// The checkpoint review: a header of one shape with millions of dimensions (98 MB) made a read
/// hold 3.5 GB while it parsed (a tree of JSON values), and millions of tiny metadata entries
/// were kept for the file's life. The header is now parsed field by field from its raw text,
/// a long shape and an oversized `__metadata__` refused before they are parsed.
#[test]
fn a_header_of_a_huge_shape_or_metadata_is_refused_before_parsing_it() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, header: String| header_error(&dir.path().join(name), &header);
    let ones = vec!["1"; 1_000_000].join(",");
    let err = write(
        "shape",
        format!(r#"{{"x":{{"dtype":"F32","shape":[{ones}],"data_offsets":[0,4]}}}}"#),
    );
    assert!(err.contains("shape of 2000001 bytes"), "{err}");
    let entries: Vec<String> = (0..1_500_000).map(|i| format!(r#""k{i}":"v""#)).collect();
    let err = write(
        "metadata",
        format!(
            r#"{{"__metadata__":{{{}}},"x":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#,
            entries.join(",")
        ),
    );
    assert!(
        err.contains("__metadata__ of") && err.contains("at most"),
        "{err}"
    );
}

/// The checkpoint review: `load` took files `CheckpointSet::open` refuses (both SGD's and
/// AdamW's state in one file), and `pfc step` files with `interclass_filter = "nan"` (the
/// filter silently off, where the flag refuses NaN) or a two-dimensional `sampled_index`.
#[test]
fn load_and_step_files_refuse_what_their_other_readers_refuse() {
    use partial_fc::golden::StepCase;
    use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
    let dir = tempfile::tempdir().unwrap();
    let (good, mixed) = (dir.path().join("good"), dir.path().join("mixed"));
    layer(20, 4, 4).save(&good).unwrap();
    let file = TensorFile::read(&good).unwrap();
    let w = file.f32_block("weight", 0, 80).unwrap();
    let zeros = vec![0.0f32; 80];
    let tensors = [
        OutTensor::F32("weight", vec![20, 4], &w),
        OutTensor::F32("momentum", vec![20, 4], &zeros),
        OutTensor::F32("exp_avg", vec![20, 4], &zeros),
    ];
    write_atomic(&mixed, &tensors, file.metadata().clone()).unwrap();
    let err = layer(20, 4, 4).load(&mixed).unwrap_err().to_string();
    assert!(err.contains("none of SGD's"), "{err}");

    let step = |name: &str, meta: &[(&str, &str)], index: Option<Vec<usize>>| {
        let path = dir.path().join(name);
        let (x, y, w) = (vec![0.5f32; 8], vec![0i64, 1], vec![0.25f32; 16]);
        let ids = vec![0i64, 1];
        let mut t = vec![
            OutTensor::F32("embeddings", vec![2, 4], &x),
            OutTensor::I64("labels", vec![2], &y),
            OutTensor::F32("weight", vec![4, 4], &w),
        ];
        if let Some(shape) = index {
            t.push(OutTensor::I64("sampled_index", shape, &ids));
        }
        let meta = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        write_atomic(&path, &t, meta).unwrap();
        StepCase::read(&path).map(|_| ())
    };
    step("plain", &[], Some(vec![2])).unwrap();
    let err = step("nan", &[("interclass_filter", "nan")], None).unwrap_err();
    assert!(err.to_string().contains("NaN is not a threshold"), "{err}");
    let err = step("flat", &[], Some(vec![1, 2])).unwrap_err();
    assert!(err.to_string().contains("sampled_index has shape"), "{err}");
}

/// Writes a safetensors file of `header` and 4 data bytes at `path`; the error reading it.
fn header_error(path: &std::path::Path, header: &str) -> String {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 4]);
    std::fs::write(path, bytes).unwrap();
    partial_fc::tensor_file::TensorFile::read(path)
        .err()
        .unwrap()
        .to_string()
}
