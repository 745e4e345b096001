//! Implementations of [`crate::Collective`]: one rank alone, k ranks as threads of one process,
//! any backend through a host collective, and (feature `cuda`) NCCL in `crate::cuda::nccl`.

mod host_staged;
mod single;
mod thread_group;

pub use host_staged::HostStaged;
pub use single::SingleRank;
pub use thread_group::{ThreadCollective, ThreadGroup};

use crate::error::{PfcError, Result};
use crate::plan::Dtype;

/// The dtype check of every `reduce_scatter_16`: f16 or bf16, never f32 (whose bit patterns do
/// not fit in 16 bits: a caller that means f32 wants `reduce_scatter_f32`).
pub(crate) fn check_16_bit(dtype: Dtype) -> Result<()> {
    if dtype == Dtype::F32 {
        return Err(PfcError::param(
            "grad_wire",
            "f32",
            "a 16-bit reduce-scatter sums f16 or bf16; f32 goes through reduce_scatter_f32",
        ));
    }
    Ok(())
}
