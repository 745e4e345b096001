//! The one-kernel margin softmax of a world of one (`margin_softmax_fused`, online softmax) against
//! the three passes with nothing all-reduced between them, on the CPU backend: same loss and
//! gradient within f32 rounding of the sum, same zero gradient on filtered and clipped entries.

use partial_fc::cpu::margin_softmax::target_logit_slope;
use partial_fc::LogitsShape;
use partial_fc::{Backend, CpuBackend, GradMode, Margin, TargetFallback};

/// xorshift64*: test inputs only.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn margins() -> Vec<Margin> {
    let mut filtered = Margin::arcface();
    filtered.interclass_filter = Some(0.3);
    let mut exact = Margin::combined(64.0, 1.0, 0.3, 0.2);
    exact.grad_mode = GradMode::Exact;
    exact.fallback = TargetFallback::Monotonic;
    exact.interclass_filter = Some(0.25);
    let mut arc_exact = Margin::arcface();
    arc_exact.grad_mode = GradMode::Exact;
    arc_exact.fallback = TargetFallback::Monotonic;
    vec![
        Margin::arcface(),
        Margin::cosface(),
        filtered,
        exact,
        arc_exact,
    ]
}

/// Cosines in [−1.02, 1.02] (clipped entries), with exact ±1 and ±0 entries, one row sorted
/// ascending (the running max moves at every entry), and targets on clipped cosines.
fn inputs(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<f32>, Vec<i32>) {
    let mut logits: Vec<f32> = (0..rows * cols)
        .map(|_| -1.02 + 2.04 * rng.uniform())
        .collect();
    for (k, v) in logits.iter_mut().enumerate() {
        match k % 97 {
            3 => *v = 1.0,
            5 => *v = -1.0,
            7 => *v = 0.0,
            11 => *v = -0.0,
            _ => {}
        }
    }
    if rows > 1 {
        logits[cols..2 * cols].sort_by(f32::total_cmp);
    }
    let labels: Vec<i32> = (0..rows)
        .map(|i| {
            if i % 5 == 4 || cols == 0 {
                -1
            } else {
                (rng.next() % cols as u64) as i32
            }
        })
        .collect();
    // Two targets past the clip (their cosine passes no gradient) and one at exactly 1.
    for (i, raw) in [(0usize, 1.01f32), (2, -1.015), (3, 1.0)] {
        if i < rows && labels[i] >= 0 {
            logits[i * cols + labels[i] as usize] = raw;
        }
    }
    (logits, labels)
}

fn three_passes(
    logits: &[f32],
    rows: usize,
    cols: usize,
    labels: &[i32],
    margin: &Margin,
    grad_scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (b, p) = (CpuBackend, margin.params());
    let mut z = logits.to_vec();
    let (mut max, mut tcos, mut sum, mut loss) = (
        vec![0f32; rows],
        vec![0f32; rows],
        vec![0f32; rows],
        vec![0f32; 2 * rows],
    );
    let labels = labels.to_vec();
    b.margin_rowmax(
        &mut z,
        LogitsShape::dense(rows, cols),
        &labels,
        &p,
        None,
        &mut max,
        &mut tcos,
    )
    .unwrap();
    b.exp_rowsum(&z, LogitsShape::dense(rows, cols), &max, &mut sum)
        .unwrap();
    b.softmax_loss_grad(
        &mut z,
        LogitsShape::dense(rows, cols),
        &labels,
        &p,
        None,
        &max,
        &sum,
        &tcos,
        grad_scale,
        &mut loss,
    )
    .unwrap();
    (z, loss)
}

fn fused(
    logits: &[f32],
    rows: usize,
    cols: usize,
    labels: &[i32],
    margin: &Margin,
    grad_scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut z = logits.to_vec();
    let mut loss = vec![f32::NAN; 2 * rows];
    CpuBackend
        .margin_softmax_fused(
            &mut z,
            LogitsShape::dense(rows, cols),
            &labels.to_vec(),
            &margin.params(),
            None,
            grad_scale,
            &mut loss,
        )
        .unwrap();
    // The second half holds each row's raw target cosine (0 for a row without a target).
    let target_cos = loss.split_off(rows);
    for (i, (&c, &t)) in target_cos.iter().zip(labels).enumerate() {
        let want = usize::try_from(t).map_or(0.0, |t| logits[i * cols + t]);
        assert_eq!(c.to_bits(), want.to_bits(), "row {i}: target cosine");
    }
    (z, loss)
}

/// Whether the three passes give this non-target entry no gradient: filtered, or clipped
/// (|cos| > 1; exactly ±1 is inside the clamp and passes its gradient, as torch's does).
fn dead(raw: f32, margin: &Margin) -> bool {
    let p = margin.params();
    let c = raw.clamp(-1.0, 1.0);
    p.filter.is_some_and(|t| c > t) || raw.abs() > 1.0
}

