//! Where the time of one CUDA step goes: every kernel of the step run alone at the whole-step
//! bench's shapes (shard 1M, gathered batch 1024, d 512, r 0.1), synchronized and timed, for f32
//! and bf16 GEMM operands. `cargo run --release --features cuda --example cuda_profile_step`
//! (`-- --small --emulator`: every line at small shapes on the CPU emulator, a smoke test).

use partial_fc::cuda::{CudaBackend, Precision};
use partial_fc::plan::Dtype;
use partial_fc::LogitsShape;
use partial_fc::{Backend, Margin, SampleArgs};
use std::time::Instant;

fn time(g: &CudaBackend, name: &str, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    g.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    g.synchronize().unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("{name:>28}: {ms:8.3} ms");
    ms
}

/// The logits' row length is S = 104,857 here (int(0.1 · 2^20), as PartialFC_V2 computes it):
/// odd, so dense rows would give the logits GEMM an odd leading dimension and the backward GEMMs
/// one too, which keeps cuBLAS off its 16-byte-aligned (TMA on sm_90) tensor-core kernels, and
/// the softmax passes off their float4 path. The layer pads each row to a multiple of 8
/// (`LogitsShape::aligned`); this times the same kernels on dense rows (the layout before) and on
/// the layer's padded rows, in the same run.
#[allow(clippy::too_many_arguments)]
fn alignment_probe(
    g: &CudaBackend,
    m: usize,
    s: usize,
    d: usize,
    xh: &cudarc::driver::CudaSlice<f32>,
    wh: &cudarc::driver::CudaSlice<f32>,
    local: &cudarc::driver::CudaSlice<i32>,
    p: &partial_fc::MarginParams,
) {
    let padded = LogitsShape::aligned(m, s).unwrap().ld;
    println!("-- alignment probe: S = {s}, rows dense ({s}) vs padded ({padded}, the layer's)");
    let mut wpad = g.alloc::<f32>(padded * d).unwrap();
    g.copy(wh, &mut wpad, s * d).unwrap();
    let mut logits = g.alloc::<f32>(m * padded).unwrap();
    let mut gx = g.alloc::<f32>(m * d).unwrap();
    let mut gw = g.alloc::<f32>(padded * d).unwrap();
    let (mut mx, mut tc) = (g.alloc::<f32>(m).unwrap(), g.alloc::<f32>(m).unwrap());
    let sixteen = g.precision() != Precision::F32;
    let mut cos16 = g
        .alloc::<u16>(if sixteen { m * padded } else { 0 })
        .unwrap();
    for shape in [
        LogitsShape::dense(m, s),
        LogitsShape::aligned(m, s).unwrap(),
    ] {
        let cols = shape.ld; // the GEMMs run over every column of a row, padding included
        if sixteen {
            // What the layer's 16-bit step runs: 16-bit cosines straight from the GEMM, the
            // backward pair reading the 16-bit gradient, no logits-sized cast.
            time(g, &format!("gemm_nt16, {cols} cols"), 10, || {
                g.gemm_nt16(m, cols, d, xh, &wpad, &mut cos16).unwrap()
            });
            time(g, &format!("gemm_backward16, {cols} cols"), 10, || {
                g.gemm_backward16(m, cols, d, &cos16, 1.0, &wpad, xh, &mut gx, &mut gw, true)
                    .unwrap()
            });
            g.gemm_nt16(m, cols, d, xh, &wpad, &mut cos16).unwrap();
            time(g, &format!("margin_rowmax16, {cols} cols"), 10, || {
                g.margin_rowmax16(&cos16, shape, Dtype::Bf16, local, p, None, &mut mx, &mut tc)
                    .unwrap()
            });
            continue;
        }
        time(g, &format!("gemm_nt, {cols} cols"), 10, || {
            g.gemm_nt(m, cols, d, xh, &wpad, &mut logits).unwrap()
        });
        time(g, &format!("gemm_nn, {cols} cols"), 10, || {
            g.gemm_nn(m, d, cols, &logits, &wpad, &mut gx).unwrap()
        });
        time(g, &format!("gemm_tn, {cols} cols"), 10, || {
            g.gemm_tn(cols, d, m, &logits, xh, &mut gw).unwrap()
        });
        g.gemm_nt(m, cols, d, xh, &wpad, &mut logits).unwrap();
        time(g, &format!("margin_rowmax, {cols} cols"), 10, || {
            g.margin_rowmax(&mut logits, shape, local, p, None, &mut mx, &mut tc)
                .unwrap()
        });
    }
}

