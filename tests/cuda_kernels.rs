//! Every CUDA kernel against its CPU reference on the same random inputs, the whole generic step
//! on both backends, and the golden files on the GPU. Without a device every test prints
//! "skipped: no CUDA device (...)" and returns.
#![cfg(feature = "cuda")]

/// Prints past the test harness's output capture (which only intercepts the print macros),
/// so a skipped test says so in a plain `cargo test` run.
macro_rules! skip {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod golden_support;

use golden_support::{assert_close_in_row, golden_files};
use partial_fc::collective::SingleRank;
use partial_fc::cuda::CudaBackend;
use partial_fc::golden::{read_expected, StepCase};
use partial_fc::plan::Dtype;
use partial_fc::LogitsShape;
use partial_fc::{
    Backend, CpuBackend, GradMode, LayerConfig, Margin, NegativeSampler, PartialFc, SampleArgs,
    StateBuf, StateDtype, TargetFallback, UpdateMode,
};

mod cuda_device;
use cuda_device::gpu;

mod hard_sample;
use hard_sample::{check_hard_sample, Pass};

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
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect()
    }
}

/// A label per row, every fifth row without one (-1).
fn row_labels(rng: &mut Rng, rows: usize, cols: usize) -> Vec<i32> {
    (0..rows)
        .map(|i| {
            if i % 5 == 4 {
                -1
            } else {
                (rng.next() % cols as u64) as i32
            }
        })
        .collect()
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= abs + rel * w.abs() || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}[{i}]: gpu {g} cpu {w}");
    }
}

fn up<T: partial_fc::Elem>(g: &CudaBackend, host: &[T]) -> cudarc::driver::CudaSlice<T> {
    let mut b = g.alloc(host.len()).unwrap();
    g.upload(host, &mut b).unwrap();
    b
}

#[test]
fn sampled_index_is_bit_identical() {
    let Some(g) = gpu() else { return };
    check_sampler(
        &g,
        &[
            (1000usize, 0.1f64, 64usize, 1u64, 0.0f32),
            (1000, 0.0, 64, 2, 0.0),
            (4097, 0.3, 128, 3, 0.0),
            (50_000, 0.05, 512, 4, 0.0),
            (1 << 20, 0.1, 1024, 5, 0.0),
            (1_000_003, 0.1, 2048, 6, 0.0),
            (20_000, 0.1, 256, 7, 0.5),
            (20_000, 0.2, 256, 8, 1.0),
            (300, 0.01, 1024, 9, 0.0),  // positives exceed S
            (1000, 0.0, 0, 10, 0.0),    // S = 0: nothing selected
            (5000, 0.2, 4096, 11, 0.0), // more rows than compact_selected remaps itself
            (5000, 0.2, 4096, 12, 0.5),
        ],
        |_| Some(false),
    );
}

/// The plain sampler's candidate list overflowing (none kept, or fewer than the first digit's
/// bin holds): `select_candidates` then walks all keys, with the same result.
#[test]
fn sampler_candidate_overflow_gives_the_same_index() {
    for len in [0, 7] {
        let Some(g) = gpu() else { return };
        // With no room every call with a candidate overflows; with 7, the 50,000-class shard
        // (about 49 keys per first-digit bin) does.
        check_sampler(
            &g.with_sampler_candidates(len),
            &[
                (1000usize, 0.1f64, 64usize, 1u64, 0.0f32),
                (4097, 0.3, 128, 3, 0.0),
                (50_000, 0.05, 512, 4, 0.0),
                (300, 0.01, 1024, 9, 0.0),
                (1000, 0.0, 0, 10, 0.0),
            ],
            |shard| (shard == 50_000).then_some(true),
        );
    }
}

/// The GPU sampler against the CPU's on each `(shard, rate, rows, seed, hard fraction)`: the
/// same count, sampled index and remapped labels, bit for bit.
/// `overflows`: whether the candidate list must overflow (checked where given).
fn check_sampler(
    g: &CudaBackend,
    cases: &[(usize, f64, usize, u64, f32)],
    overflows: impl Fn(usize) -> Option<bool>,
) {
    let cpu = CpuBackend;
    for &(shard, rate, rows, seed, hard) in cases {
        let g_overflows = overflows(shard);
        let mut rng = Rng(seed * 7919 + 1);
        let labels: Vec<i32> = (0..rows)
            .map(|_| {
                if rng.uniform() < 0.2 {
                    -1
                } else {
                    (rng.next() % shard as u64) as i32
                }
            })
            .collect();
        let scores: Vec<f32> = rng.vec(shard, -1.0, 1.0);
        let args = SampleArgs {
            shard_len: shard,
            shard_start: 12_345,
            num_sample: (rate * shard as f64) as usize,
            rows,
            seed,
            step: seed * 3,
            hard_fraction: hard,
        };
        let (mut cl, mut ck, mut cs) = (labels.clone(), vec![0u64; shard], vec![0i32; shard]);
        let hard_scores = (hard > 0.0).then_some(&scores);
        let n_cpu = cpu
            .sample_classes(&args, &mut cl, hard_scores, &mut ck, &mut cs)
            .unwrap();
        let (mut gl, mut gk, mut gs) = (
            up(g, &labels),
            g.alloc(shard).unwrap(),
            g.alloc(shard).unwrap(),
        );
        let gscores = up(g, &scores);
        let n_gpu = g
            .sample_classes(
                &args,
                &mut gl,
                (hard > 0.0).then_some(&gscores),
                &mut gk,
                &mut gs,
            )
            .unwrap();
        assert_eq!(n_gpu, n_cpu, "sample size, shard {shard} r {rate}");
        assert_eq!(
            g.download(&gs, n_gpu).unwrap(),
            cs[..n_cpu],
            "sampled index, shard {shard} r {rate} hard {hard}"
        );
        assert_eq!(
            g.download(&gl, rows).unwrap(),
            cl,
            "remapped labels, shard {shard}"
        );
        // Which path the plain sampler took: the candidate list fits (the fast path, which a
        // change of the first digit or of the list's length could silently lose) or not.
        if hard == 0.0 && n_cpu < shard {
            let (seen, len) = g
                .sampler_candidates_seen()
                .unwrap()
                .expect("a plain call ran");
            let overflowed = seen > len as u64;
            if let Some(want) = g_overflows {
                assert_eq!(
                    overflowed, want,
                    "shard {shard}: {seen} candidates, list of {len}"
                );
            }
        }
    }
}

#[test]
fn localize_labels_matches_cpu() {
    let Some(g) = gpu() else { return };
    let global: Vec<i64> = vec![-5, 0, 99, 100, 150, 199, 200, 1 << 40, i64::MIN, 120];
    let mut want = vec![0i32; global.len()];
    CpuBackend
        .localize_labels(&global, global.len(), 100, 100, &mut want)
        .unwrap();
    let mut local = g.alloc(global.len()).unwrap();
    g.localize_labels(&up(&g, &global), global.len(), 100, 100, &mut local)
        .unwrap();
    assert_eq!(g.download(&local, global.len()).unwrap(), want);
}

#[test]
fn normalize_gather_and_backward_match_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(11);
    // Rows not a multiple of a block's 8 warps; rows that are and are not 16-byte aligned, with
    // and without a tail past the last quad, and unaligned rows of more than 32 quads.
    for &(rows, dim) in &[(37usize, 512usize), (5, 3), (300, 129), (40, 515)] {
        let x = rng.vec(rows * dim, -2.0, 2.0);
        let (mut out, mut norms) = (vec![0f32; rows * dim], vec![0f32; rows]);
        cpu.normalize_rows(&x, rows, dim, &mut out, &mut norms)
            .unwrap();
        let (mut gout, mut gnorms) = (g.alloc(rows * dim).unwrap(), g.alloc(rows).unwrap());
        g.normalize_rows(&up(&g, &x), rows, dim, &mut gout, &mut gnorms)
            .unwrap();
        assert_close(
            "normalize out",
            &g.download(&gout, rows * dim).unwrap(),
            &out,
            1e-4,
            1e-6,
        );
        assert_close(
            "normalize norms",
            &g.download(&gnorms, rows).unwrap(),
            &norms,
            1e-4,
            1e-6,
        );

        let index: Vec<i32> = (0..rows as i32).filter(|i| i % 3 != 1).collect();
        let count = index.len();
        let (mut gw, mut gn) = (vec![0f32; count * dim], vec![0f32; count]);
        cpu.gather_normalize_rows(&x, dim, &index, count, &mut gw, &mut gn)
            .unwrap();
        let (mut dgw, mut dgn) = (g.alloc(count * dim).unwrap(), g.alloc(count).unwrap());
        g.gather_normalize_rows(&up(&g, &x), dim, &up(&g, &index), count, &mut dgw, &mut dgn)
            .unwrap();
        assert_close(
            "gather out",
            &g.download(&dgw, count * dim).unwrap(),
            &gw,
            1e-4,
            1e-6,
        );
        assert_close(
            "gather norms",
            &g.download(&dgn, count).unwrap(),
            &gn,
            1e-4,
            1e-6,
        );

        let grad = rng.vec(rows * dim, -1.0, 1.0);
        let mut want = grad.clone();
        cpu.normalize_backward(&mut want, &out, &norms, rows, dim)
            .unwrap();
        let mut dgrad = up(&g, &grad);
        g.normalize_backward(&mut dgrad, &up(&g, &out), &up(&g, &norms), rows, dim)
            .unwrap();
        assert_close(
            "normalize_backward",
            &g.download(&dgrad, rows * dim).unwrap(),
            &want,
            1e-4,
            1e-6,
        );
    }
}

