//! Implementations of [`crate::Collective`]: one rank alone, k ranks as threads of one process,
//! any backend through a host collective, and (feature `cuda`) NCCL in `crate::cuda::nccl`.

mod host_staged;
mod single;
mod thread_group;

pub use host_staged::HostStaged;
pub use single::SingleRank;
pub use thread_group::{ThreadCollective, ThreadGroup};
