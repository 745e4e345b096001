//! Peak GPU memory of the CUDA step at the whole-step benchmark configuration (shard 1M classes,
//! gathered batch 1024, d 512, r 0.1, sparse update, one rank), for comparison with
//! `benches/torch_partial_fc.py`'s `torch.cuda.max_memory_allocated()`.
//!
//! Options: `--precision f32|bf16|f16` (GEMM operands, default f32) and
//! `--momentum-dtype f32|bf16` (optimizer state, default f32).
//!
//! Three numbers, from the narrowest to the widest:
//! - the layer's own buffers (`PartialFc::memory_report`, the planner's components);
//! - the high-water mark of the stream-ordered memory pool that every buffer of the backend
//!   comes from (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`): persistent buffers plus the step's transient
//!   ones (sampler scratch, block counts) at their peak;
//! - free device memory before the layer minus free after two steps, with the pool told to keep
//!   what it reserved (release threshold = max), so the pool's peak, the cuBLAS workspace and
//!   handle are all in it. Module code and the context were loaded before the first reading.
//!
//! `cargo run --release --features cuda --example cuda_step_memory -- --precision bf16 --momentum-dtype bf16`
//!
//! `--emulator` runs it on the CPU emulator of the CUDA driver (crates/cuda-emulator) where there
//! is no GPU: its memory pool counts every allocation of the backend (rounded to 256 bytes), so
//! the pool's high-water mark is the code's own allocation peak; it knows nothing of a real
//! allocator's granularity, the context or cuBLAS's workspace.

use partial_fc::collective::SingleRank;
use partial_fc::cuda::CudaBackend;
use partial_fc::{Backend, GemmPrecision, LayerConfig, PartialFc, PfcError, StateDtype};

/// `--precision`, `--momentum-dtype` and `--emulator`.
fn options() -> Result<(GemmPrecision, StateDtype, bool), PfcError> {
    let (mut precision, mut state, mut emulator) = (GemmPrecision::F32, StateDtype::F32, false);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--emulator" {
            emulator = true;
            continue;
        }
        let value = args.next().unwrap_or_default();
        match (flag.as_str(), value.as_str()) {
            ("--precision", "f32") => precision = GemmPrecision::F32,
            ("--precision", "bf16") => precision = GemmPrecision::Bf16,
            ("--precision", "f16") => precision = GemmPrecision::F16,
            ("--momentum-dtype", "f32") => state = StateDtype::F32,
            ("--momentum-dtype", "bf16") => state = StateDtype::Bf16,
            _ => {
                return Err(PfcError::param(
                    "arguments",
                    format!("{flag} {value}"),
                    "expected --precision f32|bf16|f16, --momentum-dtype f32|bf16, --emulator",
                ))
            }
        }
    }
    Ok((precision, state, emulator))
}

const MIB: f64 = 1024.0 * 1024.0;

fn main() -> Result<(), partial_fc::PfcError> {
    let (precision, state, emulator) = options()?;
    if emulator && partial_fc::cuda::check_available().is_err() {
        #[cfg(unix)]
        pfc_cuda_emulator::install().map_err(PfcError::BackendUnavailable)?;
        #[cfg(not(unix))]
        return Err(PfcError::BackendUnavailable(
            "the CUDA emulator runs on x86-64 Linux only".into(),
        ));
        #[cfg(unix)]
        println!("(on the CPU emulator of the CUDA driver: allocations only, not a GPU)");
    }
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return Ok(());
        }
    };
    // The pool keeps what it reserved (so free memory shows its peak), its high-water mark reset.
    let pool = gpu.memory_pool().ok();
    if let Some(p) = &pool {
        let _ = p.keep_reserved();
        let _ = p.reset_used_high();
    }
    let free_before = gpu
        .context()
        .mem_get_info()
        .map_err(|e| partial_fc::PfcError::Device(format!("{e:?}")))?
        .0;

    let mut cfg = LayerConfig::new(1 << 20, 512, 1024);
    cfg.sample_rate = 0.1;
    cfg.precision = precision;
    cfg.optimizer.as_mut().unwrap().set_state_dtype(state);
    let mut layer = PartialFc::zeroed(cfg, gpu, SingleRank)?;
    let x: Vec<f32> = (0..1024 * 512)
        .map(|i| ((i * 31 % 997) as f32 - 498.0) / 498.0)
        .collect();
    let labels: Vec<i64> = (0..1024).map(|i| (i * 1021) as i64).collect();
    for _ in 0..2 {
        layer.forward_backward(&x, &labels)?;
        layer.step(0.1)?;
    }
    layer.backend().synchronize()?;
    let free_after = layer
        .backend()
        .context()
        .mem_get_info()
        .map_err(|e| partial_fc::PfcError::Device(format!("{e:?}")))?
        .0;

    let report = layer.memory_report();
    let buffers: u64 = report.iter().map(|(_, b)| b).sum();
    println!(
        "== CUDA step peak memory (shard 1M, batch 1024, d 512, r 0.1, {precision} GEMMs, \
         {state} momentum, sparse update)"
    );
    for (component, bytes) in &report {
        println!("  {component:?}: {:.1} MiB", *bytes as f64 / MIB);
    }
    println!(
        "layer buffers (memory_report total): {:.1} MiB",
        buffers as f64 / MIB
    );
    match pool.and_then(|p| p.used_high().ok()) {
        Some(high) => println!(
            "memory pool high-water mark (all buffers, transient included): {:.1} MiB",
            high as f64 / MIB
        ),
        None => println!("memory pool high-water mark: not available"),
    }
    println!(
        "device free before - after (pool peak kept + cuBLAS workspace): {:.1} MiB",
        free_before.saturating_sub(free_after) as f64 / MIB
    );
    Ok(())
}