#[test]
fn gemms_match_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(13);
    for &(m, n, k) in &[
        (7usize, 5usize, 3usize),
        (64, 300, 129),
        (1, 1, 1),
        (33, 17, 512),
    ] {
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(n * k, -1.0, 1.0);
        let mut want = vec![0f32; m * n];
        let mut c = g.alloc(m * n).unwrap();
        cpu.gemm_nt(m, n, k, &a, &b, &mut want).unwrap();
        g.gemm_nt(m, n, k, &up(&g, &a), &up(&g, &b), &mut c)
            .unwrap();
        assert_close(
            "gemm_nt",
            &g.download(&c, m * n).unwrap(),
            &want,
            1e-4,
            1e-5,
        );
        cpu.gemm_nn(m, n, k, &a, &b, &mut want).unwrap();
        g.gemm_nn(m, n, k, &up(&g, &a), &up(&g, &b), &mut c)
            .unwrap();
        assert_close(
            "gemm_nn",
            &g.download(&c, m * n).unwrap(),
            &want,
            1e-4,
            1e-5,
        );
        cpu.gemm_tn(m, n, k, &a, &b, &mut want).unwrap();
        g.gemm_tn(m, n, k, &up(&g, &a), &up(&g, &b), &mut c)
            .unwrap();
        assert_close(
            "gemm_tn",
            &g.download(&c, m * n).unwrap(),
            &want,
            1e-4,
            1e-5,
        );
    }
}

fn margins() -> Vec<Margin> {
    let mut v = vec![
        Margin::arcface(),
        Margin::cosface(),
        Margin::combined(30.0, 1.2, 0.3, 0.1),
    ];
    let mut f = Margin::arcface();
    f.interclass_filter = Some(0.3);
    v.push(f);
    let mut e = Margin::arcface();
    e.grad_mode = GradMode::Exact;
    e.fallback = TargetFallback::Monotonic;
    v.push(e);
    v
}

#[test]
fn margin_softmax_passes_match_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(17);
    for margin in margins() {
        let p = margin.params();
        for &(rows, cols) in &[(64usize, 1000usize), (33, 1001), (8, 3), (16, 4096)] {
            // Cosines slightly outside [-1, 1] exercise the clip; exact 0s the filter's sign rule.
            let mut logits = rng.vec(rows * cols, -1.02, 1.02);
            logits[1] = 0.0;
            let labels = row_labels(&mut rng, rows, cols);
            let (mut lc, mut mx, mut tc) = (logits.clone(), vec![0f32; rows], vec![0f32; rows]);
            cpu.margin_rowmax(
                &mut lc,
                LogitsShape::dense(rows, cols),
                &labels,
                &p,
                None,
                &mut mx,
                &mut tc,
            )
            .unwrap();
            let (mut lg, dl) = (up(&g, &logits), up(&g, &labels));
            let (mut gmx, mut gtc) = (g.alloc(rows).unwrap(), g.alloc(rows).unwrap());
            g.margin_rowmax(
                &mut lg,
                LogitsShape::dense(rows, cols),
                &dl,
                &p,
                None,
                &mut gmx,
                &mut gtc,
            )
            .unwrap();
            let glc = g.download(&lg, rows * cols).unwrap();
            assert_close("pass1 logits", &glc, &lc, 1e-4, 1e-5);
            let signs = |v: &[f32]| {
                v.iter()
                    .map(|z| z.to_bits() == 0x8000_0000)
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                signs(&glc),
                signs(&lc),
                "filtered (-0.0) encoding, {margin:?}"
            );
            assert_close(
                "pass1 row_max",
                &g.download(&gmx, rows).unwrap(),
                &mx,
                1e-4,
                1e-6,
            );
            assert_close(
                "pass1 target_cos",
                &g.download(&gtc, rows).unwrap(),
                &tc,
                0.0,
                0.0,
            );

            let mut sum = vec![0f32; rows];
            cpu.exp_rowsum(&lc, LogitsShape::dense(rows, cols), &mx, &mut sum)
                .unwrap();
            let mut gsum = g.alloc(rows).unwrap();
            g.exp_rowsum(&lg, LogitsShape::dense(rows, cols), &gmx, &mut gsum)
                .unwrap();
            assert_close(
                "pass2 row_sum",
                &g.download(&gsum, rows).unwrap(),
                &sum,
                1e-4,
                1e-6,
            );

            let mut loss = vec![0f32; 2 * rows];
            let gs = 1.0 / rows as f32;
            cpu.softmax_loss_grad(
                &mut lc,
                LogitsShape::dense(rows, cols),
                &labels,
                &p,
                None,
                &mx,
                &sum,
                &tc,
                gs,
                &mut loss,
            )
            .unwrap();
            let mut gloss = g.alloc(2 * rows).unwrap();
            g.softmax_loss_grad(
                &mut lg,
                LogitsShape::dense(rows, cols),
                &dl,
                &p,
                None,
                &gmx,
                &gsum,
                &gtc,
                gs,
                &mut gloss,
            )
            .unwrap();
            assert_close(
                "pass3 loss",
                &g.download(&gloss, 2 * rows).unwrap(),
                &loss,
                1e-4,
                1e-6,
            );
            assert_close(
                "pass3 grad",
                &g.download(&lg, rows * cols).unwrap(),
                &lc,
                1e-4,
                1e-6,
            );
        }
    }
}

/// A 16-bit gradient against its CPU twin: every entry within one 16-bit step (`rel`, `abs`).
/// A target entry, `(p − 1)·slope` with `slope = s·d logit/d c`, may also differ by
/// `slope·Δp`: `p = e^(z−max)/sum`, and both devices round their row sums, in different orders,
/// by up to `cols·2⁻²⁴` each, so `Δp ≤ (2·cols + 4)·2⁻²⁴`; where `p ≈ 1` that is all of `p − 1`.
#[allow(clippy::too_many_arguments)]
#[track_caller]
fn assert_grad16(
    what: &str,
    got: &[f32],
    want: &[f32],
    cos: &[f32],
    labels: &[i32],
    (rel, abs): (f32, f32),
    p: &partial_fc::MarginParams,
) {
    use partial_fc::cpu::margin_softmax::target_logit_slope;
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let cols = got.len() / labels.len();
    // p's relative rounding: the row sum's and exp's (2·cols + 4 ulps), and exp's argument
    // s·c − max, which a GPU may compute in one FMA where the CPU rounds s·c first: an error of
    // up to ulp(s) in the exponent, ~2·s ulps of p.
    let rounding = (2.0 * cols as f32 + 4.0 + 2.0 * p.scale) * 2f32.powi(-24);
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let target = labels[k / cols] == (k % cols) as i32;
        let slope = match (target, p.exact_grad) {
            (false, _) => 0.0,
            (true, false) => p.scale,
            (true, true) => p.scale * target_logit_slope(cos[k].clamp(-1.0, 1.0), p).abs(),
        };
        let tol = abs + rel * w.abs() + slope * rounding;
        let ok = (g - w).abs() <= tol || (g.is_nan() && w.is_nan());
        assert!(
            ok,
            "{what}[{k}] (target: {target}): gpu {g} cpu {w}, bound {tol:e}"
        );
    }
}

/// The 16-bit softmax kernels (`*16`, bf16 and f16 cosines) against their CPU twins: row
/// statistics and loss within 1e-4 relative; each gradient within one step of its 16-bit type
/// (2⁻⁷ relative for bf16, 2⁻¹⁰ for f16, plus f16's subnormal step), since the GPU's `expf` may
/// put the f32 value on the other side of a rounding boundary; and the three passes and the one
/// kernel both checked, with rows whose length is and is not a multiple of 4 (vector and scalar
/// paths).
#[test]
fn margin_softmax16_kernels_match_cpu() {
    use partial_fc::cpu::margin_softmax16::{narrow, widen};
    use partial_fc::plan::Dtype;
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(41);
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let (rel, abs) = match dtype {
            Dtype::Bf16 => (2f32.powi(-7), 1e-30),
            _ => (2f32.powi(-10), 2f32.powi(-24)),
        };
        for margin in margins() {
            let p = margin.params();
            for &(rows, cols) in &[(64usize, 1000usize), (33, 1001), (8, 3), (16, 4096)] {
                let cos: Vec<u16> = rng
                    .vec(rows * cols, -1.02, 1.02)
                    .iter()
                    .map(|&v| narrow(v, dtype))
                    .collect();
                let labels = row_labels(&mut rng, rows, cols);
                let what = format!("{dtype:?} {rows}x{cols} {margin:?}");
                let dl = up(&g, &labels);
                let (mut mx, mut tc, mut sum, mut loss) = (
                    vec![0f32; rows],
                    vec![0f32; rows],
                    vec![0f32; rows],
                    vec![0f32; 2 * rows],
                );
                let mut c = cos.clone();
                cpu.margin_rowmax16(
                    &c,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &labels,
                    &p,
                    None,
                    &mut mx,
                    &mut tc,
                )
                .unwrap();
                cpu.exp_rowsum16(
                    &c,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &labels,
                    &p,
                    None,
                    &mx,
                    &mut sum,
                )
                .unwrap();
                cpu.softmax_loss_grad16(
                    &mut c,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &labels,
                    &p,
                    None,
                    &mx,
                    &sum,
                    &tc,
                    1.0,
                    &mut loss,
                )
                .unwrap();
                let mut gc = up(&g, &cos);
                let (mut gmx, mut gtc) = (g.alloc(rows).unwrap(), g.alloc(rows).unwrap());
                let (mut gsum, mut gloss) = (g.alloc(rows).unwrap(), g.alloc(2 * rows).unwrap());
                g.margin_rowmax16(
                    &gc,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &dl,
                    &p,
                    None,
                    &mut gmx,
                    &mut gtc,
                )
                .unwrap();
                assert_eq!(
                    g.download(&gc, rows * cols).unwrap(),
                    cos,
                    "{what}: pass 1 wrote"
                );
                g.exp_rowsum16(
                    &gc,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &dl,
                    &p,
                    None,
                    &gmx,
                    &mut gsum,
                )
                .unwrap();
                g.softmax_loss_grad16(
                    &mut gc,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &dl,
                    &p,
                    None,
                    &gmx,
                    &gsum,
                    &gtc,
                    1.0,
                    &mut gloss,
                )
                .unwrap();
                let down = |b: &cudarc::driver::CudaSlice<f32>| g.download(b, rows).unwrap();
                assert_close(&format!("{what}: row_max"), &down(&gmx), &mx, 1e-4, 1e-6);
                assert_close(&format!("{what}: target_cos"), &down(&gtc), &tc, 0.0, 0.0);
                assert_close(&format!("{what}: row_sum"), &down(&gsum), &sum, 1e-4, 1e-6);
                assert_close(
                    &format!("{what}: loss"),
                    &g.download(&gloss, 2 * rows).unwrap(),
                    &loss,
                    1e-4,
                    1e-6,
                );
                let wide = |v: &[u16]| v.iter().map(|&b| widen(b, dtype)).collect::<Vec<_>>();
                let grad = wide(&g.download(&gc, rows * cols).unwrap());
                assert_grad16(
                    &format!("{what}: grad"),
                    &grad,
                    &wide(&c),
                    &wide(&cos),
                    &labels,
                    (rel, abs),
                    &p,
                );

                let (mut c, mut loss) = (cos.clone(), vec![0f32; 2 * rows]);
                cpu.margin_softmax_fused16(
                    &mut c,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &labels,
                    &p,
                    None,
                    1.0,
                    &mut loss,
                )
                .unwrap();
                let mut gc = up(&g, &cos);
                g.margin_softmax_fused16(
                    &mut gc,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &dl,
                    &p,
                    None,
                    1.0,
                    &mut gloss,
                )
                .unwrap();
                assert_close(
                    &format!("{what}: fused loss"),
                    &g.download(&gloss, 2 * rows).unwrap(),
                    &loss,
                    1e-4,
                    1e-6,
                );
                let grad = wide(&g.download(&gc, rows * cols).unwrap());
                let what = format!("{what}: fused grad");
                assert_grad16(
                    &what,
                    &grad,
                    &wide(&c),
                    &wide(&cos),
                    &labels,
                    (rel, abs),
                    &p,
                );
            }
        }
    }
}

