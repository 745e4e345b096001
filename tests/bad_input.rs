//! Bad input gets a typed error, matched here by variant: no panic, nothing written (weights,
//! momentum, step counter, the last gradient and sample all unchanged), and the layer still works
//! afterwards (a successful forward/backward and step right after). With several ranks, the rank
//! with the bad input gets its own error, its peers `PfcError::Collective`, nobody hangs, and the
//! group works on the next call.

mod common;

use common::hooked::{Hook, Hooked, Op};
use common::Rng;
use partial_fc::collective::{SingleRank, ThreadCollective, ThreadGroup};
use partial_fc::{
    Collective, CpuBackend, LayerConfig, Margin, NegativeSampler, PartialFc, PfcError,
};
use std::time::{Duration, Instant};

const CLASSES: u64 = 50;
const DIM: usize = 8;
const ROWS: usize = 4;

fn config() -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, ROWS);
    cfg.sample_rate = 0.5;
    cfg
}

fn good_batch(seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng::new(seed);
    let x = rng.normal_vec(ROWS * DIM, 1.0);
    let labels = (0..ROWS).map(|_| rng.below(CLASSES) as i64).collect();
    (x, labels)
}

/// Everything a failed call must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    weight: Vec<f32>,
    momentum: Option<Vec<f32>>,
    steps: u64,
    grad: Vec<f32>,
    sampled: Vec<i64>,
}

impl Snapshot {
    /// Names of the fields that differ (the vectors are too long to print).
    fn changed(&self, other: &Snapshot) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.weight != other.weight {
            out.push("weight");
        }
        if self.momentum != other.momentum {
            out.push("momentum");
        }
        if self.steps != other.steps {
            out.push("step counter");
        }
        if self.grad != other.grad {
            out.push("pending gradient");
        }
        if self.sampled != other.sampled {
            out.push("pending sample");
        }
        out
    }
}

fn snapshot<C: Collective<CpuBackend>>(layer: &PartialFc<CpuBackend, C>) -> Snapshot {
    Snapshot {
        weight: layer.weight().unwrap(),
        momentum: layer.momentum().unwrap(),
        steps: layer.steps(),
        grad: layer.weight_grad_dense().unwrap(),
        sampled: layer.sampled_classes().unwrap(),
    }
}

/// A single-rank layer that has taken one good step and one more forward/backward, so that a
/// gradient and a sample are pending and the momentum is non-zero.
fn trained_layer() -> PartialFc<CpuBackend, SingleRank> {
    let mut layer = PartialFc::new(config(), CpuBackend, SingleRank).unwrap();
    let (x, labels) = good_batch(1);
    layer.forward_backward(&x, &labels).unwrap();
    layer.step(0.1).unwrap();
    layer.forward_backward(&x, &labels).unwrap();
    layer
}

/// The layer still works: a forward/backward with a finite loss and a step that moves weights.
fn still_works<C: Collective<CpuBackend>>(layer: &mut PartialFc<CpuBackend, C>, seed: u64) {
    let (x, labels) = good_batch(seed);
    let out = layer.forward_backward(&x, &labels).unwrap();
    assert!(out.loss.is_finite() && out.grad_embeddings.iter().all(|g| g.is_finite()));
    let before = layer.weight().unwrap();
    layer.step(0.1).unwrap();
    assert_ne!(
        layer.weight().unwrap(),
        before,
        "the step after the error moves the weights"
    );
}

/// Runs a call that must fail, checks the error with `is_expected`, that nothing changed, and
/// that the layer works afterwards.
fn rejected(
    what: &str,
    call: impl FnOnce(&mut PartialFc<CpuBackend, SingleRank>) -> Result<(), PfcError>,
    is_expected: impl FnOnce(&PfcError) -> bool,
) {
    let mut layer = trained_layer();
    let before = snapshot(&layer);
    let err = call(&mut layer).expect_err(what);
    assert!(is_expected(&err), "{what}: unexpected error {err:?}");
    assert!(!err.to_string().is_empty());
    let changed = snapshot(&layer).changed(&before);
    assert!(
        changed.is_empty(),
        "{what}: the failed call changed {changed:?}"
    );
    still_works(&mut layer, 99);
}

fn fb(
    x: Vec<f32>,
    labels: Vec<i64>,
) -> impl FnOnce(&mut PartialFc<CpuBackend, SingleRank>) -> Result<(), PfcError> {
    move |layer| layer.forward_backward(&x, &labels).map(|_| ())
}

