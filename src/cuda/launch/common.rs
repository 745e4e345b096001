//! What the glue of every kernel family uses, as cuda/common.cuh is what the kernels use: the
//! launch configs (a block per row, a warp per row, a thread per element, grid-stride, a single
//! block), the buffer-length checks each method makes before it queues a kernel, the `int`
//! conversion of the kernels' size arguments, the kernels' 16-bit dtype codes, and the `launch!`
//! macro that queues a kernel by name.

use crate::backend::Elem;
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use cudarc::driver::{CudaSlice, LaunchConfig};

/// Threads per block of the row kernels: one block per row ([`per_row`]), or one warp per row,
/// `ROW_THREADS / 32` rows a block ([`per_warp_row`]).
const ROW_THREADS: u32 = 256;
// The kernels' block reductions and the warp-per-row layout assume whole warps.
const _: () = assert!(ROW_THREADS.is_multiple_of(32));
// top_k_merge reads a row's running top k with one thread per slot.
const _: () = assert!(crate::cpu::top_k::TOP_K_MAX <= ROW_THREADS as usize);
/// Threads per block of the element-wise kernels.
const ELEM_THREADS: u32 = 256;

pub(super) fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| PfcError::Shape(format!("{what} = {v} exceeds i32::MAX")))
}

/// The kernels' code of a 16-bit dtype (common.cuh `HALF_F16` = 1, `HALF_BF16` = 2); `None`
/// for f32.
pub(super) fn half_code(dtype: Dtype) -> Option<i32> {
    match dtype {
        Dtype::F16 => Some(1),
        Dtype::Bf16 => Some(2),
        Dtype::F32 => None,
    }
}

pub(super) fn need<T: Elem>(buf: &CudaSlice<T>, len: usize, what: &str) -> Result<()> {
    if buf.len() < len {
        return Err(PfcError::Shape(format!(
            "{what}: buffer of {} elements, {len} needed",
            buf.len()
        )));
    }
    Ok(())
}

/// [`need`] of `a · b` elements; a product past `usize::MAX` needs more than any buffer holds
/// (a wrapped product would pass the check and send a kernel past the buffer's end).
pub(super) fn need_product<T: Elem>(
    buf: &CudaSlice<T>,
    [a, b]: [usize; 2],
    what: &str,
) -> Result<()> {
    need(buf, a.saturating_mul(b), what)
}

pub(super) fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, `ROW_THREADS / 32` rows per block (cuda/normalize.cu says why).
pub(super) fn per_warp_row(rows: usize) -> LaunchConfig {
    let rows_per_block = (ROW_THREADS / 32) as usize;
    LaunchConfig {
        grid_dim: (rows.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn per_elem(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(ELEM_THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid of the grid-stride kernels (the casts of cuda/wire.cu, the dense optimizer updates):
/// one thread per element up to 2^16 blocks, beyond that each thread loops (the grid's x
/// dimension could hold more, but more blocks than the device runs at once only add
/// scheduling).
pub(super) fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(ELEM_THREADS as usize).clamp(1, 1 << 16) as u32,
            1,
            1,
        ),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn single_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches a kernel: `launch!(self, "name", cfg, arg, arg, ...)`, each arg a reference.
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        let f = $self.func($name)?;
        let mut builder = $self.stream.launch_builder(f);
        $(builder.arg($arg);)*
        // SAFETY: argument types and counts match the kernel's signature in cuda/*.cu, and the
        // callers checked buffer lengths against the sizes the kernel touches.
        unsafe { builder.launch($cfg) }.map_err(dev(concat!("launch ", $name)))?;
    }};
}
pub(super) use launch;