/// The world-of-one kernel (`margin_softmax_fused`, online softmax) against its CPU twin: loss
/// and gradient within 1e-4 relative, and exactly zero gradient on filtered and clipped entries.
#[test]
fn margin_softmax_fused_matches_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(23);
    let mut dead_seen = 0usize;
    for margin in margins() {
        let p = margin.params();
        for &(rows, cols) in &[(64usize, 1000usize), (33, 1001), (8, 3), (16, 4096), (5, 1)] {
            let mut logits = rng.vec(rows * cols, -1.02, 1.02);
            logits[0] = 1.0;
            if rows > 1 {
                // Ascending: the running max moves at every entry of this row.
                logits[cols..2 * cols].sort_by(f32::total_cmp);
            }
            let labels = row_labels(&mut rng, rows, cols);
            let gs = 1.0 / rows as f32;
            let (mut lc, mut loss) = (logits.clone(), vec![0f32; 2 * rows]);
            cpu.margin_softmax_fused(
                &mut lc,
                LogitsShape::dense(rows, cols),
                &labels,
                &p,
                None,
                gs,
                &mut loss,
            )
            .unwrap();
            let (mut lg, dl) = (up(&g, &logits), up(&g, &labels));
            let mut gloss = up(&g, &vec![f32::NAN; 2 * rows]);
            g.margin_softmax_fused(
                &mut lg,
                LogitsShape::dense(rows, cols),
                &dl,
                &p,
                None,
                gs,
                &mut gloss,
            )
            .unwrap();
            let glc = g.download(&lg, rows * cols).unwrap();
            assert_close(
                "fused loss",
                &g.download(&gloss, 2 * rows).unwrap(),
                &loss,
                1e-4,
                1e-6,
            );
            assert_close("fused grad", &glc, &lc, 1e-4, 1e-6);
            for (k, &raw) in logits.iter().enumerate() {
                let c = raw.clamp(-1.0, 1.0);
                // clipped is |cos| > 1: exactly ±1 passes its gradient (torch's clamp backward)
                let dead = p.filter.is_some_and(|t| c > t) || raw.abs() > 1.0;
                if dead && labels[k / cols] != (k % cols) as i32 {
                    dead_seen += 1;
                    assert_eq!(
                        glc[k].to_bits(),
                        0,
                        "{margin:?}: filtered/clipped grad at {k}"
                    );
                }
            }
        }
    }
    assert!(dead_seen > 100, "only {dead_seen} filtered/clipped entries");
}

/// The class columns of a padded `rows × ld` buffer, and its padding columns.
type Slice<T> = cudarc::driver::CudaSlice<T>;

fn split_padded<T: Copy>(v: &[T], shape: LogitsShape) -> (Vec<T>, Vec<T>) {
    let (mut values, mut pad) = (Vec::new(), Vec::new());
    for row in v[..shape.rows * shape.ld].chunks(shape.ld) {
        values.extend_from_slice(&row[..shape.cols]);
        pad.extend_from_slice(&row[shape.cols..]);
    }
    (values, pad)
}

/// Every softmax kernel on padded rows (`LogitsShape`, rows `ld > cols` apart: the layer's
/// layout) against its CPU twin on the same buffer: the vector path with a masked last vector
/// (`ld % 4 == 0`, `cols % 4 != 0`), the scalar path with padding (`ld % 4 != 0`), and a
/// padding of cosines 3.0 (a logit above every real one, were it read) or NaN. Class columns as
/// in the dense tests above; the padding bit for bit: left as it was by the passes that only read
/// or write logits, +0.0 after the passes that write the gradient (tests/logits_padding.rs shows
/// the CPU twins compute on padded rows exactly what they compute on dense ones).
#[test]
fn padded_logits_rows_match_cpu() {
    use partial_fc::cpu::margin_softmax16::{narrow, widen};
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(59);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let shapes = [
        (33, 1001, 1008),
        (5, 13, 15),
        (8, 3, 8),
        (16, 4093, 4096),
        (4, 1000, 1008), // whole vectors of padding
    ];
    for (rows, cols, ld) in shapes {
        let shape = LogitsShape { rows, cols, ld };
        for (margin, pad) in margins()
            .into_iter()
            .zip([3.0, f32::NAN].into_iter().cycle())
        {
            let p = margin.params();
            let what = format!("{rows}x{cols} ld {ld} pad {pad} {margin:?}");
            let mut logits = rng.vec(rows * ld, -1.02, 1.02);
            for row in logits.chunks_mut(ld) {
                row[cols..].fill(pad);
            }
            let labels = row_labels(&mut rng, rows, cols);
            let dl = up(&g, &labels);
            let gs = 1.0 / rows as f32;
            let down = |b: &cudarc::driver::CudaSlice<f32>, n| g.download(b, n).unwrap();
            // A per-row statistic (max, sum, loss) against the CPU's.
            let rows_close = |what: String, gb: &Slice<f32>, want: &[f32]| {
                assert_close(&what, &down(gb, want.len()), want, 1e-4, 1e-6)
            };
            // A gradient-writing pass: class columns and loss as the CPU's, +0.0 in the padding.
            let check_f32 =
                |stage: &str, lg: &Slice<f32>, lc: &[f32], gloss: &Slice<f32>, loss: &[f32]| {
                    let ((gv, gp), (cv, _)) = (
                        split_padded(&down(lg, rows * ld), shape),
                        split_padded(lc, shape),
                    );
                    assert_close(&format!("{what}: {stage}"), &gv, &cv, 1e-4, 1e-6);
                    let zero = gp.iter().all(|v| v.to_bits() == 0);
                    assert!(zero, "{what}: {stage} padding {gp:?}");
                    rows_close(format!("{what}: {stage} loss"), gloss, loss);
                };

            // f32: the three passes.
            let (mut lc, mut mx, mut tc) = (logits.clone(), vec![0f32; rows], vec![0f32; rows]);
            let (mut sum, mut loss) = (vec![0f32; rows], vec![0f32; 2 * rows]);
            cpu.margin_rowmax(&mut lc, shape, &labels, &p, None, &mut mx, &mut tc)
                .unwrap();
            let mut lg = up(&g, &logits);
            let (mut gmx, mut gtc) = (g.alloc(rows).unwrap(), g.alloc(rows).unwrap());
            let (mut gsum, mut gloss) = (g.alloc(rows).unwrap(), g.alloc(2 * rows).unwrap());
            g.margin_rowmax(&mut lg, shape, &dl, &p, None, &mut gmx, &mut gtc)
                .unwrap();
            let ((gv, gp), (cv, cp)) = (
                split_padded(&down(&lg, rows * ld), shape),
                split_padded(&lc, shape),
            );
            assert_close(&format!("{what}: pass 1"), &gv, &cv, 1e-4, 1e-5);
            assert_eq!(bits(&gp), bits(&cp), "{what}: pass 1 padding");
            rows_close(format!("{what}: row max"), &gmx, &mx);
            cpu.exp_rowsum(&lc, shape, &mx, &mut sum).unwrap();
            g.exp_rowsum(&lg, shape, &gmx, &mut gsum).unwrap();
            rows_close(format!("{what}: row sum"), &gsum, &sum);
            cpu.softmax_loss_grad(
                &mut lc, shape, &labels, &p, None, &mx, &sum, &tc, gs, &mut loss,
            )
            .unwrap();
            g.softmax_loss_grad(
                &mut lg, shape, &dl, &p, None, &gmx, &gsum, &gtc, gs, &mut gloss,
            )
            .unwrap();
            check_f32("pass 3", &lg, &lc, &gloss, &loss);

            // f32: the one kernel.
            let mut lc = logits.clone();
            cpu.margin_softmax_fused(&mut lc, shape, &labels, &p, None, gs, &mut loss)
                .unwrap();
            let mut lg = up(&g, &logits);
            g.margin_softmax_fused(&mut lg, shape, &dl, &p, None, gs, &mut gloss)
                .unwrap();
            check_f32("fused", &lg, &lc, &gloss, &loss);

            // 16-bit: the three passes and the one kernel.
            for dtype in [Dtype::Bf16, Dtype::F16] {
                let what = format!("{what} {dtype:?}");
                let rounding = match dtype {
                    Dtype::Bf16 => (2f32.powi(-7), 1e-30),
                    _ => (2f32.powi(-10), 2f32.powi(-24)),
                };
                let cos: Vec<u16> = logits.iter().map(|&v| narrow(v, dtype)).collect();
                let wide = |v: &[u16]| v.iter().map(|&b| widen(b, dtype)).collect::<Vec<_>>();
                let (cos_values, _) = split_padded(&wide(&cos), shape);
                // As `check_f32`, each gradient within one 16-bit step (`assert_grad16`).
                let check16 =
                    |stage: &str, gc: &Slice<u16>, c: &[u16], gloss: &Slice<f32>, loss: &[f32]| {
                        let (gv, gp) = split_padded(&g.download(gc, rows * ld).unwrap(), shape);
                        let (cv, _) = split_padded(c, shape);
                        let what = format!("{what}: {stage}");
                        let (gw, cw) = (wide(&gv), wide(&cv));
                        assert_grad16(&what, &gw, &cw, &cos_values, &labels, rounding, &p);
                        assert!(gp.iter().all(|&b| b == 0), "{what}: padding {gp:?}");
                        rows_close(format!("{what} loss"), gloss, loss);
                    };
                let mut c = cos.clone();
                cpu.margin_rowmax16(&c, shape, dtype, &labels, &p, None, &mut mx, &mut tc)
                    .unwrap();
                cpu.exp_rowsum16(&c, shape, dtype, &labels, &p, None, &mx, &mut sum)
                    .unwrap();
                cpu.softmax_loss_grad16(
                    &mut c, shape, dtype, &labels, &p, None, &mx, &sum, &tc, 1.0, &mut loss,
                )
                .unwrap();
                let mut gc = up(&g, &cos);
                g.margin_rowmax16(&gc, shape, dtype, &dl, &p, None, &mut gmx, &mut gtc)
                    .unwrap();
                g.exp_rowsum16(&gc, shape, dtype, &dl, &p, None, &gmx, &mut gsum)
                    .unwrap();
                rows_close(format!("{what}: row max"), &gmx, &mx);
                rows_close(format!("{what}: row sum"), &gsum, &sum);
                g.softmax_loss_grad16(
                    &mut gc, shape, dtype, &dl, &p, None, &gmx, &gsum, &gtc, 1.0, &mut gloss,
                )
                .unwrap();
                check16("pass 3", &gc, &c, &gloss, &loss);

                let mut c = cos.clone();
                cpu.margin_softmax_fused16(&mut c, shape, dtype, &labels, &p, None, 1.0, &mut loss)
                    .unwrap();
                let mut gc = up(&g, &cos);
                g.margin_softmax_fused16(&mut gc, shape, dtype, &dl, &p, None, 1.0, &mut gloss)
                    .unwrap();
                check16("fused", &gc, &c, &gloss, &loss);
            }
        }
    }
}

