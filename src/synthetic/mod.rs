//! Synthetic identities, a small backbone and verification metrics for the training demo
//! (`cargo run --release --example train_synthetic`).
//!
//! - [`data`]: deterministic synthetic identities, held-out identities for evaluation.
//! - [`backbone`]: a two-layer MLP trained with plain SGD.
//! - [`metrics`]: TAR at FAR over genuine/impostor pairs, 1:N identification top-1.
//! - [`mod@train`]: the driver, a shared backbone and a Partial FC head sharded over thread ranks.
//! - `plot`: loss curves as SVG (feature `plot`, on by default).
//! - [`SplitMix64`]: the examples' small seeded generator.

pub mod backbone;
pub mod data;
pub mod metrics;
#[cfg(feature = "plot")]
pub mod plot;
mod split_mix;
pub mod train;

pub use split_mix::SplitMix64;
pub use train::{train, train_on, RowMarginMode, StepEvent, TrainConfig, TrainReport};
