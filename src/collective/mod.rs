//! Implementations of [`crate::Collective`]: one rank alone, and k ranks as threads of one process.

mod single;
mod thread_group;

pub use single::SingleRank;
pub use thread_group::{ThreadCollective, ThreadGroup};