#[test]
fn optimizer_and_scatter_match_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(19);
    let (shard, dim) = (500usize, 65usize);
    let index: Vec<i32> = (0..shard as i32).filter(|i| i % 7 == 2).collect();
    let count = index.len();
    let w = rng.vec(shard * dim, -0.1, 0.1);
    let v = rng.vec(shard * dim, -0.01, 0.01);
    let rows = rng.vec(count * dim, -1.0, 1.0);
    let (lr, mu, wd) = (0.1f32, 0.9f32, 5e-4f32);

    let mut dense = vec![1f32; shard * dim];
    cpu.scatter_rows(&rows, &index, count, dim, &mut dense, shard)
        .unwrap();
    let mut gdense = up(&g, &vec![1f32; shard * dim]);
    g.scatter_rows(
        &up(&g, &rows),
        &up(&g, &index),
        count,
        dim,
        &mut gdense,
        shard,
    )
    .unwrap();
    assert_eq!(g.download(&gdense, shard * dim).unwrap(), dense);

    // scatter_add_rows onto a gradient already summed (one f32 add per element: exact on both).
    let mut sum = rng.vec(shard * dim, -1.0, 1.0);
    let mut gsum = up(&g, &sum);
    cpu.scatter_add_rows(&rows, &index, count, dim, &mut sum, shard)
        .unwrap();
    g.scatter_add_rows(
        &up(&g, &rows),
        &up(&g, &index),
        count,
        dim,
        &mut gsum,
        shard,
    )
    .unwrap();
    assert_eq!(g.download(&gsum, shard * dim).unwrap(), sum);

    // Both momentum storage dtypes. A bf16 momentum may differ by one bf16 step (≤ 2⁻⁷ relative)
    // where the GPU's fused multiply-add puts the f32 value on the other side of a rounding tie;
    // the weights, moved by the unrounded value, stay within the f32 bound.
    for dtype in [StateDtype::F32, StateDtype::Bf16] {
        let v_tol = match dtype {
            StateDtype::F32 => 1e-4,
            StateDtype::Bf16 => 2f32.powi(-7),
        };
        let state = |b: &CpuBackend| {
            let mut s = StateBuf::alloc(b, dtype, shard * dim).unwrap();
            s.upload(b, &v).unwrap();
            s
        };
        let gstate = || {
            let mut s = StateBuf::alloc(&g, dtype, shard * dim).unwrap();
            s.upload(&g, &v).unwrap();
            s
        };
        let (mut cw, mut cv) = (w.clone(), state(&cpu));
        cpu.sgd_momentum_sparse(&mut cw, &mut cv, &rows, &index, count, dim, lr, mu, wd)
            .unwrap();
        let (mut gw, mut gv) = (up(&g, &w), gstate());
        g.sgd_momentum_sparse(
            &mut gw,
            &mut gv,
            &up(&g, &rows),
            &up(&g, &index),
            count,
            dim,
            lr,
            mu,
            wd,
        )
        .unwrap();
        assert_close(
            &format!("sparse weight, {dtype} momentum"),
            &g.download(&gw, shard * dim).unwrap(),
            &cw,
            1e-4,
            1e-6,
        );
        assert_close(
            &format!("sparse momentum, {dtype}"),
            &gv.download(&g, shard * dim).unwrap(),
            &cv.download(&cpu, shard * dim).unwrap(),
            v_tol,
            1e-6,
        );

        let (mut cw, mut cv) = (w.clone(), state(&cpu));
        cpu.sgd_momentum_dense(&mut cw, &mut cv, &dense, shard * dim, lr, mu, wd)
            .unwrap();
        let (mut gw, mut gv) = (up(&g, &w), gstate());
        g.sgd_momentum_dense(&mut gw, &mut gv, &gdense, shard * dim, lr, mu, wd)
            .unwrap();
        assert_close(
            &format!("dense weight, {dtype} momentum"),
            &g.download(&gw, shard * dim).unwrap(),
            &cw,
            1e-4,
            1e-6,
        );
        let stored = gv.download(&g, shard * dim).unwrap();
        assert_close(
            &format!("dense momentum, {dtype}"),
            &stored,
            &cv.download(&cpu, shard * dim).unwrap(),
            v_tol,
            1e-6,
        );
        if dtype == StateDtype::Bf16 {
            // Round to nearest, not truncation: each stored value within half a bf16 step of the
            // exact update (plus the f32 arithmetic's rounding, FMA or not), where truncation
            // would be off by up to a whole step.
            let old: Vec<f32> = v
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect();
            for i in 0..shard * dim {
                let (o, gi, wi) = (f64::from(old[i]), f64::from(dense[i]), f64::from(w[i]));
                let (mu, wd) = (f64::from(mu), f64::from(wd));
                let exact = mu * o + gi + wd * wi;
                let arith = 2f64.powi(-22) * ((mu * o).abs() + gi.abs() + (wd * wi).abs());
                let tol = 2f64.powi(-8) * exact.abs() * (1.0 + 2f64.powi(-20)) + arith;
                assert!(
                    (f64::from(stored[i]) - exact).abs() <= tol,
                    "bf16 momentum [{i}]: gpu {} exact {exact}",
                    stored[i]
                );
            }
        }
    }
}

/// Gradient accumulation on both backends: three passes summed by
/// `forward_backward_accumulate` (each with its own sample, identical on both: random negatives),
/// then one dense SGD update from the sum. Bounds as `whole_step_matches_cpu`'s: each pass's
/// gradient within the row-scaled f32 bound, so is their sum.
#[test]
fn accumulated_step_matches_cpu() {
    if gpu().is_none() {
        return;
    }
    let cfg = step_config(
        UpdateMode::Dense,
        NegativeSampler::Random,
        Margin::arcface(),
    );
    let mut on_cpu = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let mut on_gpu = PartialFc::new(cfg, CudaBackend::new(0).unwrap(), SingleRank).unwrap();
    let mut rng = Rng(31);
    for pass in 0..3 {
        let x = rng.vec(96 * 64, -1.0, 1.0);
        let labels: Vec<i64> = (0..96).map(|_| (rng.next() % 20_000) as i64).collect();
        let a = on_cpu.forward_backward_accumulate(&x, &labels).unwrap();
        let b = on_gpu.forward_backward_accumulate(&x, &labels).unwrap();
        assert_eq!(
            on_gpu.sampled_classes().unwrap(),
            on_cpu.sampled_classes().unwrap(),
            "pass {pass}: sample"
        );
        assert_close(
            &format!("pass {pass}: loss"),
            &[b.loss],
            &[a.loss],
            1e-4,
            1e-6,
        );
        assert_close_in_row(
            &format!("pass {pass}: summed weight grad"),
            &on_gpu.weight_grad_dense().unwrap(),
            &on_cpu.weight_grad_dense().unwrap(),
            64,
        );
    }
    on_cpu.step(0.1).unwrap();
    on_gpu.step(0.1).unwrap();
    assert_close_in_row(
        "weight after the accumulated update",
        &on_gpu.weight().unwrap(),
        &on_cpu.weight().unwrap(),
        64,
    );
    // The sum spans the three samples (about 5,400 classes; one sample holds 2,000).
    let sum = on_cpu.weight_grad_dense().unwrap();
    assert!(
        sum.chunks(64)
            .filter(|r| r.iter().any(|g| *g != 0.0))
            .count()
            > 2 * 2_000
    );
}