#[test]
fn label_at_or_above_num_classes() {
    let (x, mut labels) = good_batch(2);
    labels[2] = CLASSES as i64;
    rejected("label = C", fb(x.clone(), labels.clone()), |e| {
        matches!(
            e,
            PfcError::Label {
                row: 2,
                label: 50,
                num_classes: 50
            }
        )
    });
    labels[2] = i64::MAX;
    rejected("label = i64::MAX", fb(x, labels), |e| {
        matches!(
            e,
            PfcError::Label {
                row: 2,
                label: i64::MAX,
                ..
            }
        )
    });
}

#[test]
fn negative_label() {
    let (x, mut labels) = good_batch(3);
    labels[1] = -1;
    rejected("label = -1", fb(x.clone(), labels.clone()), |e| {
        matches!(
            e,
            PfcError::Label {
                row: 1,
                label: -1,
                ..
            }
        )
    });
    labels[1] = i64::MIN;
    rejected("label = i64::MIN", fb(x, labels), |e| {
        matches!(
            e,
            PfcError::Label {
                row: 1,
                label: i64::MIN,
                ..
            }
        )
    });
}

#[test]
fn non_finite_embeddings() {
    for (bad, name) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "+Inf"),
        (f32::NEG_INFINITY, "-Inf"),
    ] {
        let (mut x, labels) = good_batch(4);
        x[3 * DIM + 5] = bad;
        rejected(
            name,
            fb(x, labels),
            |e| matches!(e, PfcError::NonFinite { row: 3, value } if value.to_bits() == bad.to_bits()),
        );
    }
}

#[test]
fn all_zero_embedding_row() {
    let (mut x, labels) = good_batch(5);
    x[DIM..2 * DIM].fill(0.0);
    x[DIM] = -0.0;
    rejected("zero row", fb(x, labels), |e| {
        matches!(e, PfcError::ZeroRow { row: 1 })
    });
}

#[test]
fn mismatched_shapes_and_dims() {
    let (x, labels) = good_batch(6);
    rejected(
        "fewer labels than rows",
        fb(x.clone(), labels[..3].to_vec()),
        |e| matches!(e, PfcError::Shape(_)),
    );
    rejected(
        "embeddings not a multiple of dim",
        fb(x[..x.len() - 1].to_vec(), labels.clone()),
        |e| matches!(e, PfcError::Shape(_)),
    );
    let mut longer = x.clone();
    longer.extend_from_slice(&x[..DIM]);
    rejected(
        "more embeddings than labels",
        fb(longer, labels.clone()),
        |e| matches!(e, PfcError::Shape(_)),
    );
    // Embeddings of dimension 2·d read as twice the rows.
    rejected(
        "wrong dim",
        fb([x.clone(), x.clone()].concat(), labels.clone()),
        |e| matches!(e, PfcError::Shape(_)),
    );
    rejected(
        "set_weight of the wrong length",
        |l| l.set_weight(&[0.5; 7]),
        |e| matches!(e, PfcError::Shape(_)),
    );
}

#[test]
fn too_many_rows() {
    let mut rng = Rng::new(7);
    let x = rng.normal_vec((ROWS + 1) * DIM, 1.0);
    let labels = vec![1i64; ROWS + 1];
    rejected("N + 1 rows", fb(x, labels), |e| {
        matches!(e, PfcError::Shape(_))
    });
}

#[test]
fn bad_given_sample_on_one_rank() {
    let (x, labels) = good_batch(8);
    let mut sample: Vec<i64> = labels.clone();
    sample.sort_unstable();
    sample.dedup();
    let unsorted: Vec<i64> = sample.iter().rev().copied().collect();
    if unsorted.len() > 1 {
        rejected(
            "unsorted sample",
            {
                let (x, labels) = (x.clone(), labels.clone());
                move |l| {
                    l.forward_backward_with_sample(&x, &labels, &unsorted)
                        .map(|_| ())
                }
            },
            |e| matches!(e, PfcError::Shape(_)),
        );
    }
    let missing = sample[1..].to_vec();
    rejected(
        "sample without a positive",
        {
            let (x, labels) = (x.clone(), labels.clone());
            move |l| {
                l.forward_backward_with_sample(&x, &labels, &missing)
                    .map(|_| ())
            }
        },
        |e| matches!(e, PfcError::Shape(_)),
    );
    let too_big: Vec<i64> = (0..CLASSES as i64).collect();
    let mut small = config();
    small.sample_rate = 0.1;
    let mut layer = PartialFc::new(small, CpuBackend, SingleRank).unwrap();
    let err = layer
        .forward_backward_with_sample(&x, &labels, &too_big)
        .unwrap_err();
    assert!(matches!(err, PfcError::Shape(_)), "{err:?}");
    still_works(&mut layer, 9);
}

