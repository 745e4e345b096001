//! Peak resident memory of forward+backward at the benchmark configuration (C = 200,000,
//! batch 512, d = 512, r = 0.1, one rank, no optimizer state), for comparison with the published
//! implementation's 1.43 GB max RSS at the same configuration.
//!
//! `cargo run --release --example peak_memory [-- --classes 200000 --steps 5]`

use partial_fc::collective::SingleRank;
use partial_fc::{CpuBackend, LayerConfig, PartialFc};

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), partial_fc::PfcError> {
    let classes = arg("--classes", 200_000);
    let steps = arg("--steps", 5);
    let (batch, dim) = (512usize, 512usize);
    let mut cfg = LayerConfig::new(classes, dim, batch);
    cfg.sample_rate = 0.1;
    cfg.optimizer = None;
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank)?;
    let reported: u64 = layer.memory_report().iter().map(|(_, b)| b).sum();
    let x = partial_fc::init::normal_rows(7, 0, batch, dim, 1.0);
    let labels: Vec<i64> = (0..batch as i64)
        .map(|i| i * 389 % classes as i64)
        .collect();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = layer.forward_backward(&x, &labels)?.loss;
    }
    let hwm = vm_hwm_kib().map_or("unknown".to_string(), |k| {
        format!("{:.1} MB", k as f64 * 1024.0 / 1e6)
    });
    println!(
        "classes {classes}  batch {batch}  dim {dim}  r 0.1  steps {steps}  loss {loss:.3}\n\
         layer buffers (memory report): {:.1} MB\n\
         peak resident memory (VmHWM): {hwm}",
        reported as f64 / 1e6
    );
    Ok(())
}