/// `adamw_sparse_*` and `adamw_dense_*` against their CPU twins (`Backend::adamw_sparse`,
/// `adamw_dense`) over three updates, t = 1..3 (the bias corrections matter most there), for both
/// moment dtypes. f32 agrees to rounding (the GPU may fuse multiply-adds); a bf16 moment may sit
/// one bf16 step away where the f32 value lands on the other side of a rounding tie.
#[test]
fn adamw_matches_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(23);
    let (shard, dim) = (300usize, 67usize);
    let index: Vec<i32> = (0..shard as i32).filter(|i| i % 5 == 1).collect();
    let count = index.len();
    let w = rng.vec(shard * dim, -0.1, 0.1);
    for dtype in [StateDtype::F32, StateDtype::Bf16] {
        let m_tol = match dtype {
            StateDtype::F32 => 1e-5,
            StateDtype::Bf16 => 2f32.powi(-7),
        };
        let adamw = partial_fc::AdamW {
            weight_decay: 0.05,
            state_dtype: dtype,
            ..partial_fc::AdamW::default()
        };
        let zeros = vec![0f32; shard * dim];
        let cpu_state = || {
            let mut s = StateBuf::alloc(&cpu, dtype, shard * dim).unwrap();
            s.upload(&cpu, &zeros).unwrap();
            s
        };
        let gpu_state = || {
            let mut s = StateBuf::alloc(&g, dtype, shard * dim).unwrap();
            s.upload(&g, &zeros).unwrap();
            s
        };
        for dense in [false, true] {
            let (mut cw, mut cm, mut cv) = (w.clone(), cpu_state(), cpu_state());
            let (mut gw, mut gm, mut gv) = (up(&g, &w), gpu_state(), gpu_state());
            // How far each weight moved in all: a bf16 moment one step apart moves the update by
            // up to 2⁻⁷ of itself, and the weights carry that on.
            let mut moved = vec![0f32; shard * dim];
            for t in 1..=3u64 {
                let before = cw.clone();
                let step = partial_fc::backend::AdamWStep {
                    lr: 0.01,
                    adamw,
                    t,
                    seed: 11,
                };
                if dense {
                    let grad = rng.vec(shard * dim, -1.0, 1.0);
                    cpu.adamw_dense(&mut cw, &mut cm, &mut cv, &grad, shard * dim, step)
                        .unwrap();
                    g.adamw_dense(&mut gw, &mut gm, &mut gv, &up(&g, &grad), shard * dim, step)
                        .unwrap();
                } else {
                    let rows = rng.vec(count * dim, -1.0, 1.0);
                    cpu.adamw_sparse(&mut cw, &mut cm, &mut cv, &rows, &index, count, dim, step)
                        .unwrap();
                    g.adamw_sparse(
                        &mut gw,
                        &mut gm,
                        &mut gv,
                        &up(&g, &rows),
                        &up(&g, &index),
                        count,
                        dim,
                        step,
                    )
                    .unwrap();
                }
                for (m, (a, b)) in moved.iter_mut().zip(cw.iter().zip(&before)) {
                    *m += (a - b).abs();
                }
            }
            let what = |t: &str| {
                format!(
                    "{} {t}, {dtype} moments",
                    if dense { "dense" } else { "sparse" }
                )
            };
            let got = g.download(&gw, shard * dim).unwrap();
            if dtype == StateDtype::F32 {
                assert_close(&what("weight"), &got, &cw, 1e-5, 1e-7);
            } else {
                // The GPU fuses β₁·m + (1 − β₁)·g into one FMA and the CPU rounds twice, so an
                // f32 moment may differ by an ulp and, with probability ~2⁻¹⁶, round to the
                // other bf16 neighbour: a rare weight moves by up to 2⁻⁷ of its updates more.
                // Rare: at most 4 weights (about 0.34 flips are expected per run) may use that
                // allowance; an update taken from the wrong moments (the rounded ones, say)
                // moves nearly all of them and fails.
                let mut loose = 0;
                for (k, ((a, b), m)) in got.iter().zip(&cw).zip(&moved).enumerate() {
                    let strict = 1e-7 + 1e-5 * b.abs();
                    let tol = strict + 2f32.powi(-7) * m;
                    assert!(
                        (a - b).abs() <= tol,
                        "{}[{k}]: gpu {a} cpu {b}, bound {tol:e}",
                        what("weight")
                    );
                    loose += usize::from((a - b).abs() > strict);
                }
                assert!(
                    loose <= 4,
                    "{}: {loose} weights beyond the f32 bound",
                    what("weight")
                );
            }
            // Absolute floors at a few ulps of each moment's terms (|g| < 1: exp_avg's terms up to
            // ~0.3, exp_avg_sq's ~1e-3): where β₁·m and (1 − β₁)·g nearly cancel, the GPU's FMA
            // and the CPU's two roundings leave the same absolute error on a far smaller result.
            for (name, gs, cs, abs) in [("exp_avg", &gm, &cm, 1e-7), ("exp_avg_sq", &gv, &cv, 1e-9)]
            {
                let (got, want) = (
                    gs.download(&g, shard * dim).unwrap(),
                    cs.download(&cpu, shard * dim).unwrap(),
                );
                assert_close(&what(name), &got, &want, m_tol, abs);
                // The stochastic rounding draws the CPU's bits (rounding_bits): the stored values
                // agree but where the f32 values differ by an ulp across a random threshold
                // (probability ~2⁻¹⁶ each). Other bits would disagree on about half of them.
                // (f32 moments differ in their last bit wherever the GPU fused a multiply-add.)
                let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
                assert!(
                    dtype == StateDtype::F32 || same * 100 >= got.len() * 99,
                    "{}: {same} of {} identical",
                    what(name),
                    got.len()
                );
            }
            if !dense {
                // Rows outside the sample kept their weight, to the bit.
                let got = g.download(&gw, shard * dim).unwrap();
                for r in (0..shard).filter(|r| r % 5 != 1) {
                    assert_eq!(
                        got[r * dim..(r + 1) * dim],
                        w[r * dim..(r + 1) * dim],
                        "row {r}"
                    );
                }
            }
        }
    }
}

/// The casts around the gradient's 16-bit reduce-scatter (`LayerConfig::grad_wire`) against
/// their CPU twins, bit for bit: f32 → f16/bf16 on random values and on the rounding edges (ties,
/// overflow to inf, f16 subnormals and underflow, signed zero, infinities), and 16-bit → f32 on
/// every one of the 65536 patterns. NaN must stay NaN; its payload bits are not compared (the
/// hardware f16 conversion need not keep the payload the CPU's `half` keeps). A second launch
/// over 2^24 + 3 elements (more than the 2^16 blocks × 256 threads of the grid) checks the
/// grid-stride loop.
#[test]
fn wire_casts_match_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend;
    let p = |e: i32| 2f32.powi(e);
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0 + p(-11),
        1.0 + 3.0 * p(-11),
        1.0 + p(-8),
        1.0 + 3.0 * p(-8),
        65504.0,
        65519.0,
        65520.0,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        p(-14),
        p(-24),
        p(-25),
        3.0 * p(-25),
        p(-26),
        f32::from_bits(0x0001_0000),
        f32::from_bits(0x0000_8000),
        f32::from_bits(0x0001_8000),
        f32::from_bits(1),
        f32::NAN,
        f32::from_bits(0x7f80_0001),
    ];
    let mut rng = Rng(77);
    x.extend(rng.vec(300_000, -3.0, 3.0).iter().map(|v| v * 1e-3));
    x.extend((0..4096).map(|_| f32::from_bits(rng.next() as u32)));
    let n = x.len();
    let gx = up(&g, &x);
    for wire in [Dtype::F16, Dtype::Bf16] {
        let mut want = vec![0u16; n];
        cpu.cast_to_wire(&x, n, wire, &mut want).unwrap();
        let mut gy = g.alloc::<u16>(n).unwrap();
        g.cast_to_wire(&gx, n, wire, &mut gy).unwrap();
        let got = g.download(&gy, n).unwrap();
        let nan = |b: u16| partial_fc::cpu::wire::from_wire(b, wire).is_nan();
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a == b || (nan(a) && nan(b)),
                "{wire:?}: cast_to_wire({:e}) gpu {a:#06x} cpu {b:#06x}",
                x[i]
            );
        }

        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut want = vec![0f32; all.len()];
        cpu.cast_from_wire(&all, all.len(), wire, &mut want)
            .unwrap();
        let mut gw = g.alloc::<f32>(all.len()).unwrap();
        g.cast_from_wire(&up(&g, &all), all.len(), wire, &mut gw)
            .unwrap();
        for (b, (a, w)) in all
            .iter()
            .zip(g.download(&gw, all.len()).unwrap().iter().zip(&want))
        {
            assert!(
                a.to_bits() == w.to_bits() || (a.is_nan() && w.is_nan()),
                "{wire:?}: cast_from_wire({b:#06x}) gpu {a:e} cpu {w:e}"
            );
        }
        println!("{wire:?}: cast_to_wire and cast_from_wire bit-identical to the CPU");
    }
    // More elements than one grid's threads (2^16 blocks of 256): each thread loops.
    let big = (1usize << 24) + 3;
    let xs: Vec<f32> = (0..big).map(|i| (i % 1000) as f32 * 0.37 - 150.0).collect();
    let mut want = vec![0u16; big];
    cpu.cast_to_wire(&xs, big, Dtype::Bf16, &mut want).unwrap();
    let mut gy = g.alloc::<u16>(big).unwrap();
    g.cast_to_wire(&up(&g, &xs), big, Dtype::Bf16, &mut gy)
        .unwrap();
    assert!(g.download(&gy, big).unwrap() == want, "grid-stride cast");
    // f32 is not a 16-bit format.
    assert!(matches!(
        g.cast_to_wire(&gx, n, Dtype::F32, &mut gy),
        Err(partial_fc::PfcError::Param { .. })
    ));
}

#[test]
fn class_max_cosine_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(23);
    let (shard, dim, rows, chunk) = (1000usize, 64usize, 40usize, 96usize);
    let w = rng.vec(shard * dim, -1.0, 1.0);
    let x = rng.vec(rows * dim, -1.0, 1.0);
    let (mut xh, mut xn) = (vec![0f32; rows * dim], vec![0f32; rows]);
    CpuBackend
        .normalize_rows(&x, rows, dim, &mut xh, &mut xn)
        .unwrap();
    // The last rows are the padding of a ragged batch (label −1): they must not count.
    let labels: Vec<i64> = (0..rows as i64)
        .map(|i| if i < 33 { i * 7 } else { -1 })
        .collect();
    let (mut cw, mut cc, mut scores) = (
        vec![0f32; chunk * dim],
        vec![0f32; chunk * rows],
        vec![0f32; shard],
    );
    CpuBackend
        .class_max_cosine(
            &w,
            shard,
            dim,
            &xh,
            &labels,
            rows,
            &mut cw,
            &mut cc,
            &mut scores,
        )
        .unwrap();
    let (mut gcw, mut gcc, mut gscores) = (
        g.alloc(chunk * dim).unwrap(),
        g.alloc(chunk * rows).unwrap(),
        g.alloc(shard).unwrap(),
    );
    g.class_max_cosine(
        &up(&g, &w),
        shard,
        dim,
        &up(&g, &xh),
        &up(&g, &labels),
        rows,
        &mut gcw,
        &mut gcc,
        &mut gscores,
    )
    .unwrap();
    assert_close(
        "class_max_cosine",
        &g.download(&gscores, shard).unwrap(),
        &scores,
        1e-4,
        1e-5,
    );
}

