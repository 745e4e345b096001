//! One error type for the whole crate: every way user input or the environment can be wrong.

use std::path::PathBuf;

/// The result type of every fallible function in this crate.
pub type Result<T, E = PfcError> = std::result::Result<T, E>;

/// Everything that can go wrong, with enough context to fix it without a debugger.
///
/// `#[non_exhaustive]`: a later version may add ways to fail; match with a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PfcError {
    /// A shape or size argument does not agree with the layer's configuration or another argument.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A class label outside `[0, num_classes)` (negative labels included).
    #[error("label {label} at row {row} is outside [0, {num_classes})")]
    Label {
        /// Row of the batch that holds the label.
        row: usize,
        /// The offending label.
        label: i64,
        /// Number of classes of the layer.
        num_classes: u64,
    },
    /// An embedding value is NaN or infinite.
    #[error("embedding row {row} holds a non-finite value ({value})")]
    NonFinite {
        /// Row of the batch.
        row: usize,
        /// The first non-finite value found.
        value: f32,
    },
    /// An embedding row the step cannot carry though every value is finite: a value the 16-bit
    /// all-gather wire rounds to infinity, a row it rounds to all zeros, or a row whose sum of
    /// squares overflows f32 (its norm would be infinite and its direction lost).
    #[error("embedding row {row}: {reason}")]
    OutOfRange {
        /// Row of the batch.
        row: usize,
        /// The value (or the row's largest magnitude) at fault.
        value: f32,
        /// What the step would have done with it, and what to do instead.
        reason: String,
    },
    /// A class center holds a non-finite value: training diverged (a learning rate too high),
    /// and a prediction over it would be the nearest of the classes that are left.
    #[error(
        "class {class}'s center is not finite, or its sum of squares overflows f32: the \
         classifier diverged (lower the learning rate and resume from a checkpoint); no \
         prediction"
    )]
    Diverged {
        /// A class whose center is not finite.
        class: i64,
    },
    /// An embedding row is all zeros and cannot be L2-normalized.
    #[error("embedding row {row} is all zeros and has no direction to normalize")]
    ZeroRow {
        /// Row of the batch.
        row: usize,
    },
    /// A configuration parameter is outside its domain.
    #[error("invalid parameter {name} = {value}: {reason}")]
    Param {
        /// Parameter name as the user spells it.
        name: &'static str,
        /// Its value, printed.
        value: String,
        /// The domain it must lie in.
        reason: String,
    },
    /// A checkpoint that does not belong to this layer (other shard, world size, dims).
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// File that was read.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A safetensors file that cannot be parsed (truncated, corrupt, wrong dtype).
    #[error("{path}: {reason}")]
    Format {
        /// File that was read.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file system error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// File or folder involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A collective operation failed (a peer rank hung up, timed out, or NCCL reported an error).
    #[error("collective: {0}")]
    Collective(String),
    /// The requested backend is not available on this machine (no driver, no library, no device).
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// A device-side error (CUDA driver, NVRTC, cuBLAS, NCCL).
    #[error("device: {0}")]
    Device(String),
    /// A call out of order: `step` with no gradient pending (no pass since the last `step`, or
    /// the last pass failed).
    #[error("call order: {0}")]
    Order(String),
}

impl PfcError {
    /// Shorthand for [`PfcError::Param`].
    pub fn param(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        PfcError::Param {
            name,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
