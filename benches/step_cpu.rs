//! One full Partial FC step on the CPU at the reference size: C = 200,000 classes,
//! batch 512, d = 512, r = 0.1, one rank (sampling, forward, backward, sparse SGD update), and
//! its parts, with the three GEMMs alone as the in-run baseline; and the sparse optimizer update
//! alone (20,000 sampled rows of d = 512): SGD with momentum against AdamW with f32 and with bf16
//! moments (the latter's stochastic rounding draws Philox bits per value).

use criterion::{criterion_group, criterion_main, Criterion};
use partial_fc::backend::AdamWStep;
use partial_fc::collective::SingleRank;
use partial_fc::cpu::gemm::{gemm_nn, gemm_nt, gemm_tn};
use partial_fc::{
    AdamW, Backend, CpuBackend, LayerConfig, PartialFc, PassOptions, StateBuf, StateDtype,
};
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
    // The same pass with a weight per row (`forward_backward_weighted`): what scaling the
    // logits' gradient rows adds.
    let weights: Vec<f32> = (0..BATCH).map(|i| 0.5 + (i % 3) as f32 * 0.5).collect();
    group.bench_function("forward_backward_weighted", |b| {
        b.iter(|| {
            black_box(
                fwd_bwd
                    .forward_backward_weighted(&x, &labels, &weights)
                    .unwrap()
                    .loss,
            )
        })
    });
    // The same pass with both margins per row (AdaFace's shape: `forward_backward_with`): what
    // the table's all-gather and its reads on the target logits add.
    let m2: Vec<f32> = (0..BATCH)
        .map(|i| 0.4 - 0.8 * (i % 7) as f32 / 6.0)
        .collect();
    let m3: Vec<f32> = m2.iter().map(|&a| 0.4 - a).collect();
    group.bench_function("forward_backward_row_margins", |b| {
        b.iter(|| {
            let options = PassOptions::new()
                .angular_margins(&m2)
                .additive_margins(&m3);
            black_box(
                fwd_bwd
                    .forward_backward_with(&x, &labels, options)
                    .unwrap()
                    .loss,
            )
        })
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

fn bench_optimizer(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_sparse_update_20k_rows_d512");
    group.sample_size(10);
    let rows = (RATE * CLASSES as f64) as usize;
    let len = CLASSES as usize * DIM;
    let index: Vec<i32> = (0..rows as i32).map(|i| i * 10).collect();
    let grad = partial_fc::init::normal_rows(7, 0, rows, DIM, 0.01);
    let mut weight = partial_fc::init::normal_rows(8, 0, CLASSES as usize, DIM, 0.01);
    let state = |dtype| {
        let mut s = StateBuf::alloc(&CpuBackend, dtype, len).unwrap();
        s.upload(&CpuBackend, &vec![0.0; len]).unwrap();
        s
    };
    let cpu = CpuBackend;
    let mut momentum = state(StateDtype::F32);
    group.bench_function("sgd_momentum_f32", |b| {
        b.iter(|| {
            cpu.sgd_momentum_sparse(
                &mut weight,
                &mut momentum,
                &grad,
                &index,
                rows,
                DIM,
                0.1,
                0.9,
                5e-4,
            )
            .unwrap()
        })
    });
    for dtype in [StateDtype::F32, StateDtype::Bf16] {
        let (mut m, mut v) = (state(dtype), state(dtype));
        let mut t = 0;
        group.bench_function(format!("adamw_{dtype}"), |b| {
            b.iter(|| {
                t += 1;
                let step = AdamWStep {
                    lr: 1e-3,
                    adamw: AdamW {
                        state_dtype: dtype,
                        ..AdamW::default()
                    },
                    t,
                    seed: 1,
                };
                cpu.adamw_sparse(&mut weight, &mut m, &mut v, &grad, &index, rows, DIM, step)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_step, bench_optimizer);
criterion_main!(benches);
