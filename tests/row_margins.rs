//! Per-row margins (`PassOptions::angular_margins` / `additive_margins`, ElasticFace and
//! AdaFace): a row's margin acts as the layer's m2 or m3 would on that row, bit for bit (each row's
//! embedding gradient equals the one of a layer configured with that row's margin, on one rank
//! and across ranks, in the three-pass and the one-kernel softmax); margins equal to the
//! layer's are the plain pass; ranks agree with one rank; bad margins and ranks that disagree
//! are refused on every rank with nothing changed; a negative angle is held at 0.

use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::{
    AdaFace, Collective, CpuBackend, GradMode, LayerConfig, Margin, PartialFc, PassOptions,
    PfcError, Shard, StepOutput, TargetFallback,
};

const CLASSES: u64 = 300;
const DIM: usize = 16;
const ROWS: usize = 12;
/// Which of two margins row i gets: the ranks' slices (6 rows at two ranks, 4 at three) differ,
/// and so do rows i and i ^ 1, i ^ 2 for most i, so a row read at the wrong index, or a rank
/// seeing its own table in every slot, shows.
const PATTERN: [usize; ROWS] = [0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 0, 1];

fn config(world: usize, margin: Margin) -> LayerConfig {
    let mut c = LayerConfig::new(CLASSES, DIM, ROWS.div_ceil(world));
    c.sample_rate = 0.5;
    c.margin = margin;
    c
}

fn batch() -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(7, 0, ROWS, DIM, 1.0);
    let labels = (0..ROWS as i64)
        .map(|i| (i * 37 + 5) % CLASSES as i64)
        .collect();
    (x, labels)
}

/// One pass on `world` thread ranks, each with its rows of the batch and of `m2` / `m3`.
fn run(world: usize, margin: Margin, m2: Option<&[f32]>, m3: Option<&[f32]>) -> Vec<StepOutput> {
    let (x, labels) = batch();
    ThreadGroup::run(world, |comm| {
        let rows = Shard::of(ROWS as u64, world, comm.rank());
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let mut layer = PartialFc::new(config(world, margin), CpuBackend, comm).unwrap();
        let mut options = PassOptions::new();
        if let Some(m2) = m2 {
            options = options.angular_margins(&m2[r0..r1]);
        }
        if let Some(m3) = m3 {
            options = options.additive_margins(&m3[r0..r1]);
        }
        layer
            .forward_backward_with(&x[r0 * DIM..r1 * DIM], &labels[r0..r1], options)
            .unwrap()
    })
}

fn margins() -> [Margin; 4] {
    let exact = Margin {
        grad_mode: GradMode::Exact,
        ..Margin::arcface()
    };
    // The fallback's constants come from m2 in f64: a row's table must carry the layer's.
    let monotonic = Margin {
        fallback: TargetFallback::Monotonic,
        ..Margin::combined(64.0, 1.0, 0.3, 0.0)
    };
    [
        Margin::arcface(),
        exact,
        monotonic,
        Margin::combined(64.0, 1.0, 0.3, 0.2),
    ]
}

#[test]
fn margins_equal_to_the_layers_are_the_plain_pass_bit_for_bit() {
    for world in [1, 3] {
        for margin in margins() {
            let plain = run(world, margin, None, None);
            let m2 = vec![margin.m2 as f32; ROWS];
            let m3 = vec![margin.m3 as f32; ROWS];
            assert_eq!(
                run(world, margin, Some(&m2), None),
                plain,
                "{world} {margin:?}"
            );
            assert_eq!(
                run(world, margin, None, Some(&m3)),
                plain,
                "{world} {margin:?}"
            );
            assert_eq!(run(world, margin, Some(&m2), Some(&m3)), plain);
        }
    }
}

