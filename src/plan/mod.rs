//! Memory planner: what one rank's step allocates, the model-parallel upper bound, and what fits.

pub mod buffers;

pub use buffers::{step_buffers, Component, Dtype, LogitsMode, StepShape};
