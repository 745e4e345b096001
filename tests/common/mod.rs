//! Helpers shared by the step tests: a small deterministic generator for test data, an
//! independent f64 implementation of the margin-softmax loss and its gradients, a
//! row-relative comparison, and a collective with test hooks (`hooked`).
//!
//! The reference is written from the formulas (issue 2, ../shared/golden/README.md), not from
//! the crate's kernels: normalize, clamp to [-1, 1], margin on the target, filter, scale,
//! softmax cross-entropy averaged over the batch.
#![allow(dead_code)]

pub mod full_softmax;
pub mod hooked;

use partial_fc::synthetic::SplitMix64;
use partial_fc::{GradMode, Margin, TargetFallback};

/// The tests' inputs: the crate's `SplitMix64`, fully determined by its seed, with this file's
/// own normal draw (u1 = 1 − uniform), which the tests' data were made with.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.uniform()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn normal_vec(&mut self, len: usize, std: f64) -> Vec<f32> {
        (0..len).map(|_| (self.normal() * std) as f32).collect()
    }
}

/// The margin's scalar parameters in f64, read from the public configuration.
#[derive(Debug, Clone, Copy)]
pub struct RefMargin {
    pub s: f64,
    pub m1: f64,
    pub m2: f64,
    pub m3: f64,
    pub exact: bool,
    pub fallback: bool,
    pub filter: Option<f64>,
}

impl RefMargin {
    pub fn of(m: &Margin) -> RefMargin {
        RefMargin {
            s: m.scale,
            m1: m.m1,
            m2: m.m2,
            m3: m.m3,
            exact: m.grad_mode == GradMode::Exact,
            fallback: m.fallback == TargetFallback::Monotonic,
            filter: m.interclass_filter.filter(|t| *t > 0.0),
        }
    }

    /// cos θ at or below which the monotonic fallback applies: cos((π − m2) / m1).
    pub fn fallback_cos(&self) -> f64 {
        let theta = (std::f64::consts::PI - self.m2) / self.m1;
        if theta >= std::f64::consts::PI {
            -1.0
        } else {
            theta.cos()
        }
    }

    /// Unscaled target logit of a clamped cosine: cos(m1·θ + m2) − m3, or the fallback.
    pub fn target(&self, c: f64) -> f64 {
        if self.fallback && c <= self.fallback_cos() {
            let pi = std::f64::consts::PI;
            return c - self.m2 * (pi - self.m2).sin() - self.m3;
        }
        (self.m1 * c.acos() + self.m2).cos() - self.m3
    }

    /// d target / d c, exact: m1 · sin(m1·θ + m2) / sin θ (1 on the fallback branch).
    pub fn target_slope(&self, c: f64) -> f64 {
        if self.fallback && c <= self.fallback_cos() {
            return 1.0;
        }
        let theta = c.acos();
        self.m1 * (self.m1 * theta + self.m2).sin() / theta.sin()
    }

    pub fn is_filtered(&self, c: f64) -> bool {
        self.filter.is_some_and(|t| c > t)
    }
}

/// Largest per-row loss: −ln(1e-30), the published implementation's probability floor.
pub const LOSS_CAP: f64 = 69.077_552_789_821_37;

/// Per-row cross-entropy without the floor (to keep finite-difference inputs below it).
pub fn row_losses(
    x: &[f64],
    w: &[f64],
    labels: &[i64],
    dim: usize,
    cols: &[usize],
    m: &RefMargin,
) -> Vec<f64> {
    (0..labels.len())
        .map(|i| {
            ref_eval(
                &x[i * dim..(i + 1) * dim],
                w,
                &labels[i..=i],
                dim,
                cols,
                m,
                false,
            )
            .loss
        })
        .collect()
}

/// Loss and gradients of the reference.
#[derive(Debug, Clone)]
pub struct RefOut {
    pub loss: f64,
    /// [B, d].
    pub grad_x: Vec<f64>,
    /// [C, d], zero outside the sampled columns.
    pub grad_w: Vec<f64>,
    /// [C, d]: per element of a sampled center, the sum over the rows of the magnitudes of
    /// their terms of d loss / d ŵ (the gradient before the normalization's backward): a bound
    /// on that gradient however its terms are summed.
    pub grad_w_hat_abs: Vec<f64>,
}