fn construct(cfg: LayerConfig) -> Result<(), PfcError> {
    PartialFc::new(cfg.clone(), CpuBackend, SingleRank).map(|_| ())?;
    unreachable!(
        "zeroed must fail too: {:?}",
        PartialFc::zeroed(cfg, CpuBackend, SingleRank).err()
    )
}

fn expect_param(cfg: LayerConfig, name: &str) {
    for result in [
        PartialFc::new(cfg.clone(), CpuBackend, SingleRank).map(|_| ()),
        PartialFc::zeroed(cfg.clone(), CpuBackend, SingleRank).map(|_| ()),
    ] {
        match result {
            Err(PfcError::Param { name: got, .. }) => assert_eq!(got, name, "{cfg:?}"),
            other => panic!("{name}: expected PfcError::Param, got {other:?} for {cfg:?}"),
        }
    }
}

#[test]
fn margin_parameters_outside_their_domain() {
    let with = |m: Margin| LayerConfig {
        margin: m,
        ..config()
    };
    let arc = Margin::arcface();
    // 1e39 and 1e-50 are finite and positive in f64 but +inf and 0 in the kernels' f32 (1e39
    // gave a NaN loss before a review caught it).
    for s in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e39, 1e-50] {
        expect_param(with(Margin { scale: s, ..arc }), "scale");
    }
    for m1 in [0.999, 0.0, -2.0, f64::NAN, 1e39] {
        expect_param(with(Margin { m1, ..arc }), "m1");
    }
    for m2 in [-0.01, std::f64::consts::FRAC_PI_2, 2.0, f64::NAN] {
        expect_param(with(Margin { m2, ..arc }), "m2");
    }
    for m3 in [-0.01, 1.0, 1.5, f64::NAN] {
        expect_param(with(Margin { m3, ..arc }), "m3");
    }
    // The edges that are inside the domain are accepted.
    for m in [
        Margin {
            m1: 1.0,
            m2: 0.0,
            m3: 0.0,
            ..arc
        },
        Margin {
            m2: std::f64::consts::FRAC_PI_2 - 1e-9,
            ..arc
        },
        Margin { m3: 0.999, ..arc },
    ] {
        PartialFc::new(with(m), CpuBackend, SingleRank).unwrap();
    }
}

#[test]
fn sample_rate_outside_zero_one() {
    for r in [-0.1, 1.0 + 1e-9, 2.0, f64::NAN, f64::INFINITY] {
        expect_param(
            LayerConfig {
                sample_rate: r,
                ..config()
            },
            "sample_rate",
        );
    }
    for r in [0.0, 1.0] {
        let mut layer = PartialFc::new(
            LayerConfig {
                sample_rate: r,
                ..config()
            },
            CpuBackend,
            SingleRank,
        )
        .unwrap();
        still_works(&mut layer, 10);
    }
    let hard = LayerConfig {
        sampler: NegativeSampler::Hard { fraction: 1.5 },
        ..config()
    };
    assert!(matches!(construct(hard), Err(PfcError::Param { .. })));
}

#[test]
fn step_before_forward_backward() {
    let mut layer = PartialFc::new(config(), CpuBackend, SingleRank).unwrap();
    let before = layer.weight().unwrap();
    assert!(matches!(layer.step(0.1), Err(PfcError::Order(_))));
    assert_eq!(layer.weight().unwrap(), before);
    still_works(&mut layer, 11);
    // One step per forward/backward: a second step has nothing to apply.
    let mut layer = trained_layer();
    layer.step(0.1).unwrap();
    let before = snapshot(&layer);
    assert!(matches!(layer.step(0.1), Err(PfcError::Order(_))));
    assert!(snapshot(&layer).changed(&before).is_empty());
    still_works(&mut layer, 12);
}

#[test]
fn step_with_a_non_finite_or_negative_learning_rate() {
    for lr in [f32::NAN, f32::INFINITY, -0.1] {
        rejected(
            &format!("lr = {lr}"),
            |l| l.step(lr),
            |e| matches!(e, PfcError::Param { name: "lr", .. }),
        );
    }
}

