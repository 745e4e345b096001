//! Memory planner: what one rank's step allocates, the upper bound on classes over cluster sizes,
//! and what fits.
//!
//! - [`buffers`]: the buffers of one rank's step, shared with the layer (which allocates them).
//! - [`PlanConfig`] / [`Plan`]: a cluster configuration and everything the planner says about
//!   it (per-component bytes, fit, largest class count, upper bound over cluster sizes).
//! - [`units`]: parsing and printing sizes and class counts.
//! - [`sweep`]: memory against class count for the three regimes, and its SVG plot.

pub mod buffers;
pub mod config;
pub mod model;
pub mod sweep;
pub mod units;

pub use buffers::{step_buffers, Component, Dtype, LogitsMode, StepShape};
pub use config::{Optimizer, PlanConfig};
pub use model::{Plan, UpperBound};
