//! The CUDA step allocates what the planner says, transient buffers included: the high-water
//! mark of the device's memory pool over two steps (every buffer of the backend comes from it)
//! against `planned_memory`, for f32 and 16-bit GEMMs and both momentum dtypes. On a GPU this
//! is the device's own pool; on the emulator its pool counts every allocation of the backend.
//! One test in its own binary, so that no other test allocates meanwhile.
#![cfg(feature = "cuda")]

mod cuda_device;

use cuda_device::gpu;
use partial_fc::collective::SingleRank;
use partial_fc::{GemmPrecision, LayerConfig, PartialFc, StateDtype};

#[test]
fn step_allocates_what_the_planner_says() {
    for (precision, state) in [
        (GemmPrecision::F32, StateDtype::F32),
        (GemmPrecision::Bf16, StateDtype::F32),
        (GemmPrecision::Bf16, StateDtype::Bf16),
        (GemmPrecision::F16, StateDtype::Bf16),
    ] {
        let Some(g) = gpu() else { return };
        let pool = g.memory_pool().unwrap();
        pool.keep_reserved().unwrap();
        // The previous configuration's buffers are freed in stream order: wait for them.
        g.context().synchronize().unwrap();
        let before = pool.used().unwrap();
        pool.reset_used_high().unwrap(); // to the current use

        let mut cfg = LayerConfig::new(50_000, 128, 256);
        cfg.sample_rate = 0.1;
        cfg.precision = precision;
        cfg.optimizer.as_mut().unwrap().set_state_dtype(state);
        let mut layer = PartialFc::zeroed(cfg, g, SingleRank).unwrap();
        let x: Vec<f32> = (0..256 * 128)
            .map(|i| ((i * 31 % 997) as f32 - 498.0) / 498.0)
            .collect();
        let labels: Vec<i64> = (0..256).map(|i| (i * 193) as i64).collect();
        for _ in 0..2 {
            layer.forward_backward(&x, &labels).unwrap();
            layer.step(0.1).unwrap();
        }
        let used = pool.used_high().unwrap() - before;
        let planned: u64 = layer.planned_memory().iter().map(|(_, b)| b).sum();
        // Beyond the planner: the sampler's state, histogram, block counts and candidate list
        // (about 50 KB here) and each buffer's rounding; a forgotten logits-sized buffer would
        // be 5 MB.
        let slack = 1 << 20;
        let what = format!("{precision} GEMMs, {state} momentum");
        assert!(
            used >= planned,
            "{what}: pool peak {used} B < planned {planned} B"
        );
        assert!(
            used <= planned + slack,
            "{what}: pool peak {used} B exceeds planned {planned} B by more than {slack} B"
        );
        println!("{what}: pool peak {used} B, planned {planned} B");
    }
}