/// GPU and CPU top k agree: scores within 1e-5, ids equal except a swap of two neighbours whose
/// CPU scores are within 2e-5 (the GEMMs round differently); on each backend equal scores come
/// in id order.
#[track_caller]
fn assert_same_top_k(what: &str, gpu: (&[f32], &[i64]), cpu: (&[f32], &[i64]), k: usize) {
    assert_eq!(gpu.1.len(), cpu.1.len(), "{what}");
    for (row, (gs, cs)) in gpu.0.chunks(k).zip(cpu.0.chunks(k)).enumerate() {
        let (gi, ci) = (&gpu.1[row * k..][..k], &cpu.1[row * k..][..k]);
        for j in 0..k {
            assert!(
                (gs[j] - cs[j]).abs() <= 1e-5 || (gs[j] == cs[j]),
                "{what} row {row} slot {j}: gpu {} cpu {}",
                gs[j],
                cs[j]
            );
            let near = |jj: usize| ci[jj] == gi[j] && (cs[jj] - cs[j]).abs() < 2e-5;
            let swapped = (j > 0 && near(j - 1)) || (j + 1 < k && near(j + 1));
            assert!(
                gi[j] == ci[j] || swapped,
                "{what} row {row} slot {j}: gpu class {} cpu class {}",
                gi[j],
                ci[j]
            );
            for (s, i) in [(gs, gi), (cs, ci)] {
                if j > 0 && s[j] == s[j - 1] && i[j] >= 0 {
                    assert!(i[j] > i[j - 1], "{what} row {row}: tie out of id order");
                }
            }
        }
    }
}

#[test]
fn class_top_k_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(29);
    let (shard, dim, rows, chunk) = (1000usize, 64usize, 40usize, 96usize);
    let mut w = rng.vec(shard * dim, -1.0, 1.0);
    // Classes 7, 500 and 900 share a center (900's twice as long): exact ties, kept in id order.
    let center = w[7 * dim..8 * dim].to_vec();
    w[500 * dim..501 * dim].copy_from_slice(&center);
    for (j, c) in center.iter().enumerate() {
        w[900 * dim + j] = 2.0 * c;
    }
    let mut x = rng.vec(rows * dim, -1.0, 1.0);
    x[..dim].copy_from_slice(&center);
    x[dim..2 * dim].fill(0.0); // a padding row: cosine 0 with every class
    let (mut xh, mut xn) = (vec![0f32; rows * dim], vec![0f32; rows]);
    CpuBackend
        .normalize_rows(&x, rows, dim, &mut xh, &mut xn)
        .unwrap();
    for k in [1usize, 10, partial_fc::cpu::top_k::TOP_K_MAX] {
        let (mut cw, mut cc) = (vec![0f32; chunk * dim], vec![0f32; chunk * rows]);
        let (mut scores, mut ids) = (vec![0f32; rows * k], vec![0i32; rows * k]);
        CpuBackend
            .class_top_k(
                &w,
                shard,
                dim,
                &xh,
                rows,
                k,
                &mut cw,
                &mut cc,
                &mut scores,
                &mut ids,
            )
            .unwrap();
        let (mut gcw, mut gcc) = (
            g.alloc(chunk * dim).unwrap(),
            g.alloc(chunk * rows).unwrap(),
        );
        let (mut gscores, mut gids) = (g.alloc(rows * k).unwrap(), g.alloc(rows * k).unwrap());
        g.class_top_k(
            &up(&g, &w),
            shard,
            dim,
            &up(&g, &xh),
            rows,
            k,
            &mut gcw,
            &mut gcc,
            &mut gscores,
            &mut gids,
        )
        .unwrap();
        let gscores = g.download(&gscores, rows * k).unwrap();
        let gids: Vec<i64> = g
            .download(&gids, rows * k)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        assert_same_top_k(
            &format!("class_top_k k={k}"),
            (&gscores, &gids),
            (&scores, &ids),
            k,
        );
        if k >= 3 {
            assert_eq!(&gids[..3], &[7, 500, 900], "the shared center, in id order");
            let zeros: Vec<i64> = (0..k as i64).collect();
            assert_eq!(
                &gids[k..2 * k],
                &zeros[..],
                "the zero row: every class ties at 0"
            );
        }
    }
    let (mut a, mut b) = (g.alloc(10).unwrap(), g.alloc(10).unwrap());
    let e = g.class_top_k(
        &up(&g, &w),
        shard,
        dim,
        &up(&g, &xh),
        rows,
        0,
        &mut g.alloc(dim).unwrap(),
        &mut g.alloc(rows).unwrap(),
        &mut a,
        &mut b,
    );
    assert!(e.is_err(), "k = 0 is refused");
}

/// A center that is not finite, or whose sum of squares overflows f32, scores NOT_FINITE_SCORE
/// (above every cosine) with every row, on both devices, so that the layer can refuse a
/// diverged classifier's prediction.
#[test]
fn class_top_k_puts_a_non_finite_center_first() {
    use partial_fc::cpu::top_k::NOT_FINITE_SCORE;
    let Some(g) = gpu() else { return };
    let mut rng = Rng(31);
    let (shard, dim, rows, k, chunk) = (300usize, 16usize, 5usize, 4usize, 64usize);
    let mut w = rng.vec(shard * dim, -1.0, 1.0);
    w[211 * dim + 3] = f32::INFINITY; // its normalized row, and every cosine with it, is NaN
                                      // Finite values whose sum of squares overflows f32: NaN too, not a row of zeros.
    w[57 * dim..58 * dim].fill(1e30);
    let x = rng.vec(rows * dim, -1.0, 1.0);
    let (mut xh, mut xn) = (vec![0f32; rows * dim], vec![0f32; rows]);
    CpuBackend
        .normalize_rows(&x, rows, dim, &mut xh, &mut xn)
        .unwrap();
    let (mut cw, mut cc) = (vec![0f32; chunk * dim], vec![0f32; chunk * rows]);
    let (mut scores, mut ids) = (vec![0f32; rows * k], vec![0i32; rows * k]);
    CpuBackend
        .class_top_k(
            &w,
            shard,
            dim,
            &xh,
            rows,
            k,
            &mut cw,
            &mut cc,
            &mut scores,
            &mut ids,
        )
        .unwrap();
    let (mut gcw, mut gcc) = (
        g.alloc(chunk * dim).unwrap(),
        g.alloc(chunk * rows).unwrap(),
    );
    let (mut gscores, mut gids) = (g.alloc(rows * k).unwrap(), g.alloc(rows * k).unwrap());
    g.class_top_k(
        &up(&g, &w),
        shard,
        dim,
        &up(&g, &xh),
        rows,
        k,
        &mut gcw,
        &mut gcc,
        &mut gscores,
        &mut gids,
    )
    .unwrap();
    let (gscores, gids) = (
        g.download(&gscores, rows * k).unwrap(),
        g.download(&gids, rows * k).unwrap(),
    );
    for row in 0..rows {
        for (what, sc, id) in [("cpu", &scores, &ids), ("gpu", &gscores, &gids)] {
            assert_eq!(
                (&sc[row * k..row * k + 2], &id[row * k..row * k + 2]),
                (&[NOT_FINITE_SCORE; 2][..], &[57, 211][..]),
                "{what} row {row}"
            );
        }
    }
}

#[test]
fn predict_top_k_matches_cpu() {
    use partial_fc::collective::{HostStaged, ThreadGroup};
    use partial_fc::Collective;
    let Some(g) = gpu() else { return };
    drop(g);
    let (classes, dim, rows, k) = (5003u64, 32usize, 24usize, 8usize);
    let x = Rng(31).vec(rows * dim, -1.0, 1.0);
    for world in [1usize, 2] {
        let run = |on_gpu: bool| {
            let parts = ThreadGroup::run(world, |comm| {
                let rank = comm.rank();
                let n = rows / world;
                let mine = &x[rank * n * dim..(rank + 1) * n * dim];
                let cfg = LayerConfig::new(classes, dim, n);
                let p = if on_gpu {
                    let backend = gpu().unwrap();
                    let mut layer = PartialFc::new(cfg, backend, HostStaged::new(comm)).unwrap();
                    layer.predict_top_k(mine, k).unwrap()
                } else {
                    let mut layer = PartialFc::new(cfg, CpuBackend, comm).unwrap();
                    layer.predict_top_k(mine, k).unwrap()
                };
                (p.scores, p.classes)
            });
            let scores: Vec<f32> = parts.iter().flat_map(|p| p.0.clone()).collect();
            let ids: Vec<i64> = parts.iter().flat_map(|p| p.1.clone()).collect();
            (scores, ids)
        };
        let (gpu_out, cpu_out) = (run(true), run(false));
        assert_same_top_k(
            &format!("predict_top_k, {world} ranks"),
            (&gpu_out.0, &gpu_out.1),
            (&cpu_out.0, &cpu_out.1),
            k,
        );
    }
}

fn step_config(update: UpdateMode, sampler: NegativeSampler, margin: Margin) -> LayerConfig {
    let mut cfg = LayerConfig::new(20_000, 64, 96);
    cfg.sample_rate = 0.1;
    cfg.update = update;
    cfg.sampler = sampler;
    cfg.margin = margin;
    cfg
}

