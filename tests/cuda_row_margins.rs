//! Per-row margins on CUDA: every margin-softmax kernel with a margin table (the one-kernel
//! softmax on one rank, the three passes on three host-staged ranks; f32 and bf16 logits), the
//! CUDA layer against the CPU layer in f32, and, in each precision, the table's two defining
//! properties on the device itself: margins equal to the layer's give the plain pass's bits, and
//! each row's embedding gradient is, bit for bit, the one a layer configured with that row's
//! margin gives.
#![cfg(feature = "cuda")]

mod cuda_device;
use cuda_device::gpu;

use partial_fc::collective::{HostStaged, SingleRank, ThreadGroup};
use partial_fc::cpu::margin_softmax16::{narrow, widen};
use partial_fc::cuda::CudaBackend;
use partial_fc::plan::Dtype;
use partial_fc::{
    Backend, Collective, CpuBackend, GemmPrecision, GradMode, LayerConfig, LogitsShape, Margin,
    PartialFc, PassOptions, Shard, StepOutput, TargetFallback,
};

const CLASSES: u64 = 2_000;
const DIM: usize = 32;
const ROWS: usize = 24;

fn config(world: usize, precision: GemmPrecision, margin: Margin) -> LayerConfig {
    let mut c = LayerConfig::new(CLASSES, DIM, ROWS.div_ceil(world));
    c.sample_rate = 0.3;
    c.precision = precision;
    c.margin = margin;
    c
}

fn batch() -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(11, 0, ROWS, DIM, 1.0);
    let labels = (0..ROWS as i64)
        .map(|i| (i * 83 + 1) % CLASSES as i64)
        .collect();
    (x, labels)
}

/// Scale 8 (at 64 an untrained row's target probability is ~0 whatever its margin) and the
/// exact gradient, so that the margin reaches both the loss and every gradient.
fn base() -> Margin {
    Margin {
        grad_mode: GradMode::Exact,
        ..Margin::combined(8.0, 1.0, 0.4, 0.1)
    }
}