#[test]
fn fused_matches_three_passes() {
    let mut rng = Rng(4242);
    let (mut dead_seen, mut clipped_targets) = (0usize, 0usize);
    for margin in margins() {
        let s = margin.scale as f32;
        for &(rows, cols) in &[
            (64usize, 1000usize),
            (33, 1001),
            (8, 3),
            (16, 4096),
            (6, 1),
            (4, 17),
        ] {
            let (logits, labels) = inputs(&mut rng, rows, cols);
            let grad_scale = 1.0 / rows as f32;
            let (want_g, want_l) = three_passes(&logits, rows, cols, &labels, &margin, grad_scale);
            let (got_g, got_l) = fused(&logits, rows, cols, &labels, &margin, grad_scale);
            for i in 0..rows {
                let what = format!("{margin:?} {rows}x{cols} row {i}");
                let (g, w) = (got_l[i], want_l[i]);
                assert!(
                    (g - w).abs() <= 1e-6 * s,
                    "{what}: loss fused {g} passes {w}"
                );
                if labels[i] < 0 {
                    assert_eq!(g, 0.0, "{what}: a row without its target has no loss");
                } else {
                    assert!(w >= 0.0, "{what}: loss {w}");
                }
                for j in 0..cols {
                    let k = i * cols + j;
                    let (g, w) = (got_g[k], want_g[k]);
                    let is_target = labels[i] == j as i32;
                    // The row's scale is s · grad_scale; the target's gradient also carries
                    // d logit / d cos (large near cos = 1 with the exact ArcFace gradient).
                    let slope = if is_target && margin.grad_mode == GradMode::Exact {
                        target_logit_slope(logits[k].clamp(-1.0, 1.0), &margin.params())
                            .abs()
                            .max(1.0)
                    } else {
                        1.0
                    };
                    let tol = 1e-6 * s * grad_scale * slope;
                    assert!(
                        (g - w).abs() <= tol,
                        "{what} col {j}: grad fused {g} passes {w}"
                    );
                    if !is_target && dead(logits[k], &margin) {
                        dead_seen += 1;
                        assert_eq!(g.to_bits(), 0, "{what} col {j}: filtered/clipped grad");
                        assert_eq!(w.to_bits(), 0, "{what} col {j}: filtered/clipped grad");
                    }
                    if is_target && !(-1.0..=1.0).contains(&logits[k]) {
                        clipped_targets += 1;
                        // p − 1 times a zero slope.
                        assert_eq!(g, 0.0, "{what}: clipped target grad");
                    }
                }
            }
        }
    }
    assert!(
        dead_seen > 1000,
        "only {dead_seen} filtered/clipped entries"
    );
    assert!(
        clipped_targets > 10,
        "only {clipped_targets} clipped targets"
    );
}

#[test]
fn fused_row_sums_to_the_softmax() {
    // Without filter or clip, each row's gradient is (softmax − onehot) · s · grad_scale: it sums
    // to 0 and its non-target entries are positive. A check of the fused kernel on its own.
    let mut rng = Rng(7);
    let (rows, cols) = (12usize, 777usize);
    let logits: Vec<f32> = (0..rows * cols)
        .map(|_| -0.9 + 1.8 * rng.uniform())
        .collect();
    let labels: Vec<i32> = (0..rows).map(|i| (i * 61 % cols) as i32).collect();
    let margin = Margin::cosface();
    let (g, loss) = fused(&logits, rows, cols, &labels, &margin, 1.0);
    let s = margin.scale as f32;
    for i in 0..rows {
        let row = &g[i * cols..(i + 1) * cols];
        let total: f64 = row.iter().map(|&v| f64::from(v)).sum();
        assert!(total.abs() < 1e-4 * f64::from(s), "row {i} sums to {total}");
        let t = labels[i] as usize;
        let p_target = row[t] / s + 1.0;
        assert!(
            ((-loss[i]).exp() - p_target).abs() < 1e-5,
            "row {i}: loss {} vs p {p_target}",
            loss[i]
        );
        assert!(row.iter().enumerate().all(|(j, &v)| j == t || v > 0.0));
    }
}

#[test]
fn fused_handles_empty_shapes() {
    let margin = Margin::arcface();
    let (g, loss) = fused(&[], 3, 0, &[-1, -1, -1], &margin, 1.0);
    assert!(g.is_empty());
    assert_eq!(loss, vec![0.0; 3]);
    let (g, loss) = fused(&[], 0, 5, &[], &margin, 1.0);
    assert!(g.is_empty() && loss.is_empty());
}
