//! CUDA benchmarks, each with its baseline in the same run:
//! - the three margin-softmax passes and the world-of-one fused kernel vs a device-to-device copy
//!   (GB/s of the bytes each moves);
//! - sampling 1M classes vs one read and write of the keys;
//! - the dense optimizer updates (SGD with momentum, AdamW) over a 256k × 512 shard vs a
//!   device-to-device copy (GB/s of the bytes each moves: SGD reads weight, momentum, gradient and
//!   writes weight, momentum; AdamW reads one more state and writes it);
//! - the whole step (shard 1M, gathered batch 1024, d 512, r 0.1, sparse update), with f32 and
//!   bf16 GEMM operands and, with bf16 GEMMs, AdamW in place of SGD (baseline:
//!   benches/torch_partial_fc.py, run by scripts/device-check.sh).
//!
//! Without a CUDA device it prints "skipped: no CUDA device" and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use partial_fc::backend::AdamWStep;
use partial_fc::collective::SingleRank;
use partial_fc::cuda::{CudaBackend, Precision};
use partial_fc::LogitsShape;
use partial_fc::{
    AdamW, Backend, LayerConfig, Margin, PartialFc, SampleArgs, StateBuf, StateDtype,
};

fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// The criterion bench's historical shape (100,000 columns, a multiple of 4: the float4 path),
/// and the whole step's S = 104,857 (int(0.1 · 2^20)) as dense rows (odd: the scalar path) and as
/// the layer lays them out, padded to 104,864 (`LogitsShape::aligned`: the float4 path, the
/// padding masked). Throughput counts the class columns' bytes only, so the padded layout gets
/// no credit for its 7 extra columns a row.
fn margin_softmax(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let step_s = 104_857;
    for (name, shape) in [
        (
            "margin_softmax_1024x100k",
            LogitsShape::dense(1024, 100_000),
        ),
        (
            "margin_softmax_1024x104857_dense",
            LogitsShape::dense(1024, step_s),
        ),
        (
            "margin_softmax_1024x104857_padded",
            LogitsShape::aligned(1024, step_s).unwrap(),
        ),
    ] {
        margin_softmax_at(c, &g, name, shape);
    }
}

fn margin_softmax_at(c: &mut Criterion, g: &CudaBackend, name: &str, shape: LogitsShape) {
    let LogitsShape { rows, cols, ld } = shape;
    let host: Vec<f32> = (0..rows * ld)
        .map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 1000.0)
        .collect();
    let labels: Vec<i32> = (0..rows).map(|i| ((i * 97) % cols) as i32).collect();
    let mut logits = g.alloc::<f32>(rows * ld).unwrap();
    let mut scratch = g.alloc::<f32>(rows * cols).unwrap();
    let mut dl = g.alloc::<i32>(rows).unwrap();
    g.upload(&labels, &mut dl).unwrap();
    g.upload(&host, &mut logits).unwrap();
    drop(host);
    let (mut mx, mut tc, mut sum, mut loss) = (
        g.alloc(rows).unwrap(),
        g.alloc(rows).unwrap(),
        g.alloc(rows).unwrap(),
        g.alloc(2 * rows).unwrap(),
    );
    let p = Margin::arcface().params();
    let bytes = (rows * cols * 4) as u64;
    let mut group = c.benchmark_group(name);
    // Pass 1 reads and writes, pass 2 reads, pass 3 reads and writes. Later iterations run on
    // the previous gradients: the same traffic.
    group.throughput(Throughput::Bytes(5 * bytes));
    group.bench_function("three_passes", |b| {
        b.iter(|| {
            g.margin_rowmax(&mut logits, shape, &dl, &p, None, &mut mx, &mut tc)
                .unwrap();
            g.exp_rowsum(&logits, shape, &mx, &mut sum).unwrap();
            g.softmax_loss_grad(
                &mut logits,
                shape,
                &dl,
                &p,
                None,
                &mx,
                &sum,
                &tc,
                1.0 / rows as f32,
                &mut loss,
            )
            .unwrap();
            g.synchronize().unwrap();
        })
    });
    // The world-of-one kernel: sweep 1 reads the logits, sweep 2 reads and writes them, plus
    // the labels read and the per-row losses written (4 bytes each per row). Rows are 400 KB
    // and about a thousand are in flight, far past L2, so sweep 2 rereads from DRAM.
    group.throughput(Throughput::Bytes(3 * bytes + 8 * rows as u64));
    group.bench_function("fused_one_kernel", |b| {
        b.iter(|| {
            g.margin_softmax_fused(
                &mut logits,
                shape,
                &dl,
                &p,
                None,
                1.0 / rows as f32,
                &mut loss,
            )
            .unwrap();
            g.synchronize().unwrap();
        })
    });
    // The same kernel with a per-row margin table (`forward_backward_with`): thread 0 of each
    // row reads its 16 bytes; the loops over the logits do not change.
    let margin = Margin::arcface();
    let table: Vec<f32> = (0..rows)
        .flat_map(|i| margin.row_entry(0.4 + 0.2 * (i % 5) as f64 / 4.0, 0.0))
        .collect();
    let mut dt = g.alloc::<f32>(table.len()).unwrap();
    g.upload(&table, &mut dt).unwrap();
    group.bench_function("fused_one_kernel_row_margins", |b| {
        b.iter(|| {
            g.margin_softmax_fused(
                &mut logits,
                shape,
                &dl,
                &p,
                Some(&dt),
                1.0 / rows as f32,
                &mut loss,
            )
            .unwrap();
            g.synchronize().unwrap();
        })
    });
    group.throughput(Throughput::Bytes(2 * bytes));
    group.bench_function("dtod_copy_same_bytes", |b| {
        b.iter(|| {
            g.copy(&logits, &mut scratch, rows * cols).unwrap();
            g.synchronize().unwrap();
        })
    });
    // What a weighted pass adds (`forward_backward_weighted`): one read and write of the
    // logits, against the copy above. Weights of 1, so repeated runs keep the values.
    let mut weights = g.alloc::<f32>(rows).unwrap();
    g.upload(&vec![1.0f32; rows], &mut weights).unwrap();
    group.throughput(Throughput::Bytes((rows * ld * 8) as u64));
    group.bench_function("scale_rows", |b| {
        b.iter(|| {
            g.scale_rows(&mut logits, shape, &weights).unwrap();
            g.synchronize().unwrap();
        })
    });
    group.finish();
}

