//! Gradient checks of the CPU step against an independent f64 implementation (tests/common).
//!
//! (a) The f64 reference's analytic gradient (exact mode) is checked by central finite
//!     differences of the f64 loss, which validates the reference itself;
//! (b) the layer's f32 loss, `grad_embeddings` and `weight_grad_dense` are compared with that
//!     reference, in `Exact` mode and in `StraightThrough` mode (whose expected gradient is the
//!     one ../shared/golden/README.md documents: d loss / d cos = s·(p − onehot)/B everywhere).
//!
//! Inputs are built so that every cosine keeps away from the kinks (the clamp at ±1, the
//! fallback threshold, the filter threshold), where finite differences are meaningless.

mod common;

use common::{assert_close_rows, ref_loss, reference, row_losses, to_f64, RefMargin, Rng};
use partial_fc::collective::SingleRank;
use partial_fc::{CpuBackend, GradMode, LayerConfig, Margin, PartialFc, TargetFallback};

const DIM: usize = 8;
const CLASSES: usize = 12;
/// Labels of the six rows; classes 5 and 7..=11 are never a target.
const LABELS: [i64; 6] = [0, 3, 3, 1, 6, 2];

/// One gradient-check problem: f32 inputs (what the layer sees) and the margin.
struct Problem {
    x: Vec<f32>,
    w: Vec<f32>,
    labels: Vec<i64>,
    margin: Margin,
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
    v.iter().map(|a| a / n).collect()
}

/// A random direction orthogonal to `u` (unit).
fn orthogonal(rng: &mut Rng, u: &[f64]) -> Vec<f64> {
    let r: Vec<f64> = (0..u.len()).map(|_| rng.normal()).collect();
    let d: f64 = r.iter().zip(u).map(|(a, b)| a * b).sum();
    unit(&r.iter().zip(u).map(|(a, b)| a - d * b).collect::<Vec<_>>())
}

/// Weights N(0, 1) per class with random norms; row i of x has cosine `target_cos[i]` with its
/// class center and a random norm in [0.5, 3). With `near`, the listed non-target classes are
/// moved close to a row, so that their cosine with it is high (filtering tests).
fn problem(seed: u64, target_cos: &[f64; 6], near: &[(usize, usize)], margin: Margin) -> Problem {
    let mut rng = Rng::new(seed);
    let mut w: Vec<f64> = (0..CLASSES * DIM).map(|_| rng.normal()).collect();
    let mut x = Vec::with_capacity(LABELS.len() * DIM);
    for (i, &label) in LABELS.iter().enumerate() {
        let c = label as usize;
        let w_hat = unit(&w[c * DIM..(c + 1) * DIM]);
        let perp = orthogonal(&mut rng, &w_hat);
        let a = target_cos[i];
        let norm = 0.5 + 2.5 * rng.uniform();
        for k in 0..DIM {
            x.push(norm * (a * w_hat[k] + (1.0 - a * a).sqrt() * perp[k]));
        }
    }
    for &(class, row) in near {
        assert!(!LABELS.contains(&(class as i64)));
        let x_hat = unit(&x[row * DIM..(row + 1) * DIM]);
        let norm = 0.5 + rng.uniform();
        for k in 0..DIM {
            w[class * DIM + k] = norm * (x_hat[k] + 0.35 * rng.normal());
        }
    }
    Problem {
        x: x.iter().map(|&v| v as f32).collect(),
        w: w.iter().map(|&v| v as f32).collect(),
        labels: LABELS.to_vec(),
        margin,
    }
}

fn all_classes() -> Vec<usize> {
    (0..CLASSES).collect()
}

/// Every cosine of the problem (in f64, from the f32 inputs), with whether it is a target.
fn cosines(p: &Problem) -> Vec<(f64, bool)> {
    let (x, w) = (to_f64(&p.x), to_f64(&p.w));
    let mut out = Vec::new();
    for (i, xr) in x.chunks(DIM).enumerate() {
        let xh = unit(xr);
        for (c, wr) in w.chunks(DIM).enumerate() {
            let cos: f64 = xh.iter().zip(unit(wr)).map(|(a, b)| a * b).sum();
            out.push((cos, p.labels[i] == c as i64));
        }
    }
    out
}

