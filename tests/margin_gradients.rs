//! The per-row results of a pass (`StepOutput::rows`): each row's margin gradient is the
//! derivative of the pass's loss with respect to that row's margin (central differences of the
//! loss, on one rank and on three, with loss weights and a gradient scale), the target cosine
//! and loss are each rank's own rows of what one rank computes, and MagFace's `backward` gives
//! the gradient of the whole MagFace loss (the layer's loss with norm-dependent margins plus the
//! regularizer) with respect to the un-normalized embeddings.

use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::{
    Collective, CpuBackend, GradMode, LayerConfig, MagFace, Margin, PartialFc, PassOptions, Shard,
    StepOutput, TargetFallback,
};

const CLASSES: u64 = 200;
const DIM: usize = 8;
const ROWS: usize = 9;

/// ArcFace with the exact gradient and the monotonic fallback (MagFace's setting), at s = 16:
/// at s = 64 an untrained row's target probability falls below the loss's clamp (10⁻³⁰), where
/// the reported loss is flat while the gradients (as the published implementation's) are not.
fn margin() -> Margin {
    Margin {
        scale: 16.0,
        grad_mode: GradMode::Exact,
        fallback: TargetFallback::Monotonic,
        ..Margin::arcface()
    }
}

fn config(world: usize) -> LayerConfig {
    let mut c = LayerConfig::new(CLASSES, DIM, ROWS.div_ceil(world));
    c.sample_rate = 0.5;
    c.margin = margin();
    c
}

/// Embeddings of norm about 20 to 90 (MagFace's clamp is [10, 110]) and their labels.
fn batch() -> (Vec<f32>, Vec<i64>) {
    let mut x = partial_fc::init::normal_rows(11, 0, ROWS, DIM, 1.0);
    for (i, row) in x.chunks_mut(DIM).enumerate() {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        let want = 20.0 + 8.0 * i as f32;
        row.iter_mut().for_each(|v| *v *= want / norm);
    }
    let labels = (0..ROWS as i64)
        .map(|i| (i * 53 + 7) % CLASSES as i64)
        .collect();
    (x, labels)
}

/// Per-row settings of one pass: angular and cosine margins, loss weights.
struct Rows<'a> {
    m2: &'a [f32],
    m3: &'a [f32],
    weights: Option<&'a [f32]>,
}

/// One pass of fresh layers (the same sample every time) on `world` thread ranks.
fn run(world: usize, x: &[f32], rows: &Rows<'_>, grad_scale: f32) -> Vec<StepOutput> {
    let (_, labels) = batch();
    ThreadGroup::run(world, |comm| {
        let part = Shard::of(ROWS as u64, world, comm.rank());
        let (r0, r1) = (part.start as usize, part.end() as usize);
        let mut layer = PartialFc::new(config(world), CpuBackend, comm).unwrap();
        layer.set_grad_scale(grad_scale).unwrap();
        let mut options = PassOptions::new()
            .angular_margins(&rows.m2[r0..r1])
            .additive_margins(&rows.m3[r0..r1]);
        if let Some(w) = rows.weights {
            options = options.weights(&w[r0..r1]);
        }
        layer
            .forward_backward_with(&x[r0 * DIM..r1 * DIM], &labels[r0..r1], options)
            .unwrap()
    })
}

/// The pass's loss as the gradients see it (times the gradient scale).
fn scaled_loss(world: usize, x: &[f32], rows: &Rows<'_>, grad_scale: f32) -> f64 {
    f64::from(run(world, x, rows, grad_scale)[0].loss) * f64::from(grad_scale)
}

fn concat(outs: &[StepOutput], field: impl Fn(&StepOutput) -> &Vec<f32>) -> Vec<f32> {
    outs.iter().flat_map(|o| field(o).iter().copied()).collect()
}

fn assert_near(what: &str, got: f64, want: f64, rel: f64) {
    let tol = rel * want.abs().max(1e-3);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (tolerance {tol})"
    );
}

