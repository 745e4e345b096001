//! One full Partial FC step on the CPU at the reference size: C = 200,000 classes,
//! batch 512, d = 512, r = 0.1, one rank (sampling, forward, backward, sparse SGD update), and
//! its parts, with the three GEMMs alone as the in-run baseline.

use criterion::{criterion_group, criterion_main, Criterion};
use partial_fc::collective::SingleRank;
use partial_fc::cpu::gemm::{gemm_nn, gemm_nt, gemm_tn};
use partial_fc::{CpuBackend, LayerConfig, PartialFc};
use std::hint::black_box;

const CLASSES: u64 = 200_000;
const BATCH: usize = 512;
const DIM: usize = 512;
const RATE: f64 = 0.1;

fn inputs(step: u64) -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(1000 + step, 0, BATCH, DIM, 1.0);
    let labels = (0..BATCH as u64)
        .map(|i| ((i * 7919 + step * 104_729) % CLASSES) as i64)
        .collect();
    (x, labels)
}

fn bench_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_step_200k_b512_d512_r0.1");
    group.sample_size(10);
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH);
    cfg.sample_rate = RATE;
    let mut layer = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let (x, labels) = inputs(0);
    group.bench_function("full_step_sparse_sgd", |b| {
        b.iter(|| {
            let out = layer
                .forward_backward(black_box(&x), black_box(&labels))
                .unwrap();
            layer.step(0.1).unwrap();
            black_box(out.loss)
        })
    });
    cfg.optimizer = None;
    let mut fwd_bwd = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    group.bench_function("forward_backward", |b| {
        b.iter(|| black_box(fwd_bwd.forward_backward(&x, &labels).unwrap().loss))
    });

    // Baseline: the three GEMMs of the step at the same shapes, nothing else.
    let s = (RATE * CLASSES as f64) as usize;
    let a = vec![0.01f32; BATCH * DIM];
    let w = vec![0.02f32; s * DIM];
    let mut logits = vec![0.0f32; BATCH * s];
    let mut gx = vec![0.0f32; BATCH * DIM];
    let mut gw = vec![0.0f32; s * DIM];
    group.bench_function("baseline_three_gemms", |b| {
        b.iter(|| {
            gemm_nt(BATCH, s, DIM, &a, &w, &mut logits).unwrap();
            gemm_nn(BATCH, DIM, s, &logits, &w, &mut gx).unwrap();
            gemm_tn(s, DIM, BATCH, &logits, &a, &mut gw).unwrap();
            black_box(gw[0])
        })
    });
    group.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