fn normalize(v: &[f64]) -> (Vec<f64>, f64) {
    let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
    (v.iter().map(|a| a / n).collect(), n)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Backward of v̂ = v / ‖v‖: (g − v̂ (g · v̂)) / ‖v‖.
fn normalize_backward(g: &[f64], v_hat: &[f64], norm: f64) -> Vec<f64> {
    let gd = dot(g, v_hat);
    g.iter()
        .zip(v_hat)
        .map(|(gi, vi)| (gi - vi * gd) / norm)
        .collect()
}

/// The margin-softmax loss over the sampled columns `cols` (sorted global class ids holding
/// every label), in f64. Only the loss, for finite differences.
pub fn ref_loss(
    x: &[f64],
    w: &[f64],
    labels: &[i64],
    dim: usize,
    cols: &[usize],
    m: &RefMargin,
) -> f64 {
    ref_eval(x, w, labels, dim, cols, m, false).loss
}

/// Loss and gradients. With `m.exact` the gradient is the true one (differentiated through the
/// margin); otherwise the straight-through one: d loss / d cos = s·(p − onehot)/B everywhere.
/// In both, the clamp passes no gradient where it clipped and filtered entries pass none.
pub fn reference(
    x: &[f64],
    w: &[f64],
    labels: &[i64],
    dim: usize,
    cols: &[usize],
    m: &RefMargin,
) -> RefOut {
    ref_eval(x, w, labels, dim, cols, m, true)
}

fn ref_eval(
    x: &[f64],
    w: &[f64],
    labels: &[i64],
    dim: usize,
    cols: &[usize],
    m: &RefMargin,
    with_grad: bool,
) -> RefOut {
    let b = labels.len();
    let xs: Vec<(Vec<f64>, f64)> = x.chunks(dim).map(normalize).collect();
    let ws: Vec<(Vec<f64>, f64)> = cols
        .iter()
        .map(|&c| normalize(&w[c * dim..(c + 1) * dim]))
        .collect();
    let mut loss = 0.0;
    let mut grad_x = vec![0.0; b * dim];
    let mut grad_w = vec![0.0; w.len()];
    let mut gw_hat = vec![vec![0.0; dim]; cols.len()];
    let mut gw_hat_abs = vec![0.0; w.len()];
    for (i, (x_hat, x_norm)) in xs.iter().enumerate() {
        let target = cols
            .iter()
            .position(|&c| c as i64 == labels[i])
            .expect("every label is among the columns");
        let raw: Vec<f64> = ws.iter().map(|(w_hat, _)| dot(x_hat, w_hat)).collect();
        let z: Vec<f64> = raw
            .iter()
            .enumerate()
            .map(|(j, &r)| {
                let c = r.clamp(-1.0, 1.0);
                if j == target {
                    m.s * m.target(c)
                } else if m.is_filtered(c) {
                    0.0
                } else {
                    m.s * c
                }
            })
            .collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
        // The published implementation clamps p(target) to 1e-30 before the log (value only).
        loss += (max + sum.ln() - z[target]).min(LOSS_CAP);
        if !with_grad {
            continue;
        }
        let mut gx_hat = vec![0.0; dim];
        for (j, &r) in raw.iter().enumerate() {
            let p = (z[j] - max).exp() / sum;
            let clipped = !(-1.0..=1.0).contains(&r);
            let dz_dc = if clipped {
                0.0
            } else if j == target {
                m.s * if m.exact { m.target_slope(r) } else { 1.0 }
            } else if m.is_filtered(r) {
                0.0
            } else {
                m.s
            };
            let onehot = if j == target { 1.0 } else { 0.0 };
            let g = (p - onehot) / b as f64 * dz_dc;
            let w_hat = &ws[j].0;
            for k in 0..dim {
                gx_hat[k] += g * w_hat[k];
                gw_hat[j][k] += g * x_hat[k];
                gw_hat_abs[cols[j] * dim + k] += (g * x_hat[k]).abs();
            }
        }
        let gx = normalize_backward(&gx_hat, x_hat, *x_norm);
        grad_x[i * dim..(i + 1) * dim].copy_from_slice(&gx);
    }
    if with_grad {
        for (j, &c) in cols.iter().enumerate() {
            let (w_hat, w_norm) = &ws[j];
            let gw = normalize_backward(&gw_hat[j], w_hat, *w_norm);
            grad_w[c * dim..(c + 1) * dim].copy_from_slice(&gw);
        }
    }
    RefOut {
        loss: loss / b as f64,
        grad_x,
        grad_w,
        grad_w_hat_abs: gw_hat_abs,
    }
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| f64::from(a)).collect()
}

/// Asserts `|got − want| <= abs + rel · max|want of its row|` element-wise, and returns the
/// largest fraction of that tolerance used (for the log).
pub fn assert_close_rows(
    what: &str,
    got: &[f64],
    want: &[f64],
    row: usize,
    rel: f64,
    abs: f64,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = 0.0f64;
    for (r, (g_row, w_row)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
        let scale = w_row.iter().fold(0.0f64, |a, &v| a.max(v.abs()));
        for (j, (&g, &w)) in g_row.iter().zip(w_row).enumerate() {
            let err = (g - w).abs();
            let tol = abs + rel * scale;
            assert!(
                err <= tol,
                "{what}[{r}, {j}]: got {g:e}, want {w:e}, err {err:e} > tol {tol:e} (row scale {scale:e})"
            );
            if tol > 0.0 {
                worst = worst.max(err / tol);
            }
        }
    }
    worst
}
