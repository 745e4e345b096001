//! # partial-fc
//!
//! Partial FC (An et al., ICCVW 2021) for Rust: a margin-softmax classifier over millions to
//! hundreds of millions of classes, its weights sharded over k ranks, each step using every
//! positive class center plus a sampled fraction r of the negatives.
//!
//! - [`PartialFc`]: one rank's layer, generic over a [`Backend`] (CPU, CUDA) and a
//!   [`Collective`] (single rank, threads, NCCL).
//! - [`plan`]: the per-GPU memory model and the upper bound on classes over cluster sizes.
//! - [`cpu`]: the CPU backend, whose small kernels are the reference for the CUDA ones.
//! - [`multi_label`]: several true classes per row (extreme multi-label classification):
//!   [`PairBatch`] trains every (row, label) pair and sums the gradient back to the rows.
#![warn(missing_docs)]

mod atomic_file;
pub mod backend;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod deadline;
pub mod error;
pub mod golden;
pub mod init;
pub mod layer;
pub mod mag_face;
pub mod multi_label;
pub mod plan;
pub mod rendezvous;
pub mod rng;
pub mod row_margins;
pub mod shard;
pub mod synthetic;
pub mod tensor_file;

pub use backend::{Backend, Collective, Elem, LogitsShape, ReduceOp, SampleArgs, StateBuf};
pub use config::{
    AdamW, GemmPrecision, GradMode, LayerConfig, Margin, MarginParams, NegativeSampler, Optimizer,
    Sgd, StateDtype, TargetFallback, UpdateMode,
};
pub use cpu::CpuBackend;
pub use error::{PfcError, Result};
pub use layer::{
    inverse_propensities, PartialFc, PassOptions, Prediction, PropensityMetrics, RankingMetrics,
    RowResults, StepOutput, ROW_ADDITIVE_MARGIN, ROW_ANGULAR_MARGIN,
};
pub use mag_face::{MagFace, MagFaceMargins};
pub use multi_label::PairBatch;
pub use row_margins::{elastic_margins, AdaFace, AdaFaceMargins, MarginKind};
pub use shard::Shard;

/// The README's Rust example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;
