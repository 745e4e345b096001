//! The device's default memory pool, from which every buffer of a [`CudaBackend`] comes (cudarc's
//! stream-ordered allocations): its use and high-water mark, which is how a step's peak memory is
//! measured (examples/cuda_step_memory.rs, tests/cuda_memory.rs).
//!
//! ```no_run
//! use partial_fc::cuda::CudaBackend;
//! let gpu = CudaBackend::new(0)?;
//! let pool = gpu.memory_pool()?;
//! pool.reset_used_high()?;
//! // ... run steps ...
//! println!("peak {} bytes", pool.used_high()?);
//! # Ok::<(), partial_fc::PfcError>(())
//! ```

use super::{dev, CudaBackend};
use crate::error::{PfcError, Result};
use cudarc::driver::sys;
use sys::CUmemPool_attribute::{
    CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
    CU_MEMPOOL_ATTR_USED_MEM_HIGH,
};

/// The default memory pool of a backend's device.
pub struct MemoryPool {
    pool: sys::CUmemoryPool,
}

impl CudaBackend {
    /// The default memory pool of this backend's device.
    pub fn memory_pool(&self) -> Result<MemoryPool> {
        self.context()
            .bind_to_thread()
            .map_err(dev("binding the context"))?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: a driver query on the backend's device, into a local.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.context().cu_device()) };
        check(r, "cuDeviceGetDefaultMemPool")?;
        Ok(MemoryPool { pool })
    }
}

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(PfcError::Device(format!("{what}: {r:?}")))
    }
}

impl MemoryPool {
    fn get(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: these attributes are 64-bit values (cuuint64_t), passed by pointer.
        let r =
            unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) };
        check(r, "cuMemPoolGetAttribute")?;
        Ok(v)
    }

    fn set(&self, attr: sys::CUmemPool_attribute, mut v: u64) -> Result<()> {
        // SAFETY: as in `get`.
        let r =
            unsafe { sys::cuMemPoolSetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) };
        check(r, "cuMemPoolSetAttribute")
    }

    /// Bytes of the pool's allocations in use now.
    pub fn used(&self) -> Result<u64> {
        self.get(CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// The most bytes in use since the last [`MemoryPool::reset_used_high`].
    pub fn used_high(&self) -> Result<u64> {
        self.get(CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Resets the high-water mark to the current use.
    pub fn reset_used_high(&self) -> Result<()> {
        self.set(CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
    }

    /// Tells the pool to keep what it reserved (release threshold = max), so that the device's
    /// free memory shows the pool's peak.
    pub fn keep_reserved(&self) -> Result<()> {
        self.set(CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
    }
}