/// One pass on `world` CUDA ranks (host-staged: three passes for world > 1, one kernel for 1).
fn on_gpu(
    rate: f64,
    world: usize,
    precision: GemmPrecision,
    margin: Margin,
    m2: Option<&[f32]>,
    m3: Option<&[f32]>,
) -> Vec<StepOutput> {
    let (x, labels) = batch();
    ThreadGroup::run(world, |comm| {
        let rows = Shard::of(ROWS as u64, world, comm.rank());
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let g = CudaBackend::new(0).unwrap();
        let mut cfg = config(world, precision, margin);
        cfg.sample_rate = rate;
        let mut layer = PartialFc::new(cfg, g, HostStaged::new(comm)).unwrap();
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

/// Row i's choice of two margins: a pattern that differs between any two ranks' slices (8
/// rows each at three ranks, 24 at one) and between rows i and i ^ 1, i ^ 2, i ^ 4, so a
/// kernel reading another row's entry, or a rank seeing another rank's table, shows.
const PATTERN: [u8; ROWS] = [
    0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1,
];

fn alternate(a: f32, b: f32) -> Vec<f32> {
    PATTERN
        .iter()
        .map(|&k| if k == 0 { a } else { b })
        .collect()
}

/// Every kernel's result on backend `b`: the three passes (rowmax, exp_rowsum, loss_grad) and
/// the one-kernel softmax, on f32 cosines, or on 16-bit ones when `dtype` is 16-bit, with a
/// margin table. Returns (pass-3 gradient, pass-3 loss, fused gradient, fused loss), widened.
#[allow(clippy::type_complexity)]
fn kernels<B: Backend>(
    b: &B,
    cos: &[f32],
    shape: LogitsShape,
    dtype: Dtype,
    labels: &[i32],
    margin: &Margin,
    table: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = shape.rows;
    let p = margin.params();
    let up = |v: &[f32]| {
        let mut d = b.alloc::<f32>(v.len()).unwrap();
        b.upload(v, &mut d).unwrap();
        d
    };
    let mut l = b.alloc::<i32>(rows).unwrap();
    b.upload(labels, &mut l).unwrap();
    let t = up(table);
    let (mut mx, mut sum, mut tc) = (
        up(&vec![0.0; rows]),
        up(&vec![0.0; rows]),
        up(&vec![0.0; rows]),
    );
    let (mut loss3, mut loss1) = (up(&vec![0.0; 2 * rows]), up(&vec![0.0; 2 * rows]));
    let len = rows * shape.ld;
    if dtype == Dtype::F32 {
        let (mut three, mut one) = (up(cos), up(cos));
        b.margin_rowmax(&mut three, shape, &l, &p, Some(&t), &mut mx, &mut tc)
            .unwrap();
        b.exp_rowsum(&three, shape, &mx, &mut sum).unwrap();
        b.softmax_loss_grad(
            &mut three,
            shape,
            &l,
            &p,
            Some(&t),
            &mx,
            &sum,
            &tc,
            0.5,
            &mut loss3,
        )
        .unwrap();
        b.margin_softmax_fused(&mut one, shape, &l, &p, Some(&t), 0.5, &mut loss1)
            .unwrap();
        return (
            b.download(&three, len).unwrap(),
            b.download(&loss3, rows).unwrap(),
            b.download(&one, len).unwrap(),
            b.download(&loss1, rows).unwrap(),
        );
    }
    let bits: Vec<u16> = cos.iter().map(|&c| narrow(c, dtype)).collect();
    let up16 = || {
        let mut d = b.alloc::<u16>(bits.len()).unwrap();
        b.upload(&bits, &mut d).unwrap();
        d
    };
    let (mut three, mut one) = (up16(), up16());
    b.margin_rowmax16(&three, shape, dtype, &l, &p, Some(&t), &mut mx, &mut tc)
        .unwrap();
    b.exp_rowsum16(&three, shape, dtype, &l, &p, Some(&t), &mx, &mut sum)
        .unwrap();
    b.softmax_loss_grad16(
        &mut three,
        shape,
        dtype,
        &l,
        &p,
        Some(&t),
        &mx,
        &sum,
        &tc,
        1.0,
        &mut loss3,
    )
    .unwrap();
    b.margin_softmax_fused16(&mut one, shape, dtype, &l, &p, Some(&t), 1.0, &mut loss1)
        .unwrap();
    let wide = |d: &B::Buf<u16>| -> Vec<f32> {
        b.download(d, len)
            .unwrap()
            .iter()
            .map(|&h| widen(h, dtype))
            .collect()
    };
    (
        wide(&three),
        b.download(&loss3, rows).unwrap(),
        wide(&one),
        b.download(&loss1, rows).unwrap(),
    )
}

/// Every margin-softmax kernel with a margin table of a different margin on every row (negative
/// angular margins among them, the monotonic fallback and the exact gradient too) against its
/// CPU reference with the same table; and against the CPU without the table, to show the table
/// counts. f32: 1e-4 relative (1e-6 absolute); 16-bit gradients: two steps of the 16-bit type.
#[test]
fn every_softmax_kernel_reads_its_rows_entry_as_the_cpu_does() {
    let Some(g) = gpu() else { return };
    let (rows, cols) = (37usize, 203usize);
    let shape = LogitsShape::aligned(rows, cols).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut cos = vec![0.0f32; rows * shape.ld];
    for v in cos.iter_mut() {
        *v = (next() * 2.04 - 1.02) as f32;
    }
    let labels: Vec<i32> = (0..rows)
        .map(|i| {
            if i % 9 == 4 {
                -1
            } else {
                ((i * 53) % cols) as i32
            }
        })
        .collect();
    let monotonic = Margin {
        fallback: TargetFallback::Monotonic,
        grad_mode: GradMode::Exact,
        ..Margin::combined(16.0, 1.0, 0.5, 0.1)
    };
    for margin in [base(), monotonic, Margin::combined(16.0, 1.0, 0.0, 0.0)] {
        let mut table = Vec::new();
        for _ in 0..rows {
            table.extend(margin.row_entry(next() * 1.4 - 0.5, next() * 0.9 - 0.3));
        }
        let plain: Vec<f32> = (0..rows)
            .flat_map(|_| margin.row_entry(margin.m2, margin.m3))
            .collect();
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            let want = kernels(&CpuBackend, &cos, shape, dtype, &labels, &margin, &table);
            let got = kernels(&g, &cos, shape, dtype, &labels, &margin, &table);
            let without = kernels(&CpuBackend, &cos, shape, dtype, &labels, &margin, &plain);
            assert_ne!(want.1, without.1, "{dtype:?}: the table changes the loss");
            let step = match dtype {
                Dtype::F32 => 1e-4,
                Dtype::Bf16 => 2.0 * 2f32.powi(-8),
                _ => 2.0 * 2f32.powi(-11),
            };
            let close = |what: &str, a: &[f32], b: &[f32], rel: f32| {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let tol = rel * x.abs().max(y.abs()) + 1e-6;
                    assert!(
                        (x - y).abs() <= tol,
                        "{dtype:?} {margin:?} {what}[{i}]: {x} vs {y}"
                    );
                }
            };
            close("three-pass gradient", &got.0, &want.0, step);
            close("three-pass loss", &got.1, &want.1, 1e-4);
            close("fused gradient", &got.2, &want.2, step);
            close("fused loss", &got.3, &want.3, 1e-4);
        }
    }
}

#[test]
fn margins_act_per_row_on_the_device_in_each_precision() {
    if gpu().is_none() {
        return;
    }
    for precision in [GemmPrecision::F32, GemmPrecision::Bf16] {
        for world in [1, 3] {
            let plain = on_gpu(0.3, world, precision, base(), None, None);
            let same2 = vec![0.4f32; ROWS];
            let same3 = vec![0.1f32; ROWS];
            assert_eq!(
                on_gpu(0.3, world, precision, base(), Some(&same2), Some(&same3)),
                plain,
                "{precision:?} world {world}: the layer's own margins"
            );
            let (m2, m3) = (alternate(0.2, 0.6), alternate(0.05, 0.3));
            let mixed = on_gpu(0.3, world, precision, base(), Some(&m2), Some(&m3));
            let with = |a: f32, c: f32| Margin {
                m2: f64::from(a),
                m3: f64::from(c),
                ..base()
            };
            let even = on_gpu(0.3, world, precision, with(0.2, 0.05), None, None);
            let odd = on_gpu(0.3, world, precision, with(0.6, 0.3), None, None);
            assert_ne!(even[0].grad_embeddings, odd[0].grad_embeddings);
            for rank in 0..world {
                let first = Shard::of(ROWS as u64, world, rank).start as usize;
                for r in 0..mixed[rank].grad_embeddings.len() / DIM {
                    let want = if PATTERN[first + r] == 0 { &even } else { &odd };
                    let span = r * DIM..(r + 1) * DIM;
                    assert_eq!(
                        mixed[rank].grad_embeddings[span.clone()],
                        want[rank].grad_embeddings[span],
                        "{precision:?} world {world} row {}",
                        first + r
                    );
                }
            }
        }
    }
}

/// A sampled pass (r = 0.3) on one GPU rank against one CPU rank: the same sample, the same
/// loss and gradients within 1e-4; then every class sampled, on one and on three GPU ranks.
#[test]
fn margins_on_the_device_match_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let (x, labels) = batch();
    let m2: Vec<f32> = (0..ROWS)
        .map(|i| 0.3 + 0.05 * (i % 5) as f32 - 0.4 * (i % 7 == 0) as i32 as f32)
        .collect();
    let m3: Vec<f32> = (0..ROWS).map(|i| 0.1 * (i % 3) as f32).collect();
    let options = PassOptions::new()
        .angular_margins(&m2)
        .additive_margins(&m3);
    let sampled = config(1, GemmPrecision::F32, base());
    let mut cpu = PartialFc::new(sampled.clone(), CpuBackend, SingleRank).unwrap();
    let mut gpu_layer = PartialFc::new(sampled, CudaBackend::new(0).unwrap(), SingleRank).unwrap();
    let a = cpu.forward_backward_with(&x, &labels, options).unwrap();
    let b = gpu_layer
        .forward_backward_with(&x, &labels, options)
        .unwrap();
    assert_eq!(
        cpu.sampled_classes().unwrap(),
        gpu_layer.sampled_classes().unwrap()
    );
    assert!(
        (a.loss - b.loss).abs() <= 1e-4 * a.loss.abs(),
        "{} vs {}",
        a.loss,
        b.loss
    );
    let scale = a.grad_embeddings.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (p, q) in a.grad_embeddings.iter().zip(&b.grad_embeddings) {
        assert!((p - q).abs() <= 1e-4 * scale, "{p} vs {q}");
    }
    // Every class sampled: one CPU rank and three GPU ranks then score the same classes.
    let mut cfg = config(1, GemmPrecision::F32, base());
    cfg.sample_rate = 1.0;
    let mut cpu = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let want = cpu.forward_backward_with(&x, &labels, options).unwrap();
    for world in [1, 3] {
        let got = on_gpu(1.0, world, GemmPrecision::F32, base(), Some(&m2), Some(&m3));
        assert!(
            (got[0].loss - want.loss).abs() <= 1e-4 * want.loss.abs(),
            "world {world}: {} vs {}",
            got[0].loss,
            want.loss
        );
        let grads: Vec<f32> = got.iter().flat_map(|p| p.grad_embeddings.clone()).collect();
        let scale = want
            .grad_embeddings
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        for (i, (p, q)) in grads.iter().zip(&want.grad_embeddings).enumerate() {
            assert!(
                (p - q).abs() <= 1e-4 * scale,
                "world {world} gradient {i}: {p} vs {q}"
            );
        }
    }
}