#[test]
fn each_rows_margin_gradient_is_the_derivative_of_the_loss() {
    let (x, _) = batch();
    let m2: Vec<f32> = (0..ROWS).map(|i| 0.3 + 0.04 * i as f32).collect();
    let m3: Vec<f32> = (0..ROWS).map(|i| 0.05 * (i % 3) as f32).collect();
    let weights: Vec<f32> = (0..ROWS).map(|i| 0.5 + 0.25 * (i % 4) as f32).collect();
    for (world, weighted, grad_scale) in [(1, false, 1.0), (3, true, 4.0), (2, true, 0.5)] {
        let w = weighted.then_some(&weights[..]);
        let base = Rows {
            m2: &m2,
            m3: &m3,
            weights: w,
        };
        let outs = run(world, &x, &base, grad_scale);
        let d_m2 = concat(&outs, |o| &o.rows.grad_angular_margin);
        let d_m3 = concat(&outs, |o| &o.rows.grad_additive_margin);
        assert_eq!(d_m2.len(), ROWS);
        let h = 2e-3f32;
        for i in [0, 4, ROWS - 1] {
            let nudged = |v: &[f32], by: f32| {
                let mut v = v.to_vec();
                v[i] += by;
                v
            };
            let (up, down) = (nudged(&m2, h), nudged(&m2, -h));
            let fd = (scaled_loss(world, &x, &Rows { m2: &up, ..base }, grad_scale)
                - scaled_loss(world, &x, &Rows { m2: &down, ..base }, grad_scale))
                / (2.0 * f64::from(h));
            let what = format!("world {world} row {i} d/dm2");
            assert_near(&what, f64::from(d_m2[i]), fd, 0.02);
            let (up, down) = (nudged(&m3, h), nudged(&m3, -h));
            let fd = (scaled_loss(world, &x, &Rows { m3: &up, ..base }, grad_scale)
                - scaled_loss(world, &x, &Rows { m3: &down, ..base }, grad_scale))
                / (2.0 * f64::from(h));
            let what = format!("world {world} row {i} d/dm3");
            assert_near(&what, f64::from(d_m3[i]), fd, 0.02);
        }
    }
}

#[test]
fn every_rank_reports_its_own_rows_of_what_one_rank_computes() {
    let (x, labels) = batch();
    let m2 = vec![0.5f32; ROWS];
    let m3 = vec![0.0f32; ROWS];
    let rows = Rows {
        m2: &m2,
        m3: &m3,
        weights: None,
    };
    let one = run(1, &x, &rows, 1.0);
    // A layer with the same margin and no options reports the same rows.
    let mut plain = PartialFc::new(config(1), CpuBackend, SingleRank).unwrap();
    let plain = plain.forward_backward(&x, &labels).unwrap();
    assert_eq!(plain.rows, one[0].rows);
    // The sample is drawn per shard, so three ranks see other negatives than one: compare the
    // target cosines (independent of the sample) exactly, and the losses loosely.
    for world in [2, 3] {
        let outs = run(world, &x, &rows, 1.0);
        let cos = concat(&outs, |o| &o.rows.target_cos);
        // One cosine per row, computed by whichever rank owns the target class.
        for (i, (&c, &c1)) in cos.iter().zip(&one[0].rows.target_cos).enumerate() {
            assert!((c - c1).abs() < 1e-5, "world {world} row {i}: {c} vs {c1}");
            assert!((-1.0..=1.0).contains(&c));
        }
        let loss = concat(&outs, |o| &o.rows.loss);
        let mean = loss.iter().map(|&l| f64::from(l)).sum::<f64>() / ROWS as f64;
        assert_near(
            "mean of the row losses",
            mean,
            f64::from(outs[0].loss),
            1e-5,
        );
        for o in &outs {
            assert_eq!(o.rows.gathered_rows, ROWS);
            assert_eq!(o.rows.loss_scale, 1.0 / ROWS as f32);
        }
    }
}

/// The whole MagFace loss at embeddings `x` on `world` ranks: the layer's loss with the margins
/// MagFace computes from `x`, plus every rank's share of the regularizer; and the gradient
/// MagFace's backward gives.
fn magface_loss_and_grad(world: usize, x: &[f32]) -> (f64, Vec<f32>) {
    let (_, labels) = batch();
    let magface = MagFace::default();
    let outs = ThreadGroup::run(world, |comm| {
        let part = Shard::of(ROWS as u64, world, comm.rank());
        let (r0, r1) = (part.start as usize, part.end() as usize);
        let mine = &x[r0 * DIM..r1 * DIM];
        let mut layer = PartialFc::new(config(world), CpuBackend, comm).unwrap();
        let margins = magface.margins(mine, DIM).unwrap();
        let mut out = layer
            .forward_backward_with(mine, &labels[r0..r1], margins.options())
            .unwrap();
        let share = magface
            .backward(mine, DIM, &out.rows, &mut out.grad_embeddings)
            .unwrap();
        (f64::from(out.loss), share, out.grad_embeddings)
    });
    let loss = outs[0].0 + outs.iter().map(|o| o.1).sum::<f64>();
    (
        loss,
        outs.iter().flat_map(|o| o.2.iter().copied()).collect(),
    )
}