fn main() {
    // `--small --emulator`: a smoke run of every line at small shapes on the CPU emulator of the
    // CUDA driver (where there is no GPU); its times mean nothing.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let small = args.iter().any(|a| a == "--small");
    let emulator = args.iter().any(|a| a == "--emulator");
    if emulator && partial_fc::cuda::check_available().is_err() {
        #[cfg(unix)]
        if let Err(e) = pfc_cuda_emulator::install() {
            eprintln!("--emulator: {e}");
            std::process::exit(1);
        }
    }
    let g0 = match CudaBackend::new(0) {
        Ok(g) => g,
        // Asked for the emulator (CI's smoke run), not running is a failure, not a skip.
        Err(e) if emulator => {
            eprintln!("--emulator: no CUDA device ({e})");
            std::process::exit(1);
        }
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    println!("device: {}", g0.device_name());
    let (shard, m, d) = if small {
        (1usize << 13, 64usize, 32usize)
    } else {
        (1usize << 20, 1024usize, 512usize)
    };
    let s = (0.1 * shard as f64) as usize;
    // The layer's layout: logits rows and sampled-center rows padded to a multiple of 8.
    let shape = LogitsShape::aligned(m, s).unwrap();
    let ld = shape.ld;
    for precision in [Precision::F32, Precision::Bf16] {
        let g = CudaBackend::new(0).unwrap().with_precision(precision);
        println!("== {precision:?}");
        let w_host = partial_fc::init::normal_rows(1, 0, shard, d, 0.01);
        let mut w = g.alloc::<f32>(shard * d).unwrap();
        g.upload(&w_host, &mut w).unwrap();
        drop(w_host);
        let x_host = partial_fc::init::normal_rows(2, 0, m, d, 1.0);
        let mut x = g.alloc::<f32>(m * d).unwrap();
        g.upload(&x_host, &mut x).unwrap();
        let labels_host: Vec<i64> = (0..m as i64).map(|i| i * 1021 % shard as i64).collect();
        let mut glabels = g.alloc::<i64>(m).unwrap();
        g.upload(&labels_host, &mut glabels).unwrap();
        let mut local = g.alloc::<i32>(m).unwrap();
        let (mut xh, mut xn) = (g.alloc::<f32>(m * d).unwrap(), g.alloc::<f32>(m).unwrap());
        let mut keys = g.alloc::<u64>(shard).unwrap();
        let mut sampled = g.alloc::<i32>(s.max(m)).unwrap();
        let (mut wh, mut wn) = (g.alloc::<f32>(ld * d).unwrap(), g.alloc::<f32>(s).unwrap());
        let mut logits = g.alloc::<f32>(m * ld).unwrap();
        let (mut mx, mut tc, mut sum, mut loss) = (
            g.alloc::<f32>(m).unwrap(),
            g.alloc::<f32>(m).unwrap(),
            g.alloc::<f32>(m).unwrap(),
            g.alloc::<f32>(2 * m).unwrap(),
        );
        let mut gx = g.alloc::<f32>(m * d).unwrap();
        let mut gw = g.alloc::<f32>(ld * d).unwrap();
        let mut mom = partial_fc::StateBuf::F32(g.alloc::<f32>(shard * d).unwrap());
        let p = Margin::arcface().params();
        let args = SampleArgs {
            shard_len: shard,
            shard_start: 0,
            num_sample: s,
            rows: m,
            seed: 1,
            step: 0,
            hard_fraction: 0.0,
        };
        let mut total = 0.0;
        total += time(&g, "localize_labels", 20, || {
            g.localize_labels(&glabels, m, 0, shard, &mut local)
                .unwrap()
        });
        total += time(&g, "normalize_rows", 20, || {
            g.normalize_rows(&x, m, d, &mut xh, &mut xn).unwrap()
        });
        total += time(&g, "sample_classes", 20, || {
            g.localize_labels(&glabels, m, 0, shard, &mut local)
                .unwrap();
            g.sample_classes(&args, &mut local, None, &mut keys, &mut sampled)
                .unwrap();
        });
        total += time(&g, "gather_normalize_rows", 20, || {
            g.gather_normalize_rows(&w, d, &sampled, s, &mut wh, &mut wn)
                .unwrap()
        });
        total += time(&g, "gemm_nt (logits)", 10, || {
            g.gemm_nt(m, ld, d, &xh, &wh, &mut logits).unwrap()
        });
        total += time(&g, "margin_rowmax", 10, || {
            g.margin_rowmax(&mut logits, shape, &local, &p, None, &mut mx, &mut tc)
                .unwrap()
        });
        total += time(&g, "exp_rowsum", 10, || {
            g.exp_rowsum(&logits, shape, &mx, &mut sum).unwrap()
        });
        total += time(&g, "softmax_loss_grad", 10, || {
            g.softmax_loss_grad(
                &mut logits,
                shape,
                &local,
                &p,
                None,
                &mx,
                &sum,
                &tc,
                1.0 / m as f32,
                &mut loss,
            )
            .unwrap()
        });
        total += time(&g, "gemm_nn (grad x)", 10, || {
            g.gemm_nn(m, d, ld, &logits, &wh, &mut gx).unwrap()
        });
        total += time(&g, "gemm_tn (grad w)", 10, || {
            g.gemm_tn(ld, d, m, &logits, &xh, &mut gw).unwrap()
        });
        total += time(&g, "normalize_backward x", 20, || {
            g.normalize_backward(&mut gx, &xh, &xn, m, d).unwrap()
        });
        total += time(&g, "normalize_backward w", 20, || {
            g.normalize_backward(&mut gw, &wh, &wn, s, d).unwrap()
        });
        total += time(&g, "sgd_momentum_sparse", 20, || {
            g.sgd_momentum_sparse(&mut w, &mut mom, &gw, &sampled, s, d, 0.0, 0.9, 0.0)
                .unwrap()
        });
        total += time(&g, "download loss (sync)", 20, || {
            drop(g.download(&loss, m).unwrap())
        });
        println!("{:>28}: {total:8.3} ms", "sum of kernels");
        drop((w, mom, logits, keys, gw));
        alignment_probe(&g, m, s, d, &xh, &wh, &local, &p);
        drop(wh);
        let mut cfg = partial_fc::LayerConfig::new(shard as u64, d, m);
        cfg.sample_rate = 0.1;
        cfg.precision = precision;
        let gl = CudaBackend::new(0).unwrap();
        let mut layer =
            partial_fc::PartialFc::new(cfg, gl, partial_fc::collective::SingleRank).unwrap();
        time(&g, "layer forward_backward", 10, || {
            drop(layer.forward_backward(&x_host, &labels_host).unwrap())
        });
        time(&g, "layer fwd_bwd + step", 10, || {
            layer.forward_backward(&x_host, &labels_host).unwrap();
            layer.step(0.1).unwrap();
            layer.backend().synchronize().unwrap();
        });
    }
}