fn sampling(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let (shard, rows) = (1usize << 20, 1024usize);
    let labels: Vec<i32> = (0..rows).map(|i| ((i * 7919) % shard) as i32).collect();
    let mut dl = g.alloc::<i32>(rows).unwrap();
    let mut keys = g.alloc::<u64>(shard).unwrap();
    let mut keys2 = g.alloc::<u64>(shard).unwrap();
    let mut sampled = g.alloc::<i32>(shard).unwrap();
    let args = SampleArgs {
        shard_len: shard,
        shard_start: 0,
        num_sample: shard / 10,
        rows,
        seed: 1,
        step: 0,
        hard_fraction: 0.0,
    };
    let mut group = c.benchmark_group("sampling_1M");
    group.throughput(Throughput::Bytes((shard * 8 * 2) as u64));
    group.bench_function("sample_classes", |b| {
        b.iter(|| {
            g.upload(&labels, &mut dl).unwrap();
            g.sample_classes(&args, &mut dl, None, &mut keys, &mut sampled)
                .unwrap();
            g.synchronize().unwrap();
        })
    });
    group.bench_function("keys_read_write", |b| {
        b.iter(|| {
            g.copy(&keys, &mut keys2, shard).unwrap();
            g.synchronize().unwrap();
        })
    });
    group.finish();
}

fn optimizer(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let len = (1usize << 18) * 512;
    let host: Vec<f32> = (0..len)
        .map(|i| ((i % 1999) as f32 - 999.0) * 1e-4)
        .collect();
    let upload = |host: &[f32]| {
        let mut b = g.alloc::<f32>(len).unwrap();
        g.upload(host, &mut b).unwrap();
        b
    };
    let (mut weight, grad, mut copy) = (upload(&host), upload(&host), upload(&host));
    let state = || {
        let mut s = StateBuf::alloc(&g, StateDtype::F32, len).unwrap();
        s.upload(&g, &vec![0.0; len]).unwrap();
        s
    };
    let (mut m, mut v) = (state(), state());
    let bytes = (len * 4) as u64;
    let mut group = c.benchmark_group("optimizer_dense_256k_d512");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(5 * bytes));
    group.bench_function("sgd_momentum_dense", |b| {
        b.iter(|| {
            g.sgd_momentum_dense(&mut weight, &mut m, &grad, len, 1e-3, 0.9, 5e-4)
                .unwrap();
            g.synchronize().unwrap();
        })
    });
    group.throughput(Throughput::Bytes(7 * bytes));
    let mut t = 0u64;
    group.bench_function("adamw_dense", |b| {
        b.iter(|| {
            t += 1;
            let step = AdamWStep {
                lr: 1e-3,
                adamw: AdamW::default(),
                t,
                seed: 0,
            };
            g.adamw_dense(&mut weight, &mut m, &mut v, &grad, len, step)
                .unwrap();
            g.synchronize().unwrap();
        })
    });
    // A copy of 3.5 tensors reads and writes 7 tensors' bytes, AdamW's traffic.
    group.bench_function("dtod_copy_same_bytes", |b| {
        b.iter(|| {
            for _ in 0..3 {
                g.copy(&grad, &mut copy, len).unwrap();
            }
            g.copy(&grad, &mut copy, len / 2).unwrap();
            g.synchronize().unwrap();
        })
    });
    group.finish();
}

fn whole_step(c: &mut Criterion) {
    if gpu().is_none() {
        return;
    }
    let x: Vec<f32> = (0..1024 * 512)
        .map(|i| ((i * 31 % 997) as f32 - 498.0) / 498.0)
        .collect();
    let labels: Vec<i64> = (0..1024).map(|i| (i * 1021) as i64).collect();
    let mut group = c.benchmark_group("step_1M_b1024_d512_r0.1");
    group.sample_size(10);
    let weights = vec![1.0f32; 1024];
    for (name, precision, adamw, weighted) in [
        ("cuda_f32_sparse", Precision::F32, false, false),
        ("cuda_bf16_sparse", Precision::Bf16, false, false),
        ("cuda_bf16_sparse_adamw", Precision::Bf16, true, false),
        ("cuda_bf16_sparse_weighted", Precision::Bf16, false, true),
    ] {
        let mut cfg = LayerConfig::new(1 << 20, 512, 1024);
        cfg.sample_rate = 0.1;
        cfg.precision = precision;
        if adamw {
            cfg.optimizer = Some(AdamW::default().into());
        }
        let gpu = CudaBackend::new(0).unwrap();
        let mut layer = PartialFc::zeroed(cfg, gpu, SingleRank).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                if weighted {
                    layer
                        .forward_backward_weighted(&x, &labels, &weights)
                        .unwrap();
                } else {
                    layer.forward_backward(&x, &labels).unwrap();
                }
                layer.step(0.1).unwrap();
                layer.backend().synchronize().unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, margin_softmax, sampling, optimizer, whole_step);
criterion_main!(benches);