/// Asserts the problem keeps away from every kink, and returns how many non-target entries the
/// filter removes and how many targets sit on the fallback branch.
fn check_away_from_kinks(p: &Problem) -> (usize, usize) {
    let m = RefMargin::of(&p.margin);
    let rows = row_losses(
        &to_f64(&p.x),
        &to_f64(&p.w),
        &p.labels,
        DIM,
        &all_classes(),
        &m,
    );
    assert!(
        rows.iter().all(|&l| l < 66.0),
        "a row's loss {rows:?} is near the 1e-30 probability floor"
    );
    let (mut filtered, mut fallback) = (0, 0);
    for (c, is_target) in cosines(p) {
        assert!(c.abs() < 0.99, "cosine {c} too close to the clamp");
        if is_target && m.fallback {
            assert!(
                (c - m.fallback_cos()).abs() > 0.02,
                "target {c} at the fallback kink"
            );
            fallback += usize::from(c <= m.fallback_cos());
        }
        if let (false, Some(t)) = (is_target, m.filter) {
            assert!((c - t).abs() > 0.02, "cosine {c} at the filter threshold");
            filtered += usize::from(c > t);
        }
    }
    (filtered, fallback)
}

/// (a) The f64 analytic gradient of the exact mode equals central differences of the f64 loss.
fn finite_difference_check(p: &Problem) {
    let m = RefMargin {
        exact: true,
        ..RefMargin::of(&p.margin)
    };
    let cols = all_classes();
    let (x, w) = (to_f64(&p.x), to_f64(&p.w));
    let analytic = reference(&x, &w, &p.labels, DIM, &cols, &m);
    let h = 1e-6;
    let fd = |which: usize, idx: usize| {
        let (mut xp, mut wp) = (x.clone(), w.clone());
        let (mut xm, mut wm) = (x.clone(), w.clone());
        if which == 0 {
            xp[idx] += h;
            xm[idx] -= h;
        } else {
            wp[idx] += h;
            wm[idx] -= h;
        }
        (ref_loss(&xp, &wp, &p.labels, DIM, &cols, &m)
            - ref_loss(&xm, &wm, &p.labels, DIM, &cols, &m))
            / (2.0 * h)
    };
    let fd_x: Vec<f64> = (0..x.len()).map(|i| fd(0, i)).collect();
    let fd_w: Vec<f64> = (0..w.len()).map(|i| fd(1, i)).collect();
    // Central differences in f64 with h = 1e-6 carry ~ε·loss/h ≈ 1e-8 of rounding noise, so
    // entries far below the gradient's scale get an absolute floor of 1e-7.
    assert_close_rows("fd grad_x", &analytic.grad_x, &fd_x, DIM, 1e-6, 1e-7);
    assert_close_rows("fd grad_w", &analytic.grad_w, &fd_w, DIM, 1e-6, 1e-7);
}

fn run_layer(p: &Problem) -> (f64, Vec<f64>, Vec<f64>) {
    let mut cfg = LayerConfig::new(CLASSES as u64, DIM, p.labels.len());
    cfg.sample_rate = 1.0;
    cfg.margin = p.margin;
    cfg.optimizer = None;
    let mut layer = PartialFc::zeroed(cfg, CpuBackend, SingleRank).unwrap();
    layer.set_weight(&p.w).unwrap();
    let out = layer.forward_backward(&p.x, &p.labels).unwrap();
    assert_eq!(out.sampled, CLASSES);
    let gw = layer.weight_grad_dense().unwrap();
    (
        f64::from(out.loss),
        to_f64(&out.grad_embeddings),
        to_f64(&gw),
    )
}

/// (b) The layer's f32 results equal the f64 reference of its own gradient mode.
fn layer_matches_reference(p: &Problem) {
    let m = RefMargin::of(&p.margin);
    let want = reference(
        &to_f64(&p.x),
        &to_f64(&p.w),
        &p.labels,
        DIM,
        &all_classes(),
        &m,
    );
    let (loss, gx, gw) = run_layer(p);
    assert!(
        (loss - want.loss).abs() <= 1e-5 * want.loss.abs() + 1e-6,
        "loss {loss} vs reference {}",
        want.loss
    );
    // f32 resolves p − 1 only to ~1e-7 where p ≈ 1, so entries far below the array's scale get
    // an absolute floor of 1e-5 of that scale.
    let floor = |v: &[f64]| 1e-5 * v.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    let ex = assert_close_rows(
        "grad_embeddings",
        &gx,
        &want.grad_x,
        DIM,
        1e-4,
        floor(&want.grad_x),
    );
    let ew = assert_close_rows(
        "weight_grad_dense",
        &gw,
        &want.grad_w,
        DIM,
        1e-4,
        floor(&want.grad_w),
    );
    eprintln!(
        "  {:?}: largest fraction of the tolerance used: x {ex:.2}, w {ew:.2}",
        p.margin.grad_mode
    );
}