#[test]
fn whole_step_matches_cpu() {
    if gpu().is_none() {
        return;
    }
    for (update, sampler, margin, state) in [
        (
            UpdateMode::Sparse,
            NegativeSampler::Random,
            Margin::arcface(),
            StateDtype::F32,
        ),
        (
            UpdateMode::Dense,
            NegativeSampler::Random,
            Margin::cosface(),
            StateDtype::F32,
        ),
        (
            UpdateMode::Sparse,
            NegativeSampler::Hard { fraction: 0.5 },
            Margin::arcface(),
            StateDtype::F32,
        ),
        (
            UpdateMode::Sparse,
            NegativeSampler::Random,
            Margin::arcface(),
            StateDtype::Bf16,
        ),
        (
            UpdateMode::Dense,
            NegativeSampler::Random,
            Margin::arcface(),
            StateDtype::Bf16,
        ),
    ] {
        let mut cfg = step_config(update, sampler, margin);
        cfg.optimizer.as_mut().unwrap().set_state_dtype(state);
        let mut on_cpu = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
        let mut on_gpu =
            PartialFc::new(cfg.clone(), CudaBackend::new(0).unwrap(), SingleRank).unwrap();
        assert_eq!(
            on_gpu.memory_report(),
            on_gpu.planned_memory(),
            "{state} momentum: allocation != planner"
        );
        let mut rng = Rng(29);
        let mut moved = vec![0f32; on_cpu.weight().unwrap().len()];
        for step in 0..3 {
            let x = rng.vec(96 * 64, -1.0, 1.0);
            let labels: Vec<i64> = (0..96).map(|_| (rng.next() % 20_000) as i64).collect();
            let (w_cpu, w_gpu) = (on_cpu.weight().unwrap(), on_gpu.weight().unwrap());
            let a = on_cpu.forward_backward(&x, &labels).unwrap();
            let b = on_gpu.forward_backward(&x, &labels).unwrap();
            let what = format!("{update:?} {sampler:?} {state} momentum, step {step}");
            let (gs, cs) = (
                on_gpu.sampled_classes().unwrap(),
                on_cpu.sampled_classes().unwrap(),
            );
            // Random negatives come from the same counter-based keys: always the same. Hard ones
            // rank classes by cosines that cuBLAS and the CPU GEMM round their own way, so
            // classes within an f32 rounding of the selection boundary may swap (as
            // tests/cuda_step_fuzz.rs allows): each sample must be one the sampler could draw
            // from these inputs with scores that close to the exact ones (tests/hard_sample).
            let pass = Pass {
                shard_start: 0,
                dim: 64,
                weight: &w_cpu,
                other_weight: &w_gpu,
                x: &x,
                labels: &labels,
                seed: cfg.seed,
                step,
                fraction: match sampler {
                    NegativeSampler::Hard { fraction } => fraction,
                    NegativeSampler::Random => 0.0,
                },
            };
            let boundary = check_hard_sample(&what, &pass, &cs, &gs);
            if matches!(sampler, NegativeSampler::Hard { .. }) {
                println!("{boundary}");
            }
            if gs != cs {
                let only_in = |a: &[i64], b: &[i64]| a.iter().filter(|c| !b.contains(c)).count();
                let swapped = only_in(&gs, &cs).max(only_in(&cs, &gs));
                assert!(swapped <= 2, "{what}: sample differs in {swapped} classes");
                println!(
                    "{what}: {swapped} hard negative(s) swapped at the selection boundary; the \
                     rest of this case is not compared (the runs now have different inputs)"
                );
                break;
            }
            assert_close(&format!("{what}: loss"), &[b.loss], &[a.loss], 1e-4, 1e-6);
            // Row-scaled bounds (golden_support): the weight gradient passes the normalization's
            // backward, whose projection cancels, so its small entries carry the f32 rounding of
            // the row's largest; and each step's rounding moves the next step's inputs.
            assert_close_in_row(
                &format!("{what}: grad_embeddings"),
                &b.grad_embeddings,
                &a.grad_embeddings,
                64,
            );
            assert_close_in_row(
                &format!("{what}: weight grad"),
                &on_gpu.weight_grad_dense().unwrap(),
                &on_cpu.weight_grad_dense().unwrap(),
                64,
            );
            let before = on_cpu.weight().unwrap();
            on_cpu.step(0.1).unwrap();
            on_gpu.step(0.1).unwrap();
            let (got, want) = (on_gpu.weight().unwrap(), on_cpu.weight().unwrap());
            if state == StateDtype::F32 {
                assert_close_in_row(&format!("{what}: weight"), &got, &want, 64);
            } else {
                // A bf16 momentum value may round one bf16 step (2⁻⁷ relative) apart on the
                // two devices where the f32 values straddle a rounding boundary; the weight then
                // moves by up to 2⁻⁷ of that step's update, and the difference is carried on with
                // factor μ < 1 for the (at most 3) steps of this test.
                for (k, (w, b)) in want.iter().zip(&before).enumerate() {
                    moved[k] += (w - b).abs();
                }
                // ...on top of the row-scaled bound of the f32 case.
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    let row = &want[k / 64 * 64..k / 64 * 64 + 64];
                    let scale = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let tol = 1e-6 + 1e-4 * scale.max(w.abs()) + 3.0 * 2f32.powi(-7) * moved[k];
                    assert!(
                        (g - w).abs() <= tol,
                        "{what}: weight[{k}]: gpu {g} cpu {w}, bound {tol:e}"
                    );
                }
            }
        }
    }
}

/// A layer with 16-bit GEMMs holds exactly the operand buffers the planner predicts
/// (`gemm_operands` = 2·(M·d + S₈·d) bytes with S₈ the sample padded to a multiple of 8, 16-bit
/// logits), allocated at construction: after
/// three steps the report is unchanged (no GEMM grew them), and it equals the planner's component
/// by component. The loss stays within 5e-2 relative of the f32 CPU layer's on the same inputs
/// (the sample is identical; 16-bit operands move each cosine by at most ~2·2⁻⁸, loose on
/// purpose: this test is about memory, `half_precision_gemms_match_f32` about accuracy).
#[test]
fn half_precision_layer_allocates_what_the_planner_says() {
    use partial_fc::plan::Component;
    use partial_fc::GemmPrecision;
    if gpu().is_none() {
        return;
    }
    for precision in [GemmPrecision::Bf16, GemmPrecision::F16] {
        let mut cfg = step_config(
            UpdateMode::Sparse,
            NegativeSampler::Random,
            Margin::arcface(),
        );
        cfg.precision = precision;
        let mut on_gpu =
            PartialFc::new(cfg.clone(), CudaBackend::new(0).unwrap(), SingleRank).unwrap();
        assert_eq!(on_gpu.backend().precision(), precision);
        cfg.precision = GemmPrecision::F32;
        let mut on_cpu = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
        let planned = on_gpu.planned_memory();
        assert_eq!(
            on_gpu.memory_report(),
            planned,
            "{precision}: allocation != planner"
        );
        // The sampled centers' copy has the padded row count (`sampled_stride`).
        let (m, s, d) = (96u64, on_gpu.step_shape().sampled_stride(), 64u64);
        let want = 2 * (m * d + s * d);
        let held = planned
            .iter()
            .find(|(c, _)| *c == Component::GemmOperands)
            .map(|(_, b)| *b);
        assert_eq!(held, Some(want), "{precision}: gemm_operands");
        let mut rng = Rng(31);
        for step in 0..3 {
            let x = rng.vec(96 * 64, -1.0, 1.0);
            let labels: Vec<i64> = (0..96).map(|_| (rng.next() % 20_000) as i64).collect();
            let a = on_cpu.forward_backward(&x, &labels).unwrap();
            let b = on_gpu.forward_backward(&x, &labels).unwrap();
            assert!(
                (b.loss - a.loss).abs() <= 5e-2 * a.loss.abs(),
                "{precision} step {step}: loss gpu {} cpu {}",
                b.loss,
                a.loss
            );
            on_cpu.step(0.1).unwrap();
            on_gpu.step(0.1).unwrap();
        }
        assert_eq!(
            on_gpu.memory_report(),
            planned,
            "{precision}: the GEMMs grew the operand buffers"
        );
        println!("{precision}: gemm_operands {want} bytes, as planned");
    }
}