#[test]
fn magface_backward_is_the_gradient_of_the_whole_magface_loss() {
    let (x, _) = batch();
    for world in [1, 3] {
        let (_, grad) = magface_loss_and_grad(world, &x);
        // Coordinates of rows with norms across the clamp's range, and a step that keeps each
        // row's norm on the same side of it.
        for (row, col) in [(0, 1), (3, 5), (8, 0)] {
            let j = row * DIM + col;
            let h = 0.02 * x[j].abs().max(1.0);
            let mut up = x.clone();
            up[j] += h;
            let mut down = x.clone();
            down[j] -= h;
            let fd = (magface_loss_and_grad(world, &up).0 - magface_loss_and_grad(world, &down).0)
                / (2.0 * f64::from(h));
            let what = format!("world {world} x[{row}, {col}]");
            assert_near(&what, f64::from(grad[j]), fd, 0.03);
        }
    }
}

#[test]
fn magface_pulls_a_confident_row_outward_and_the_regularizer_alone_pulls_every_norm_up() {
    // λ = 0 leaves the margin's push alone: a larger norm means a larger margin and a larger
    // loss, so the gradient points outward (d/dnorm > 0, descent shrinks the norm).
    let (x, labels) = batch();
    let run_with = |magface: MagFace| {
        let mut layer = PartialFc::new(config(1), CpuBackend, SingleRank).unwrap();
        let margins = magface.margins(&x, DIM).unwrap();
        let mut out = layer
            .forward_backward_with(&x, &labels, margins.options())
            .unwrap();
        let before = out.grad_embeddings.clone();
        magface
            .backward(&x, DIM, &out.rows, &mut out.grad_embeddings)
            .unwrap();
        // The radial part of what backward added, per row.
        (0..ROWS)
            .map(|i| {
                let r = i * DIM..(i + 1) * DIM;
                let norm = x[r.clone()].iter().map(|v| v * v).sum::<f32>().sqrt();
                r.map(|j| (out.grad_embeddings[j] - before[j]) * x[j] / norm)
                    .sum::<f32>()
            })
            .collect::<Vec<f32>>()
    };
    let margin_only = run_with(MagFace {
        lambda: 0.0,
        ..MagFace::default()
    });
    assert!(margin_only.iter().all(|&d| d > 0.0), "{margin_only:?}");
    let regularizer_only = run_with(MagFace {
        lower_margin: 0.5,
        upper_margin: 0.5,
        ..MagFace::default()
    });
    // g'(a) = 1/u_a² − 1/a² < 0 inside the clamp: descent grows the norm.
    assert!(
        regularizer_only.iter().all(|&d| d < 0.0),
        "{regularizer_only:?}"
    );
}

/// At a target cosine of 1 (the embedding equal to its class center; in f32 it may come out
/// just past 1, clamped: a review found the margin gradient reported as 0 there, which
/// src/layer/row_results.rs's unit test pins down) the margin applies after the clamp, so the
/// loss still moves with m2, by `dL/dm3 · sin(m2)`.
#[test]
fn a_target_cosine_past_one_still_has_its_margin_gradient() {
    let dim = 16;
    let cfg = |m2: f64| {
        let mut c = LayerConfig::new(10, dim, 1);
        c.sample_rate = 1.0;
        c.margin = Margin { m2, ..margin() };
        c
    };
    let mut layer = PartialFc::new(cfg(0.5), CpuBackend, SingleRank).unwrap();
    // Find an embedding whose f32 cosine with itself (as the target center) exceeds 1.
    let mut clipped = None;
    for seed in 0..200 {
        let x = partial_fc::init::normal_rows(seed, 0, 1, dim, 1.0);
        let mut w = layer.weight().unwrap();
        w[..dim].copy_from_slice(&x);
        layer.set_weight(&w).unwrap();
        let out = layer.forward_backward(&x, &[0]).unwrap();
        layer.discard_grad();
        let cos = out.rows.target_cos[0];
        if cos == 1.0 {
            // Exactly 1 or clamped to it: either way the slope is −dL/dm3 · (−sin m2).
            clipped = Some((x, w, out));
            break;
        }
    }
    let (x, w, out) = clipped.expect("no embedding with a target cosine of 1 in 200 draws");
    let want = -f64::from(out.rows.grad_additive_margin[0]) * -(0.5f64.sin());
    let got = f64::from(out.rows.grad_angular_margin[0]);
    assert_near("dL/dm2 at cos = 1", got, want, 1e-4);
    assert!(got > 0.0);
    // And the loss moves with m2 by that slope (central difference).
    let loss_at = |m2: f64| {
        let mut l = PartialFc::new(cfg(m2), CpuBackend, SingleRank).unwrap();
        l.set_weight(&w).unwrap();
        f64::from(l.forward_backward(&x, &[0]).unwrap().loss)
    };
    let h = 1e-3;
    let fd = (loss_at(0.5 + h) - loss_at(0.5 - h)) / (2.0 * h);
    assert_near("central difference", got, fd, 0.02);
}