fn with_mode(margin: Margin, mode: GradMode) -> Margin {
    Margin {
        grad_mode: mode,
        ..margin
    }
}

/// Target cosines spread over (-1, 1), two of them past θ + m2 = π for ArcFace (cos θ < -0.878).
/// Used at s = 30: at s = 64 such rows would pass the loss floor of −ln(1e-30).
const SPREAD: [f64; 6] = [0.62, 0.31, -0.18, -0.93, 0.05, -0.96];
/// Milder targets for the published scale s = 64.
const MILD: [f64; 6] = [0.8, 0.6, 0.5, 0.7, 0.55, 0.85];

/// Picks a filter threshold no non-target cosine is within 0.02 of, that removes >= 3 entries.
fn filter_threshold(p: &Problem) -> f64 {
    let nontarget: Vec<f64> = cosines(p)
        .into_iter()
        .filter(|c| !c.1)
        .map(|c| c.0)
        .collect();
    (30..=70)
        .map(|t| f64::from(t) / 100.0)
        .find(|&t| {
            nontarget.iter().all(|c| (c - t).abs() > 0.02)
                && nontarget.iter().filter(|&&c| c > t).count() >= 3
        })
        .expect("some threshold keeps away from every cosine")
}

/// Runs (a) and (b) for both gradient modes, at the margin's scale on mild targets and at s = 30
/// on targets spread to the far side of π; returns the entries filtered and targets on the
/// fallback branch of the spread problem.
fn check_both_modes(seed: u64, margin: Margin, near: &[(usize, usize)]) -> (usize, usize) {
    let mut counts = (0, 0);
    for mode in [GradMode::Exact, GradMode::StraightThrough] {
        for (spread, scale) in [(&MILD, margin.scale), (&SPREAD, 30.0)] {
            let margin = Margin {
                scale,
                ..with_mode(margin, mode)
            };
            let mut p = problem(seed, spread, near, margin);
            if margin.interclass_filter.is_some() {
                p.margin.interclass_filter = Some(filter_threshold(&p));
            }
            counts = check_away_from_kinks(&p);
            finite_difference_check(&p);
            layer_matches_reference(&p);
        }
    }
    counts
}

#[test]
fn arcface_gradients_match_f64_reference() {
    check_both_modes(1, Margin::arcface(), &[]);
}

#[test]
fn cosface_gradients_match_f64_reference() {
    check_both_modes(2, Margin::cosface(), &[]);
}

#[test]
fn combined_sphereface_style_gradients_match_f64_reference() {
    // m1 > 1: m1·θ + m2 passes π already at θ = (π − 0.25) / 1.35 ≈ 2.14 (cos θ ≈ −0.54).
    check_both_modes(3, Margin::combined(32.0, 1.35, 0.25, 0.1), &[]);
}

#[test]
fn monotonic_fallback_gradients_match_f64_reference() {
    for margin in [Margin::arcface(), Margin::combined(32.0, 1.35, 0.25, 0.1)] {
        let margin = Margin {
            fallback: TargetFallback::Monotonic,
            ..margin
        };
        let (_, on_fallback) = check_both_modes(4, margin, &[]);
        assert!(
            on_fallback >= 2,
            "the inputs must exercise the fallback branch"
        );
    }
}

#[test]
fn interclass_filter_gradients_match_f64_reference() {
    for margin in [Margin::arcface(), Margin::cosface()] {
        let margin = Margin {
            interclass_filter: Some(0.4),
            ..margin
        };
        let (filtered, _) = check_both_modes(5, margin, &[(5, 0), (9, 2), (11, 4)]);
        assert!(
            filtered >= 3,
            "the inputs must exercise the filter ({filtered} filtered)"
        );
    }
}