/// Each row's embedding gradient depends on its own softmax only: with margins a and b on
/// rows in a pattern that differs between ranks and between neighbouring rows it is, bit for
/// bit, the gradient of a layer whose own margin is that row's.
/// Scale 8, not 64: at 64 an untrained row's target probability is ~0 whatever its margin, and
/// the gradients of both margins would be the same bits.
#[test]
fn each_row_gets_its_own_margin() {
    let (a, b) = (0.2f32, 0.6f32);
    let alternate: Vec<f32> = PATTERN.iter().map(|&k| [a, b][k]).collect();
    for world in [1, 2] {
        for base in margins() {
            let base = Margin { scale: 8.0, ..base };
            let with = |m2: f32| Margin {
                m2: f64::from(m2),
                ..base
            };
            let mixed = run(world, base, Some(&alternate), None);
            let (all_a, all_b) = (
                run(world, with(a), None, None),
                run(world, with(b), None, None),
            );
            assert_ne!(all_a[0].grad_embeddings, all_b[0].grad_embeddings);
            for rank in 0..world {
                let rows = mixed[rank].grad_embeddings.len() / DIM;
                for r in 0..rows {
                    let global = Shard::of(ROWS as u64, world, rank).start as usize + r;
                    let want = if PATTERN[global] == 0 { &all_a } else { &all_b };
                    let span = r * DIM..(r + 1) * DIM;
                    assert_eq!(
                        mixed[rank].grad_embeddings[span.clone()],
                        want[rank].grad_embeddings[span],
                        "world {world} row {global} {base:?}"
                    );
                }
            }
            // The loss lies between the two uniform ones (a larger margin, a larger loss).
            let (lo, hi) = (all_a[0].loss, all_b[0].loss);
            assert!(
                lo < mixed[0].loss && mixed[0].loss < hi,
                "{lo} {} {hi}",
                mixed[0].loss
            );
        }
    }
    // The cosine margin alike.
    let cosface = Margin::combined(8.0, 1.0, 0.0, 0.4);
    let m3: Vec<f32> = (0..ROWS).map(|i| [0.1, 0.4][i % 2]).collect();
    let mixed = run(1, cosface, None, Some(&m3));
    let low = Margin {
        m3: f64::from(0.1f32),
        ..cosface
    };
    let (uniform_low, uniform_high) = (run(1, low, None, None), run(1, cosface, None, None));
    let row =
        |out: &[StepOutput], r: usize| out[0].grad_embeddings[r * DIM..(r + 1) * DIM].to_vec();
    assert_eq!(row(&mixed, 0), row(&uniform_low, 0));
    assert_eq!(row(&mixed, 1), row(&uniform_high, 1));
    assert_ne!(row(&uniform_low, 1), row(&uniform_high, 1));
}

#[test]
fn ranks_agree_with_one_rank() {
    let m2: Vec<f32> = (0..ROWS).map(|i| 0.3 + 0.05 * (i % 5) as f32).collect();
    let m3: Vec<f32> = (0..ROWS).map(|i| 0.1 * (i % 3) as f32 - 0.05).collect();
    let mut one_cfg = config(1, Margin::arcface());
    one_cfg.sample_rate = 1.0;
    let (x, labels) = batch();
    let mut one = PartialFc::new(one_cfg, CpuBackend, SingleRank).unwrap();
    let options = PassOptions::new()
        .angular_margins(&m2)
        .additive_margins(&m3);
    let want = one.forward_backward_with(&x, &labels, options).unwrap();
    let parts = ThreadGroup::run(3, |comm| {
        let rows = Shard::of(ROWS as u64, 3, comm.rank());
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let mut cfg = config(3, Margin::arcface());
        cfg.sample_rate = 1.0;
        let mut layer = PartialFc::new(cfg, CpuBackend, comm).unwrap();
        let options = PassOptions::new()
            .angular_margins(&m2[r0..r1])
            .additive_margins(&m3[r0..r1]);
        layer
            .forward_backward_with(&x[r0 * DIM..r1 * DIM], &labels[r0..r1], options)
            .unwrap()
    });
    assert!(
        (parts[0].loss - want.loss).abs() <= 1e-5 * want.loss,
        "{} {}",
        parts[0].loss,
        want.loss
    );
    let grads: Vec<f32> = parts
        .iter()
        .flat_map(|p| p.grad_embeddings.clone())
        .collect();
    let scale = want
        .grad_embeddings
        .iter()
        .fold(0f32, |m, g| m.max(g.abs()));
    for (i, (p, q)) in grads.iter().zip(&want.grad_embeddings).enumerate() {
        assert!((p - q).abs() <= 1e-5 * scale, "gradient {i}: {p} vs {q}");
    }
}