/// The 16-bit logits GEMMs against the f32 CPU GEMMs on inputs already rounded to the 16-bit
/// type (so the operand casts are exact): `gemm_nt16` within one 16-bit step of the product plus
/// the accumulation bound `k·2⁻²⁴·Σ|a||b|` (cuBLAS is told to keep split-k reductions in f32);
/// `gemm_backward16` (16-bit gradient, `alpha`, with and without reusing the forward's operand
/// copies) within twice the accumulation bound (tensor cores may truncate).
#[test]
fn sixteen_bit_logits_gemms_match_f32() {
    use partial_fc::cpu::margin_softmax16::{narrow, widen};
    use partial_fc::cuda::Precision;
    use partial_fc::plan::Dtype;
    if gpu().is_none() {
        return;
    }
    let cpu = CpuBackend;
    for (precision, dtype, step) in [
        (Precision::Bf16, Dtype::Bf16, 2f32.powi(-7)),
        (Precision::F16, Dtype::F16, 2f32.powi(-10)),
    ] {
        let g = CudaBackend::new(0).unwrap().with_precision(precision);
        assert_eq!(g.logits_dtype(), dtype);
        let mut rng = Rng(43);
        let round = |v: Vec<f32>| -> Vec<f32> {
            v.iter().map(|&x| widen(narrow(x, dtype), dtype)).collect()
        };
        for &(m, s, d) in &[(7usize, 5usize, 3usize), (64, 300, 128), (33, 17, 512)] {
            let x = round(rng.vec(m * d, -0.1, 0.1));
            let w = round(rng.vec(s * d, -0.1, 0.1));
            let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
            let (mut want, mut mag) = (vec![0f32; m * s], vec![0f32; m * s]);
            cpu.gemm_nt(m, s, d, &x, &w, &mut want).unwrap();
            cpu.gemm_nt(m, s, d, &abs(&x), &abs(&w), &mut mag).unwrap();
            let (dx, dw) = (up(&g, &x), up(&g, &w));
            let mut c16 = g.alloc::<u16>(m * s).unwrap();
            g.gemm_nt16(m, s, d, &dx, &dw, &mut c16).unwrap();
            let got: Vec<f32> = g
                .download(&c16, m * s)
                .unwrap()
                .iter()
                .map(|&b| widen(b, dtype))
                .collect();
            for i in 0..m * s {
                let tol = step * want[i].abs() + 2.0 * d as f32 * 6e-8 * mag[i] + 1e-7;
                assert!(
                    (got[i] - want[i]).abs() <= tol,
                    "{dtype:?} gemm_nt16 {m}x{s}x{d} [{i}]: gpu {} cpu {}",
                    got[i],
                    want[i]
                );
            }
            // Backward: a rounded gradient, alpha = 1/m.
            let gl = round(rng.vec(m * s, -1.0, 1.0));
            let g16: Vec<u16> = gl.iter().map(|&v| narrow(v, dtype)).collect();
            let alpha = 1.0 / m as f32;
            let (mut want_x, mut want_w) = (vec![0f32; m * d], vec![0f32; s * d]);
            cpu.gemm_nn(m, d, s, &gl, &w, &mut want_x).unwrap();
            cpu.gemm_tn(s, d, m, &gl, &x, &mut want_w).unwrap();
            let (mut mag_x, mut mag_w) = (vec![0f32; m * d], vec![0f32; s * d]);
            cpu.gemm_nn(m, d, s, &abs(&gl), &abs(&w), &mut mag_x)
                .unwrap();
            cpu.gemm_tn(s, d, m, &abs(&gl), &abs(&x), &mut mag_w)
                .unwrap();
            for reuse in [true, false] {
                let (mut gx, mut gw) = (g.alloc(m * d).unwrap(), g.alloc(s * d).unwrap());
                g.gemm_nt16(m, s, d, &dx, &dw, &mut c16).unwrap();
                g.gemm_backward16(
                    m,
                    s,
                    d,
                    &up(&g, &g16),
                    alpha,
                    &dw,
                    &dx,
                    &mut gx,
                    &mut gw,
                    reuse,
                )
                .unwrap();
                for (name, got, want, mag, k) in [
                    (
                        "grad_x",
                        g.download(&gx, m * d).unwrap(),
                        &want_x,
                        &mag_x,
                        s,
                    ),
                    (
                        "grad_w",
                        g.download(&gw, s * d).unwrap(),
                        &want_w,
                        &mag_w,
                        m,
                    ),
                ] {
                    for i in 0..got.len() {
                        let w = alpha * want[i];
                        // 2·k·2⁻²⁴: tensor-core f32 accumulation may truncate, not round.
                        let tol = alpha * (2.0 * k as f32 * 6e-8 * mag[i]) + 1e-7;
                        assert!(
                            (got[i] - w).abs() <= tol,
                            "{dtype:?} backward16 {name} reuse {reuse} {m}x{s}x{d} [{i}]: \
                             gpu {} cpu {w}",
                            got[i]
                        );
                    }
                }
            }
        }
        println!("{dtype:?} 16-bit logits GEMMs within the stated bounds");
    }
}

/// bf16/f16 operands with f32 accumulation against the f32 CPU GEMM. Rounding both operands
/// to 16 bits changes each product by at most 2·2⁻⁸ + 2⁻¹⁶ (bf16) or 2·2⁻¹¹ + 2⁻²² (f16) of its
/// magnitude (unit roundoffs 2⁻⁸ and 2⁻¹¹), and
/// f32 accumulation adds at most about k·2⁻²⁴ of the same, so the bound is
/// `rel · Σ|a||b| + 1e-5 + k·6e-8` (the last term for f16 subnormals) with rel 7.9e-3 (bf16) and
/// 9.8e-4 (f16). The bf16 results must also differ from f32 somewhere (the cast path really ran).
#[test]
fn half_precision_gemms_match_f32() {
    use partial_fc::cuda::Precision;
    if gpu().is_none() {
        return;
    }
    let cpu = CpuBackend;
    for (precision, rel) in [(Precision::Bf16, 7.9e-3f32), (Precision::F16, 9.8e-4)] {
        let g = CudaBackend::new(0).unwrap().with_precision(precision);
        let mut rng = Rng(17);
        let mut differs = false;
        for &(m, n, k) in &[(7usize, 5usize, 3usize), (64, 300, 129), (33, 17, 512)] {
            let a = rng.vec(m * k, -1.0, 1.0);
            let b = rng.vec(n * k, -1.0, 1.0);
            let (abs_a, abs_b): (Vec<f32>, Vec<f32>) = (
                a.iter().map(|v| v.abs()).collect(),
                b.iter().map(|v| v.abs()).collect(),
            );
            let (mut want, mut mag) = (vec![0f32; m * n], vec![0f32; m * n]);
            let mut c = g.alloc(m * n).unwrap();
            let (da, db) = (up(&g, &a), up(&g, &b));
            for op in ["nt", "nn", "tn"] {
                match op {
                    "nt" => {
                        cpu.gemm_nt(m, n, k, &a, &b, &mut want).unwrap();
                        cpu.gemm_nt(m, n, k, &abs_a, &abs_b, &mut mag).unwrap();
                        g.gemm_nt(m, n, k, &da, &db, &mut c).unwrap();
                    }
                    "nn" => {
                        cpu.gemm_nn(m, n, k, &a, &b, &mut want).unwrap();
                        cpu.gemm_nn(m, n, k, &abs_a, &abs_b, &mut mag).unwrap();
                        g.gemm_nn(m, n, k, &da, &db, &mut c).unwrap();
                    }
                    _ => {
                        cpu.gemm_tn(m, n, k, &a, &b, &mut want).unwrap();
                        cpu.gemm_tn(m, n, k, &abs_a, &abs_b, &mut mag).unwrap();
                        g.gemm_tn(m, n, k, &da, &db, &mut c).unwrap();
                    }
                }
                let got = g.download(&c, m * n).unwrap();
                for i in 0..m * n {
                    let tol = rel * mag[i] + 1e-5 + k as f32 * 6e-8;
                    let err = (got[i] - want[i]).abs();
                    assert!(
                        err <= tol,
                        "{precision:?} gemm_{op} {m}x{n}x{k} [{i}]: gpu {} cpu {} (err {err:e} > {tol:e})",
                        got[i],
                        want[i]
                    );
                    differs |= got[i] != want[i];
                }
            }
        }
        assert!(
            differs,
            "{precision:?}: results identical to f32, the cast path did not run"
        );
        println!("{precision:?} GEMMs within the stated bound");
    }
}

#[test]
fn golden_files_on_the_gpu() {
    if gpu().is_none() {
        return;
    }
    let Some(files) = golden_files() else {
        skip!("skipped: no golden folder (set PFC_GOLDEN_DIR or provide ../shared/golden)");
        return;
    };
    assert!(!files.is_empty(), "no golden files");
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let case = StepCase::read(&path).unwrap();
        let golden = read_expected(&path).unwrap();
        let on_cpu = case.run_threads(1).unwrap();
        for k in [1, 2, 3] {
            // k shards on the one GPU (virtual ranks), against the published outputs and the CPU.
            let gpu = case.run_virtual_ranks(k, || CudaBackend::new(0)).unwrap();
            for (against, want) in [("golden", &golden), ("cpu", &on_cpu)] {
                let what = format!("{name}, {k} GPU ranks vs {against}");
                assert_close_in_row(&format!("{what}: loss"), &[gpu.loss], &[want.loss], 1);
                assert_close_in_row(
                    &format!("{what}: grad_embeddings"),
                    &gpu.grad_embeddings,
                    &want.grad_embeddings,
                    case.dim,
                );
                assert_close_in_row(
                    &format!("{what}: grad_weight"),
                    &gpu.grad_weight,
                    &want.grad_weight,
                    case.dim,
                );
            }
            if let Some(index) = &case.sampled_index {
                assert_eq!(
                    &gpu.sampled_index, index,
                    "{name}, {k} GPU ranks: sampled index"
                );
            }
        }
        println!(
            "{name}: matches the published outputs and the CPU on the GPU with 1, 2 and 3 ranks"
        );
    }
}

#[test]
fn shapes_whose_sizes_overflow_are_errors() {
    // rows · dim past usize::MAX: a wrapped product would pass the length check and send the
    // kernel past the buffers' ends.
    let Some(g) = gpu() else { return };
    let (x, mut out, mut norms) = (
        g.alloc::<f32>(8).unwrap(),
        g.alloc::<f32>(8).unwrap(),
        g.alloc::<f32>(4).unwrap(),
    );
    let (rows, dim) = ((1usize << 62) + 1, 4usize); // rows · dim wraps to 4
    let err = g
        .normalize_rows(&x, rows, dim, &mut out, &mut norms)
        .unwrap_err();
    assert!(matches!(err, partial_fc::PfcError::Shape(_)), "{err:?}");
    let mut c = g.alloc::<f32>(4).unwrap();
    let err = g.gemm_nt(rows, 1, dim, &x, &out, &mut c).unwrap_err();
    assert!(matches!(err, partial_fc::PfcError::Shape(_)), "{err:?}");
    let err = g
        .upload_at(&[1.0f32, 2.0], &mut out, usize::MAX)
        .unwrap_err();
    assert!(matches!(err, partial_fc::PfcError::Shape(_)), "{err:?}");
}

/// Every input of the softmax passes is checked before a kernel is queued: the f32 pass 3 used to
/// check only the logits, labels and row_loss, and read 4096 rows of one-element row statistics
/// out of bounds (found by a review, on the emulator's memory checker).
#[test]
fn short_row_statistics_are_errors() {
    let Some(g) = gpu() else { return };
    let (rows, cols) = (4096usize, 8usize);
    let shape = LogitsShape::dense(rows, cols);
    let mut logits = g.alloc::<f32>(rows * cols).unwrap();
    let labels = g.alloc::<i32>(rows).unwrap();
    let full = g.alloc::<f32>(rows).unwrap();
    let short = g.alloc::<f32>(1).unwrap();
    let mut row_loss = g.alloc::<f32>(2 * rows).unwrap();
    let p = Margin::arcface().params();
    for which in 0..3 {
        let stat = |k| if k == which { &short } else { &full };
        let err = g
            .softmax_loss_grad(
                &mut logits,
                shape,
                &labels,
                &p,
                None,
                stat(0),
                stat(1),
                stat(2),
                1.0,
                &mut row_loss,
            )
            .unwrap_err();
        assert!(
            matches!(&err, partial_fc::PfcError::Shape(m) if m.contains("softmax_loss_grad")),
            "statistic {which}: {err:?}"
        );
    }
}
