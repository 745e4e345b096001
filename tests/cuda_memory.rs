//! The CUDA step allocates what the planner says, transient buffers included: the high-water
//! mark of the device's memory pool over two steps (every buffer of the backend comes from it)
//! against `planned_memory`, for f32 and 16-bit GEMMs and both momentum dtypes. On a GPU this
//! is the device's own pool; on the emulator its pool counts every allocation of the backend.
//! One test in its own binary, so that no other test allocates meanwhile.
#![cfg(feature = "cuda")]

mod cuda_device;

use cuda_device::gpu;
use cudarc::driver::sys;
use partial_fc::collective::SingleRank;
use partial_fc::{GemmPrecision, LayerConfig, PartialFc, StateDtype};

fn pool_attr(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, set: Option<u64>) -> u64 {
    let mut v: u64 = set.unwrap_or(0);
    // SAFETY: these attributes are 64-bit values (cuuint64_t), passed by pointer.
    let r = unsafe {
        match set {
            Some(_) => sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut _),
            None => sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _),
        }
    };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "pool attribute {attr:?}");
    v
}

#[test]
fn step_allocates_what_the_planner_says() {
    use sys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        CU_MEMPOOL_ATTR_USED_MEM_HIGH,
    };
    for (precision, state) in [
        (GemmPrecision::F32, StateDtype::F32),
        (GemmPrecision::Bf16, StateDtype::F32),
        (GemmPrecision::Bf16, StateDtype::Bf16),
        (GemmPrecision::F16, StateDtype::Bf16),
    ] {
        let Some(g) = gpu() else { return };
        g.context().bind_to_thread().unwrap();
        let mut pool = std::ptr::null_mut();
        // SAFETY: a driver query on the backend's device.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, g.context().cu_device()) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        pool_attr(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX));
        // The previous configuration's buffers are freed in stream order: wait for them.
        g.context().synchronize().unwrap();
        let before = pool_attr(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, None);
        pool_attr(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0)); // resets it to the current use

        let mut cfg = LayerConfig::new(50_000, 128, 256);
        cfg.sample_rate = 0.1;
        cfg.precision = precision;
        cfg.optimizer.as_mut().unwrap().state_dtype = state;
        let mut layer = PartialFc::zeroed(cfg, g, SingleRank).unwrap();
        let x: Vec<f32> = (0..256 * 128)
            .map(|i| ((i * 31 % 997) as f32 - 498.0) / 498.0)
            .collect();
        let labels: Vec<i64> = (0..256).map(|i| (i * 193) as i64).collect();
        for _ in 0..2 {
            layer.forward_backward(&x, &labels).unwrap();
            layer.step(0.1).unwrap();
        }
        let used = pool_attr(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH, None) - before;
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