#[test]
fn bad_margins_are_refused_with_nothing_changed() {
    let (x, labels) = batch();
    let fresh = || PartialFc::new(config(1, Margin::arcface()), CpuBackend, SingleRank).unwrap();
    let mut layer = fresh();
    let half = [0.5f32; 6];
    let mut wild = [0.5f32; ROWS];
    let cases: [(PassOptions, &str); 5] = [
        (
            PassOptions::new().angular_margins(&half),
            "one margin per row",
        ),
        (
            PassOptions::new().additive_margins(&half),
            "one margin per row",
        ),
        (
            {
                wild[3] = 1.6;
                PassOptions::new().angular_margins(&wild)
            },
            "row 3",
        ),
        (
            PassOptions::new().additive_margins(&[f32::NAN; ROWS]),
            "NaN at row 0",
        ),
        (
            PassOptions::new().additive_margins(&[-1.0; ROWS]),
            "lie in (-1.0000, 1.0000)",
        ),
    ];
    for (options, says) in cases {
        let err = layer
            .forward_backward_with(&x, &labels, options)
            .unwrap_err();
        assert!(
            matches!(err, PfcError::Shape(_) | PfcError::Param { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(says), "{err} lacks {says:?}");
    }
    // Nothing changed: the next pass is a fresh layer's.
    let next = layer.forward_backward(&x, &labels).unwrap();
    assert_eq!(next, fresh().forward_backward(&x, &labels).unwrap());
}

#[test]
fn ranks_that_disagree_on_margins_are_refused_together() {
    let (x, labels) = batch();
    let errors = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(2, Margin::arcface()), CpuBackend, comm).unwrap();
        let (x, labels) = (
            &x[rank * 6 * DIM..(rank + 1) * 6 * DIM],
            &labels[rank * 6..(rank + 1) * 6],
        );
        let m2 = [0.4f32; 6];
        let options = if rank == 0 {
            PassOptions::new().angular_margins(&m2)
        } else {
            PassOptions::new()
        };
        layer.forward_backward_with(x, labels, options).unwrap_err()
    });
    for e in &errors {
        assert!(matches!(e, PfcError::Collective(_)), "{e}");
        assert!(e.to_string().contains("per-row margins"), "{e}");
    }
}

/// AdaFace's negative angular margin on an easy row: θ − m·ĝ below 0 is held at 0, so the
/// target logit is s·(1 − m3) there and, with the exact gradient, passes no gradient to the
/// cosine (AdaFace clips the angle); above 0 the logit is cos(θ + m2) − m3.
#[test]
fn a_negative_angle_is_held_at_zero() {
    use partial_fc::cpu::margin_softmax::{target_logit, target_logit_slope};
    let margin = Margin {
        grad_mode: GradMode::Exact,
        ..Margin::combined(64.0, 1.0, 0.0, 0.0)
    };
    let entry = margin.row_entry(-0.4, 0.3);
    let p = margin.params().for_row(Some(&entry), 0);
    let c = 0.99f32; // θ = 0.1415 < 0.4
    assert_eq!(target_logit(c, &p), 1.0 - 0.3);
    assert_eq!(target_logit_slope(c, &p), 0.0);
    let c = 0.5f32; // θ = 1.047 > 0.4
    let want = ((c.acos() - 0.4).cos() - 0.3) as f64;
    assert!((f64::from(target_logit(c, &p)) - want).abs() < 1e-6);
    assert!(target_logit_slope(c, &p) > 0.0);
    // At θ = π the angle π − 0.4 has not passed π: no fallback, even where the layer asks for
    // the monotonic one (its constant for such an m2 is −∞: no cosine reaches it).
    let monotonic = Margin {
        fallback: TargetFallback::Monotonic,
        ..margin
    };
    let entry = monotonic.row_entry(-0.4, 0.3);
    let p = monotonic.params().for_row(Some(&entry), 0);
    let want = ((std::f32::consts::PI - 0.4).cos() - 0.3) as f64;
    assert!((f64::from(target_logit(-1.0, &p)) - want).abs() < 1e-6);
    assert_eq!(monotonic.params().fallback_cos, f32::NEG_INFINITY); // m1 = 1, m2 = 0
}

/// AdaFace end to end on one rank: its margins are in bounds, the pass takes them, and a few
/// steps of training lower the loss.
#[test]
fn adaface_trains() {
    let (x, labels) = batch();
    let mut cfg = config(1, Margin::combined(64.0, 1.0, 0.0, 0.0));
    cfg.sample_rate = 1.0;
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let mut adaface = AdaFace::new();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let m = adaface.margins(&x, DIM).unwrap();
        assert!(m.additive.iter().all(|&v| (0.0..=0.8).contains(&v)));
        losses.push(
            layer
                .forward_backward_with(&x, &labels, m.options())
                .unwrap()
                .loss,
        );
        adaface.update(&m);
        layer.step(0.5).unwrap();
    }
    assert!(losses[19] < 0.8 * losses[0], "{losses:?}");
}
