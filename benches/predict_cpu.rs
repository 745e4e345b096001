//! `predict_top_k` on the CPU at the step bench's size (C = 200,000 classes, 512 rows, d = 512,
//! k = 5, one rank), against its own scoring GEMMs alone (512 × 200,000 × 512, in the same
//! chunks of 4096 classes): what the normalization of the centers and the top-k merge add; and
//! the same prediction from the layer's checkpoint file (`CheckpointSet::predict_top_k`, as
//! `pfc predict` runs it), which reads the centers from the file (page cache) chunk by chunk.

use criterion::{criterion_group, criterion_main, Criterion};
use partial_fc::collective::SingleRank;
use partial_fc::cpu::gemm::gemm_nt;
use partial_fc::{CpuBackend, LayerConfig, PartialFc};
use std::hint::black_box;

const CLASSES: u64 = 200_000;
const BATCH: usize = 512;
const DIM: usize = 512;
const K: usize = 5;
const CHUNK: usize = 4096;

fn bench_predict(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_predict_200k_b512_d512_k5");
    group.sample_size(10);
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH);
    cfg.optimizer = None;
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let x = partial_fc::init::normal_rows(7, 0, BATCH, DIM, 1.0);
    group.bench_function("predict_top_k", |b| {
        b.iter(|| black_box(layer.predict_top_k(black_box(&x), K).unwrap().classes[0]))
    });

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rank0.safetensors");
    layer.save(&path).unwrap();
    let set = partial_fc::checkpoint::CheckpointSet::open(&[&path]).unwrap();
    group.bench_function("checkpoint_predict_top_k", |b| {
        b.iter(|| {
            black_box(
                set.predict_top_k(black_box(&x), K, &|_| {})
                    .unwrap()
                    .classes[0],
            )
        })
    });

    // Baseline: the GEMMs of the same scoring, chunk by chunk, nothing else.
    let w = vec![0.02f32; CHUNK * DIM];
    let mut cosines = vec![0.0f32; BATCH * CHUNK];
    group.bench_function("baseline_scoring_gemms", |b| {
        b.iter(|| {
            for start in (0..CLASSES as usize).step_by(CHUNK) {
                let len = CHUNK.min(CLASSES as usize - start);
                gemm_nt(BATCH, len, DIM, &x, &w, &mut cosines).unwrap();
            }
            black_box(cosines[0])
        })
    });
    group.finish();
}

criterion_group!(benches, bench_predict);
criterion_main!(benches);
