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
use partial_fc::cuda::CudaBackend;
use partial_fc::{
    Collective, CpuBackend, GemmPrecision, GradMode, LayerConfig, Margin, PartialFc, PassOptions,
    Shard, StepOutput,
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

fn alternate(a: f32, b: f32) -> Vec<f32> {
    (0..ROWS).map(|i| if i % 2 == 0 { a } else { b }).collect()
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
                    let want = if (first + r).is_multiple_of(2) {
                        &even
                    } else {
                        &odd
                    };
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