/// Per rank: the first call's result, its duration, whether it left the layer unchanged, and
/// the result of the good call after it.
type RankOutcome = (Result<(), PfcError>, Duration, bool, Result<(), PfcError>);

/// Runs one call per rank on a 3-rank thread group with a short timeout, then a good call on
/// each; returns per rank the first call's result, its duration, whether the layer was unchanged
/// by it, and the result of the good call.
fn three_ranks(
    timeout: Duration,
    first: impl Fn(usize, &mut PartialFc<CpuBackend, ThreadCollective>) -> Result<(), PfcError> + Sync,
) -> Vec<RankOutcome> {
    let handles = ThreadGroup::with_timeout(3, timeout);
    std::thread::scope(|scope| {
        let joins: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let first = &first;
                scope.spawn(move || {
                    let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
                    let before = snapshot(&layer);
                    let t = Instant::now();
                    let res = first(rank, &mut layer);
                    let took = t.elapsed();
                    let unchanged = res.is_ok() || snapshot(&layer).changed(&before).is_empty();
                    let (x, labels) = good_batch(100 + rank as u64);
                    let next = layer.forward_backward(&x, &labels).map(|_| ());
                    (res, took, unchanged, next)
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn assert_one_bad_rank(
    what: &str,
    timeout: Duration,
    results: &[RankOutcome],
    bad: usize,
    is_expected: impl Fn(&PfcError) -> bool,
) {
    // Every problem of every rank is listed, so that a failure says the whole story.
    let mut problems = Vec::new();
    for (rank, (res, took, unchanged, next)) in results.iter().enumerate() {
        match res {
            Err(e) if rank == bad && is_expected(e) => {}
            Err(PfcError::Collective(_)) if rank != bad => {}
            other => problems.push(format!("rank {rank} returned {other:?}")),
        }
        if !unchanged {
            problems.push(format!("rank {rank} was changed by the failed call"));
        }
        if *took >= timeout / 2 {
            problems.push(format!(
                "rank {rank} waited {took:?} (group timeout {timeout:?})"
            ));
        }
        if let Err(e) = next {
            problems.push(format!("rank {rank} failed the next call: {e:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{what} (bad rank {bad}):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn one_bad_rank_of_three() {
    let timeout = Duration::from_secs(20);
    type Spoil = fn(&mut Vec<f32>, &mut Vec<i64>);
    type Case = (&'static str, Spoil, fn(&PfcError) -> bool);
    let cases: [Case; 4] = [
        (
            "label",
            |_, l| l[0] = CLASSES as i64,
            |e| matches!(e, PfcError::Label { .. }),
        ),
        (
            "NaN",
            |x, _| x[3] = f32::NAN,
            |e| matches!(e, PfcError::NonFinite { .. }),
        ),
        (
            "zero row",
            |x, _| x[..DIM].fill(0.0),
            |e| matches!(e, PfcError::ZeroRow { row: 0 }),
        ),
        (
            "too many rows",
            |x, l| {
                x.extend_from_within(..DIM);
                l.push(0);
            },
            |e| matches!(e, PfcError::Shape(_)),
        ),
    ];
    for (what, spoil, is_expected) in cases {
        for bad in [0, 2] {
            let results = three_ranks(timeout, |rank, layer| {
                let (mut x, mut labels) = good_batch(rank as u64);
                if rank == bad {
                    spoil(&mut x, &mut labels);
                }
                layer.forward_backward(&x, &labels).map(|_| ())
            });
            assert_one_bad_rank(what, timeout, &results, bad, is_expected);
        }
    }
}

/// Every rank gets the same global sample; it misses the label of a row, whose class lives on
/// exactly one rank. That rank finds out only after the all-gather, so it must still agree with
/// its peers before returning, or they wait in the next collective until the group breaks.
#[test]
fn a_given_sample_missing_a_positive_on_one_of_three_ranks() {
    let timeout = Duration::from_secs(2);
    // Class 20 lives on rank 1 (shards of 50 over 3: [0, 17), [17, 34), [34, 50)); rank 0's
    // first row is of class 20. The sample holds every other label of the gathered batch.
    let batch = |rank: usize| {
        let (x, mut labels) = good_batch(rank as u64);
        if rank == 0 {
            labels[0] = 20;
        }
        (x, labels)
    };
    let mut sample: Vec<i64> = (0..3)
        .flat_map(|r| batch(r).1)
        .filter(|&c| c != 20)
        .collect();
    sample.sort_unstable();
    sample.dedup();
    let results = three_ranks(timeout, |rank, layer| {
        let (x, labels) = batch(rank);
        layer
            .forward_backward_with_sample(&x, &labels, &sample)
            .map(|_| ())
    });
    assert_one_bad_rank("sample misses class 20", timeout, &results, 1, |e| {
        matches!(e, PfcError::Shape(_))
    });
}

/// A checkpoint that does not belong to the layer, or a damaged file, is a typed error and the
/// layer keeps its weights, momentum and step counter; a matching checkpoint loads (control).
#[test]
fn checkpoints_of_another_layer_or_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    trained_layer().save(&good).unwrap();

    let load_into_trained =
        |what: &str, path: &std::path::Path, is_expected: fn(&PfcError) -> bool| {
            let path = path.to_path_buf();
            rejected(what, move |l| l.load(&path), is_expected);
        };

    // Another number of classes, hence another shard size.
    let other = dir.path().join("other-classes.safetensors");
    let cfg = LayerConfig {
        num_classes: CLASSES + 7,
        ..config()
    };
    PartialFc::new(cfg, CpuBackend, SingleRank)
        .unwrap()
        .save(&other)
        .unwrap();
    load_into_trained("another shard size", &other, |e| {
        matches!(e, PfcError::Checkpoint { .. })
    });

    // Another dimension.
    let other_dim = dir.path().join("other-dim.safetensors");
    let cfg = LayerConfig {
        dim: DIM + 1,
        ..config()
    };
    PartialFc::new(cfg, CpuBackend, SingleRank)
        .unwrap()
        .save(&other_dim)
        .unwrap();
    load_into_trained("another dim", &other_dim, |e| {
        matches!(e, PfcError::Checkpoint { .. })
    });

    // Rank 0 of a world of 2 (shard of 25) into a world of 1, and the reverse.
    let ranks: Vec<_> = (0..2)
        .map(|r| dir.path().join(format!("rank{r}.safetensors")))
        .collect();
    ThreadGroup::run(2, |comm| {
        let rank = Collective::<CpuBackend>::rank(&comm);
        let layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
        layer.save(&ranks[rank]).unwrap();
    });
    load_into_trained("another world size", &ranks[0], |e| {
        matches!(e, PfcError::Checkpoint { .. })
    });
    let results = ThreadGroup::run(2, |comm| {
        let rank = Collective::<CpuBackend>::rank(&comm);
        let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
        let before = snapshot(&layer);
        let err = layer.load(&good).err();
        let unchanged = snapshot(&layer).changed(&before).is_empty();
        // Control: its own file loads.
        (err, unchanged, layer.load(&ranks[rank]).is_ok())
    });
    for (rank, (err, unchanged, own_ok)) in results.into_iter().enumerate() {
        assert!(
            matches!(err, Some(PfcError::Checkpoint { .. })),
            "rank {rank}: {err:?}"
        );
        assert!(unchanged && own_ok, "rank {rank}");
    }

    // Truncated files: cut in the payload, in the header, and to nothing.
    let bytes = std::fs::read(&good).unwrap();
    for (name, len) in [("payload", bytes.len() - 5), ("header", 20), ("empty", 0)] {
        let path = dir.path().join(format!("truncated-{name}.safetensors"));
        std::fs::write(&path, &bytes[..len]).unwrap();
        load_into_trained(&format!("truncated {name}"), &path, |e| {
            matches!(e, PfcError::Format { .. } | PfcError::Checkpoint { .. })
        });
    }

    // Corrupt files: garbage header, a header length past the end, random bytes.
    let mut garbage_header = bytes.clone();
    garbage_header[8..40].fill(b'#');
    let mut huge_len = bytes.clone();
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut rng = Rng::new(77);
    let noise: Vec<u8> = (0..bytes.len()).map(|_| rng.next_u64() as u8).collect();
    for (name, content) in [
        ("header", garbage_header),
        ("length", huge_len),
        ("noise", noise),
    ] {
        let path = dir.path().join(format!("corrupt-{name}.safetensors"));
        std::fs::write(&path, content).unwrap();
        load_into_trained(&format!("corrupt {name}"), &path, |e| {
            matches!(e, PfcError::Format { .. } | PfcError::Checkpoint { .. })
        });
    }

    // A missing file is an I/O error with its path.
    load_into_trained("missing file", &dir.path().join("nope.safetensors"), |e| {
        matches!(e, PfcError::Io { .. })
    });

    // Control: the good checkpoint loads into a fresh layer and restores everything.
    let saved = snapshot(&trained_layer());
    let mut fresh = PartialFc::zeroed(config(), CpuBackend, SingleRank).unwrap();
    fresh.load(&good).unwrap();
    let restored = snapshot(&fresh);
    assert_eq!(
        (restored.weight, restored.momentum, restored.steps),
        (saved.weight, saved.momentum, saved.steps)
    );
}

/// [`rejected`] for a layer of another configuration (trained as [`trained_layer`]).
fn rejected_with(
    cfg: LayerConfig,
    what: &str,
    call: impl FnOnce(&mut PartialFc<CpuBackend, SingleRank>) -> Result<(), PfcError>,
    is_expected: impl FnOnce(&PfcError) -> bool,
) {
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let (x, labels) = good_batch(1);
    layer.forward_backward(&x, &labels).unwrap();
    layer.step(0.1).unwrap();
    layer.forward_backward(&x, &labels).unwrap();
    let before = snapshot(&layer);
    let err = call(&mut layer).expect_err(what);
    assert!(is_expected(&err), "{what}: unexpected error {err:?}");
    let changed = snapshot(&layer).changed(&before);
    assert!(
        changed.is_empty(),
        "{what}: the failed call changed {changed:?}"
    );
    still_works(&mut layer, 99);
}

#[test]
fn finite_rows_the_wire_or_the_norm_cannot_carry() {
    let f16_wire = LayerConfig {
        wire: partial_fc::plan::Dtype::F16,
        ..config()
    };
    // 1e5 is finite in f32 and infinite in f16 (largest finite: 65504).
    let (mut x, labels) = good_batch(6);
    x[2 * DIM + 1] = 1e5;
    rejected_with(
        f16_wire.clone(),
        "1e5 on an f16 wire",
        fb(x, labels),
        |e| matches!(e, PfcError::OutOfRange { row: 2, value, .. } if *value == 1e5),
    );
    // A row of 1e-9: every value rounds to zero in f16.
    let (mut x, labels) = good_batch(6);
    x[..DIM].fill(1e-9);
    rejected_with(
        f16_wire.clone(),
        "1e-9 on an f16 wire",
        fb(x, labels),
        |e| matches!(e, PfcError::OutOfRange { row: 0, .. }),
    );
    // Both are fine on bf16 and f32 wires.
    for wire in [partial_fc::plan::Dtype::Bf16, partial_fc::plan::Dtype::F32] {
        let mut layer =
            PartialFc::new(LayerConfig { wire, ..config() }, CpuBackend, SingleRank).unwrap();
        let (mut x, labels) = good_batch(6);
        x[2 * DIM + 1] = 1e5;
        x[..DIM].fill(1e-9);
        let out = layer.forward_backward(&x, &labels).unwrap();
        assert!(out.loss.is_finite(), "{wire:?}");
    }
    // 1e20 squared overflows f32: the norm would be infinite and the row normalized to zeros.
    let (mut x, labels) = good_batch(6);
    x[3 * DIM] = 1e20;
    rejected("1e20", fb(x, labels), |e| {
        matches!(e, PfcError::OutOfRange { row: 3, .. })
    });
}

#[test]
fn non_finite_weights_and_momentum() {
    rejected(
        "NaN weight",
        |l| {
            let mut w = l.weight().unwrap();
            w[DIM + 3] = f32::NAN;
            l.set_weight(&w)
        },
        |e| matches!(e, PfcError::Param { name: "weight", value, .. } if value.contains("row 1, column 3")),
    );
    rejected(
        "infinite momentum",
        |l| {
            let mut m = l.momentum().unwrap().unwrap();
            m[0] = f32::INFINITY;
            l.set_momentum(&m)
        },
        |e| {
            matches!(
                e,
                PfcError::Param {
                    name: "momentum",
                    ..
                }
            )
        },
    );
}

/// `path`'s checkpoint with the first value of tensor `name` replaced by `value`.
fn patch_first_value(path: &std::path::Path, name: &str, value: f32) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len;
    bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
    bytes
}

/// The safetensors file at `path` with one metadata entry replaced (the header rewritten and
/// padded again; the data's offsets are relative to its start, so they stay).
fn with_metadata(path: &std::path::Path, key: &str, value: &str) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    header["__metadata__"][key] = serde_json::Value::String(value.into());
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + header_len..]);
    out
}

#[test]
fn checkpoints_with_non_finite_values_or_an_exhausted_counter() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    trained_layer().save(&good).unwrap();
    for (name, value) in [("weight", f32::NAN), ("momentum", f32::NEG_INFINITY)] {
        let path = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&path, patch_first_value(&good, name, value)).unwrap();
        rejected(
            &format!("{name} {value}"),
            |l| l.load(&path),
            |e| matches!(e, PfcError::Checkpoint { reason, .. } if reason.contains(name)),
        );
    }
    // `save` refuses to write such a counter, so the file's metadata is edited instead.
    let mut spent = trained_layer();
    spent.set_steps(u64::MAX);
    let path = dir.path().join("spent.safetensors");
    assert!(matches!(
        spent.save(&path),
        Err(PfcError::Checkpoint { .. })
    ));
    std::fs::write(&path, with_metadata(&good, "step", &u64::MAX.to_string())).unwrap();
    rejected(
        "step u64::MAX",
        |l| l.load(&path),
        |e| matches!(e, PfcError::Checkpoint { reason, .. } if reason.contains("u64::MAX")),
    );
}

#[test]
fn a_step_counter_at_its_end_refuses_the_pass() {
    let mut layer = trained_layer();
    layer.set_steps(u64::MAX);
    let before = snapshot(&layer);
    let (x, labels) = good_batch(7);
    let err = layer.forward_backward(&x, &labels).unwrap_err();
    assert!(
        matches!(err, PfcError::Param { name: "step", .. }),
        "{err:?}"
    );
    assert!(snapshot(&layer).changed(&before).is_empty());
    layer.set_steps(5);
    still_works(&mut layer, 8);
    assert_eq!(layer.steps(), 6);
}

/// A rank's collective whose n-th all-reduce fails once `reduces_left` is armed with n, as a
/// network error striking one rank in the softmax's all-reduces (after sampling) would; it
/// breaks the group on failure (as a rank whose NCCL communicator was aborted), so that its
/// peers fail too instead of waiting.
#[derive(Default)]
struct FailingReduce {
    reduces_left: std::sync::atomic::AtomicUsize,
}

impl Hook<ThreadCollective> for FailingReduce {
    fn before(&self, op: &Op<'_>, inner: &ThreadCollective) -> Result<(), PfcError> {
        use std::sync::atomic::Ordering::SeqCst;
        let left = self.reduces_left.load(SeqCst);
        if matches!(op, Op::AllReduce) && left > 0 {
            self.reduces_left.store(left - 1, SeqCst);
            if left == 1 {
                Collective::<CpuBackend>::abort(inner, "injected all-reduce failure");
                return Err(PfcError::Collective("injected all-reduce failure".into()));
            }
        }
        Ok(())
    }
}

#[test]
fn a_pass_that_fails_after_sampling_counts_on_every_rank_alike() {
    // Both ranks pass the input agreement (two all-reduces), gather and draw their sample; then
    // rank 0's first softmax all-reduce fails (and it leaves), so rank 1's fails too. The
    // counter counts drawn samples: both advance by one, so their samplers stay in step, and
    // neither applies the failed pass's gradient.
    let handles = ThreadGroup::with_timeout(2, Duration::from_secs(20));
    let results: Vec<_> = std::thread::scope(|scope| {
        let joins: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                scope.spawn(move || {
                    let comm = Hooked::new(comm, FailingReduce::default());
                    let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
                    let (x, labels) = good_batch(9 + rank as u64);
                    layer.forward_backward(&x, &labels).unwrap();
                    layer.step(0.1).unwrap();
                    let before = layer.steps();
                    if rank == 0 {
                        layer
                            .collective()
                            .hook
                            .reduces_left
                            .store(3, std::sync::atomic::Ordering::SeqCst);
                    }
                    let res = layer.forward_backward(&x, &labels).map(|_| ());
                    (before, layer.steps(), res, layer.step(0.1))
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (rank, (before, after, res, pending)) in results.into_iter().enumerate() {
        assert!(
            matches!(res, Err(PfcError::Collective(_))),
            "rank {rank}: {res:?}"
        );
        assert_eq!(after, before + 1, "rank {rank}");
        assert!(
            pending.is_err(),
            "rank {rank}: the failed pass's gradient must not be applied"
        );
    }
}

#[test]
fn ranks_built_with_different_configurations_refuse_the_step() {
    // Two ranks with a bf16 gradient wire and one with f32: their reduce-scatters would pair
    // 16-bit with 32-bit buffers of the same element count.
    let results = ThreadGroup::run(3, |comm| {
        let rank = Collective::<CpuBackend>::rank(&comm);
        let mut cfg = config();
        if rank != 2 {
            cfg.grad_wire = partial_fc::plan::Dtype::Bf16;
        }
        let mut layer = PartialFc::new(cfg, CpuBackend, comm).unwrap();
        let before = snapshot(&layer);
        let (x, labels) = good_batch(20 + rank as u64);
        let res = layer.forward_backward(&x, &labels).map(|_| ());
        (res, snapshot(&layer).changed(&before).is_empty())
    });
    for (rank, (res, unchanged)) in results.iter().enumerate() {
        match res {
            Err(PfcError::Collective(msg)) if msg.contains("configuration differs") => {}
            other => panic!("rank {rank}: {other:?}"),
        }
        assert!(unchanged, "rank {rank}");
    }
}

/// From a user review: ranks built with another margin (or sampler) trained on silently, each
/// shard with its own loss. They are refused like a shape mismatch; a sample rate or a seed
/// that differs is allowed (each rank sizes and draws its own shard's sample).
#[test]
fn ranks_with_another_margin_refuse_the_step_another_sample_rate_does_not() {
    let run = |vary: fn(&mut LayerConfig)| {
        ThreadGroup::run(2, move |comm| {
            let rank = Collective::<CpuBackend>::rank(&comm);
            let mut cfg = config();
            if rank == 1 {
                vary(&mut cfg);
            }
            let mut layer = PartialFc::new(cfg, CpuBackend, comm).unwrap();
            let before = snapshot(&layer);
            let (x, labels) = good_batch(30 + rank as u64);
            let res = layer.forward_backward(&x, &labels).map(|_| ());
            (res, snapshot(&layer).changed(&before).is_empty())
        })
    };
    for (rank, (res, _)) in run(|c| {
        c.sample_rate = 0.5;
        c.seed += 1;
    })
    .iter()
    .enumerate()
    {
        assert!(res.is_ok(), "rank {rank}: {res:?}");
    }
    for (rank, (res, unchanged)) in run(|c| c.margin = partial_fc::Margin::cosface())
        .iter()
        .enumerate()
    {
        match res {
            Err(PfcError::Collective(msg)) if msg.contains("configuration differs") => {}
            other => panic!("rank {rank}: {other:?}"),
        }
        assert!(unchanged, "rank {rank}");
    }
}

#[test]
fn a_nan_that_gets_in_shows_in_the_loss() {
    // A learning rate of 1e38 is finite, so step() takes it; the weights overflow, and the next
    // loss must be NaN, not the finite -ln(1e-30) a clamp would make of it.
    let mut layer = trained_layer();
    layer.step(1e38).unwrap();
    let (x, labels) = good_batch(10);
    let out = layer.forward_backward(&x, &labels).unwrap();
    assert!(out.loss.is_nan(), "loss {}", out.loss);
}

/// One rank drawing its sample while another passes one used to pair different collectives (the
/// given-sample path makes a second agreement): a mismatch under NCCL, with no check. Now both
/// ranks get `PfcError::Collective` naming the two calls, nothing changes, and the group works.
#[test]
fn ranks_mixing_drawn_and_given_samples_are_refused_together() {
    ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
        let (x, labels) = good_batch(40 + rank as u64);
        let before = snapshot(&layer);
        let err = if rank == 0 {
            layer.forward_backward(&x, &labels).unwrap_err()
        } else {
            let all: Vec<i64> = (0..CLASSES as i64).collect();
            layer
                .forward_backward_with_sample(&x, &labels, &all)
                .unwrap_err()
        };
        match &err {
            PfcError::Collective(msg) => assert!(
                msg.contains("forward_backward_with_sample") && msg.contains("same call"),
                "rank {rank}: {msg}"
            ),
            other => panic!("rank {rank}: {other:?}"),
        }
        assert!(snapshot(&layer).changed(&before).is_empty());
        still_works(&mut layer, 50);
    });
}