/// Exact and straight-through differ for ArcFace, and coincide for CosFace (m1 = 1, m2 = 0: the
/// margin is a constant shift, so straight-through is the true gradient there).
#[test]
fn gradient_modes_differ_exactly_where_the_margin_bends() {
    let arc_exact = problem(1, &MILD, &[], with_mode(Margin::arcface(), GradMode::Exact));
    let arc_st = problem(
        1,
        &MILD,
        &[],
        with_mode(Margin::arcface(), GradMode::StraightThrough),
    );
    let (_, ge, _) = run_layer(&arc_exact);
    let (_, gs, _) = run_layer(&arc_st);
    let diff = ge
        .iter()
        .zip(&gs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = ge.iter().map(|a| a.abs()).fold(0.0, f64::max);
    assert!(
        diff > 1e-2 * scale,
        "ArcFace exact vs straight-through differ by only {diff:e}"
    );

    let cos_exact = problem(2, &MILD, &[], with_mode(Margin::cosface(), GradMode::Exact));
    let cos_st = problem(
        2,
        &MILD,
        &[],
        with_mode(Margin::cosface(), GradMode::StraightThrough),
    );
    let (le, ge, we) = run_layer(&cos_exact);
    let (ls, gs, ws) = run_layer(&cos_st);
    assert_eq!(le, ls);
    assert_close_rows("cosface modes x", &ge, &gs, DIM, 1e-6, 0.0);
    assert_close_rows("cosface modes w", &we, &ws, DIM, 1e-6, 0.0);
}

/// A class whose cosine with every row is above the filter threshold contributes a constant
/// logit (0) everywhere: its center gets exactly zero gradient, and moving it (while it stays
/// above the threshold) changes neither the loss nor the embedding gradient. Without the filter,
/// the same class gets a gradient, so the check can fail.
#[test]
fn filtered_entries_pass_no_gradient() {
    let mut rng = Rng::new(11);
    let rows = 6;
    let u = unit(&(0..DIM).map(|_| rng.normal()).collect::<Vec<_>>());
    let x: Vec<f32> = (0..rows * DIM)
        .map(|i| (u[i % DIM] + 0.3 * rng.normal()) as f32)
        .collect();
    let mut w = rng.normal_vec(CLASSES * DIM, 1.0);
    let hot = 8; // never a label
    let labels: Vec<i64> = vec![0, 1, 2, 3, 4, 5];
    let set_hot = |w: &mut Vec<f32>, rng: &mut Rng, noise: f64| {
        for k in 0..DIM {
            w[hot * DIM + k] = (u[k] + noise * rng.normal()) as f32;
        }
    };
    set_hot(&mut w, &mut rng, 0.0);
    let threshold = 0.4;
    let min_cos = x
        .chunks(DIM)
        .map(|r| {
            let xh = unit(&to_f64(r));
            let wh = unit(&to_f64(&w[hot * DIM..(hot + 1) * DIM]));
            xh.iter().zip(&wh).map(|(a, b)| a * b).sum::<f64>()
        })
        .fold(1.0, f64::min);
    assert!(
        min_cos > threshold + 0.1,
        "construction: min cosine {min_cos}"
    );

    let run = |w: &[f32], filter: Option<f64>| {
        let mut cfg = LayerConfig::new(CLASSES as u64, DIM, rows);
        cfg.sample_rate = 1.0;
        cfg.optimizer = None;
        cfg.margin = Margin {
            interclass_filter: filter,
            grad_mode: GradMode::Exact,
            ..Margin::arcface()
        };
        let mut layer = PartialFc::zeroed(cfg, CpuBackend, SingleRank).unwrap();
        layer.set_weight(w).unwrap();
        let out = layer.forward_backward(&x, &labels).unwrap();
        (out, layer.weight_grad_dense().unwrap())
    };
    let (out, gw) = run(&w, Some(threshold));
    let hot_grad = &gw[hot * DIM..(hot + 1) * DIM];
    assert!(
        hot_grad.iter().all(|&g| g == 0.0),
        "filtered class got {hot_grad:?}"
    );

    let (_, gw_unfiltered) = run(&w, None);
    let unfiltered = gw_unfiltered[hot * DIM..(hot + 1) * DIM]
        .iter()
        .fold(0.0f32, |a, &g| a.max(g.abs()));
    assert!(
        unfiltered > 1e-4,
        "without the filter the class must get a gradient"
    );

    let mut moved = w.clone();
    set_hot(&mut moved, &mut rng, 0.05);
    let (out_moved, _) = run(&moved, Some(threshold));
    assert_eq!(out.loss, out_moved.loss);
    assert_eq!(out.grad_embeddings, out_moved.grad_embeddings);
    let (unf_a, _) = run(&w, None);
    let (unf_b, _) = run(&moved, None);
    assert_ne!(
        unf_a.grad_embeddings, unf_b.grad_embeddings,
        "sensitivity without filter"
    );
}
