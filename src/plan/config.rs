//! The planner's inputs: one cluster configuration, validated, and the step shape of its ranks.

use super::buffers::{step_buffers, step_buffers_wide, Component, Dtype, LogitsMode, StepShape};
use crate::config::{GemmPrecision, UpdateMode};
use crate::error::{PfcError, Result};
use crate::shard::Shard;

/// The most classes one shard may hold: the layer indexes a shard with `i32`.
pub const MAX_SHARD_CLASSES: u64 = i32::MAX as u64;
/// The most GPUs the planner considers, in a configuration and in its searches over k.
pub const MAX_GPUS: u64 = 1 << 32;
/// The largest batch per GPU accepted.
pub const MAX_BATCH: u64 = 1 << 24;
/// The largest embedding dimension accepted.
pub const MAX_DIM: u64 = 1 << 20;
/// The largest device memory or reserve accepted (1 EiB): keeps every sum within 64 bits.
pub const MAX_MEMORY: u64 = 1 << 60;

/// Optimizer state kept per weight of the shard (stored in [`PlanConfig::state_dtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Optimizer {
    /// No state (plain SGD, or forward/backward only).
    None,
    /// SGD with momentum: one state tensor (the published default).
    #[default]
    SgdMomentum,
    /// AdamW: two state tensors (first and second moments).
    AdamW,
}

impl Optimizer {
    /// Number of `shard × d` state tensors.
    pub fn states(self) -> u64 {
        match self {
            Optimizer::None => 0,
            Optimizer::SgdMomentum => 1,
            Optimizer::AdamW => 2,
        }
    }
}

/// One cluster configuration: everything that decides the per-GPU memory of the FC layer.
///
/// [`PlanConfig::new`] fills the published defaults: 128 images per GPU, d = 512, r = 0.1,
/// f32 weights, SGD momentum in f32, sparse update, materialized logits, f32 on the wire
/// (embeddings and gradient), no hard negatives, f32 GEMMs, nothing reserved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanConfig {
    /// Total number of classes C.
    pub classes: u64,
    /// Number of GPUs k (one rank each).
    pub gpus: u64,
    /// Images per GPU per step, N.
    pub batch_per_gpu: u64,
    /// Embedding dimension d.
    pub dim: u64,
    /// Sample rate r in [0, 1]; 1 is model parallel, 0 positives only.
    pub sample_rate: f64,
    /// Memory of one device, bytes.
    pub gpu_memory: u64,
    /// Bytes reserved for everything outside the FC layer (backbone, activations, framework).
    pub reserved: u64,
    /// Storage dtype of the weight shard.
    pub weight_dtype: Dtype,
    /// Optimizer state.
    pub optimizer: Optimizer,
    /// Storage dtype of the optimizer state (the layer offers f32 and bf16, see
    /// [`crate::StateDtype`]).
    pub state_dtype: Dtype,
    /// Sparse (sampled rows only) or dense (full-shard gradient) update.
    pub update: UpdateMode,
    /// Materialized or fused logits.
    pub logits: LogitsMode,
    /// Dtype of the all-gathered embeddings on the wire.
    pub wire_dtype: Dtype,
    /// Dtype of the embedding gradient on the backward's reduce-scatter.
    pub grad_wire_dtype: Dtype,
    /// Whether hard negatives are scored (adds their scratch buffers).
    pub hard_negatives: bool,
    /// Operand precision of the step's GEMMs (16-bit adds the operand copies).
    pub gemm_precision: GemmPrecision,
}

impl PlanConfig {
    /// `classes` over `gpus` devices of `gpu_memory` bytes each, every other input at its default.
    pub fn new(classes: u64, gpus: u64, gpu_memory: u64) -> PlanConfig {
        PlanConfig {
            classes,
            gpus,
            batch_per_gpu: 128,
            dim: 512,
            sample_rate: 0.1,
            gpu_memory,
            reserved: 0,
            weight_dtype: Dtype::F32,
            optimizer: Optimizer::SgdMomentum,
            state_dtype: Dtype::F32,
            update: UpdateMode::Sparse,
            logits: LogitsMode::Materialized,
            wire_dtype: Dtype::F32,
            grad_wire_dtype: Dtype::F32,
            hard_negatives: false,
            gemm_precision: GemmPrecision::F32,
        }
    }

    /// Checks every input against its domain; the error names the offending parameter.
    pub fn validate(&self) -> Result<()> {
        if self.gpus == 0 || self.gpus > MAX_GPUS {
            return Err(PfcError::param(
                "gpus",
                self.gpus,
                format!("must lie in [1, {MAX_GPUS}]"),
            ));
        }
        if self.batch_per_gpu == 0 || self.batch_per_gpu > MAX_BATCH {
            return Err(PfcError::param(
                "batch",
                self.batch_per_gpu,
                format!("must lie in [1, {MAX_BATCH}]"),
            ));
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(PfcError::param(
                "dim",
                self.dim,
                format!("must lie in [1, {MAX_DIM}]"),
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(PfcError::param(
                "sample_rate",
                self.sample_rate,
                "must lie in [0, 1]",
            ));
        }
        if self.gpu_memory == 0 || self.gpu_memory > MAX_MEMORY {
            return Err(PfcError::param(
                "gpu_memory",
                self.gpu_memory,
                "must lie in [1 byte, 1 EiB]",
            ));
        }
        if self.reserved > MAX_MEMORY {
            return Err(PfcError::param(
                "reserved",
                self.reserved,
                "must be at most 1 EiB",
            ));
        }
        if self.classes < self.gpus {
            return Err(PfcError::param(
                "classes",
                self.classes,
                format!(
                    "must be >= the number of GPUs ({}) so that no shard is empty",
                    self.gpus
                ),
            ));
        }
        if self.classes.div_ceil(self.gpus) > MAX_SHARD_CLASSES {
            return Err(PfcError::param(
                "classes",
                self.classes,
                format!("a shard may hold at most {MAX_SHARD_CLASSES} classes"),
            ));
        }
        Ok(())
    }

    /// The shard of `rank` (rank 0 holds the largest).
    pub fn shard(&self, rank: u64) -> Shard {
        Shard::of(self.classes, self.gpus as usize, rank as usize)
    }

    /// The step shape of a rank holding `shard_classes` classes in a group of `gpus`, at
    /// sample rate `sample_rate`, everything else from this configuration.
    pub fn shape(&self, shard_classes: u64, gpus: u64, sample_rate: f64) -> StepShape {
        StepShape {
            shard_classes,
            world_size: gpus,
            batch_per_rank: self.batch_per_gpu,
            dim: self.dim,
            sample_rate,
            weight_dtype: self.weight_dtype,
            optimizer_states: self.optimizer.states(),
            state_dtype: self.state_dtype,
            update: self.update,
            logits: self.logits,
            wire_dtype: self.wire_dtype,
            grad_wire_dtype: self.grad_wire_dtype,
            hard_negatives: self.hard_negatives,
            gemm_precision: self.gemm_precision,
        }
    }

    /// Rank 0's step shape (the largest shard: the one that sizes the device).
    pub fn rank0_shape(&self) -> StepShape {
        self.shape(
            self.classes.div_ceil(self.gpus.max(1)),
            self.gpus,
            self.sample_rate,
        )
    }

    /// Bytes of the FC layer's buffers for a rank of the given shape, or `None` when they do not
    /// fit in 63 bits (a configuration no device can hold). Summed in `u128`, so that no input
    /// can overflow it.
    pub fn fc_bytes(shape: &StepShape) -> Option<u64> {
        let total = step_buffers_wide(shape)
            .iter()
            .fold(0u128, |acc, (_, b)| acc.saturating_add(*b));
        u64::try_from(total).ok().filter(|&t| t < 1 << 63)
    }

    /// Bytes rank 0 needs in all (FC buffers plus the reserve), `None` beyond 63 bits (an
    /// unvalidated reserve near `u64::MAX` included: no device holds it either).
    pub fn rank0_total(&self) -> Option<u64> {
        Self::fc_bytes(&self.rank0_shape())
            .and_then(|b| b.checked_add(self.reserved))
            .filter(|&total| total < 1 << 63)
    }

    /// Rank 0's buffers by component, the reserve last (empty when they exceed 63 bits).
    pub fn rank0_components(&self) -> Vec<(Component, u64)> {
        if self.rank0_total().is_none() {
            return Vec::new();
        }
        let mut parts = step_buffers(&self.rank0_shape());
        parts.push((Component::Reserved, self.reserved));
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_published_ones_and_valid() {
        let c = PlanConfig::new(29_000_000, 8, 32 << 30);
        c.validate().unwrap();
        assert_eq!((c.batch_per_gpu, c.dim, c.sample_rate), (128, 512, 0.1));
        assert_eq!(c.optimizer.states(), 1);
        assert_eq!(c.rank0_shape().shard_classes, 3_625_000);
    }

    #[test]
    fn every_bad_input_is_a_typed_error_naming_it() {
        let ok = PlanConfig::new(1000, 4, 1 << 30);
        let cases: Vec<(PlanConfig, &str)> = vec![
            (PlanConfig { gpus: 0, ..ok }, "gpus"),
            (
                PlanConfig {
                    batch_per_gpu: 0,
                    ..ok
                },
                "batch",
            ),
            (PlanConfig { dim: 0, ..ok }, "dim"),
            (
                PlanConfig {
                    sample_rate: 1.5,
                    ..ok
                },
                "sample_rate",
            ),
            (
                PlanConfig {
                    sample_rate: -0.1,
                    ..ok
                },
                "sample_rate",
            ),
            (
                PlanConfig {
                    sample_rate: f64::NAN,
                    ..ok
                },
                "sample_rate",
            ),
            (
                PlanConfig {
                    gpu_memory: 0,
                    ..ok
                },
                "gpu_memory",
            ),
            (
                PlanConfig {
                    reserved: u64::MAX,
                    ..ok
                },
                "reserved",
            ),
            (PlanConfig { classes: 3, ..ok }, "classes"),
            (
                PlanConfig {
                    classes: u64::MAX,
                    ..ok
                },
                "classes",
            ),
        ];
        for (cfg, want) in cases {
            match cfg.validate() {
                Err(PfcError::Param { name, .. }) => assert_eq!(name, want),
                other => panic!("{cfg:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn huge_shapes_are_refused_before_they_overflow() {
        // every limit at once: 2^56 gathered rows of 2^20 values are 2^78 bytes
        let mut c = PlanConfig::new(MAX_GPUS, MAX_GPUS, MAX_MEMORY);
        c.batch_per_gpu = MAX_BATCH;
        c.dim = MAX_DIM;
        c.validate().unwrap();
        assert_eq!(c.rank0_total(), None);
        assert!(c.rank0_components().is_empty());
        assert_eq!(PlanConfig::fc_bytes(&c.rank0_shape()), None);
    }

    #[test]
    fn the_largest_shard_batch_and_dimension_on_four_gpus_have_an_exact_total() {
        // 2^31-class shards of 2^20-wide rows: the weights alone are 2^53 bytes, which the old
        // guard's ×64 margin refused; the exact sum is below 2^63 and is reported.
        let mut c = PlanConfig::new(MAX_SHARD_CLASSES * 4, 4, MAX_MEMORY);
        c.batch_per_gpu = MAX_BATCH;
        c.dim = MAX_DIM;
        c.validate().unwrap();
        let total = c.rank0_total().expect("below 2^63");
        let parts = c.rank0_components();
        assert_eq!(parts.iter().map(|(_, b)| b).sum::<u64>(), total);
        let weights = parts[0].1;
        assert_eq!(weights, MAX_SHARD_CLASSES * MAX_DIM * 4);
        assert!(total > weights && total < 1 << 63);
    }

    #[test]
    fn fused_logits_are_not_refused_for_a_product_they_never_allocate() {
        // 2^54 gathered rows against shards of 8 classes: M·shard is 2^57, which the old
        // overflow guard counted (×64) although fused logits allocate nothing of that size. The
        // real bytes are about 2^59.5: they fit in 63 bits and in the largest memory accepted.
        let mut c = PlanConfig::new(8 << 30, 1 << 30, MAX_MEMORY);
        c.batch_per_gpu = MAX_BATCH;
        c.dim = 1;
        c.logits = LogitsMode::Fused;
        c.validate().unwrap();
        let total = c.rank0_total().expect("fits in 63 bits");
        let parts = c.rank0_components();
        assert_eq!(parts.iter().map(|(_, b)| b).sum::<u64>(), total);
        assert!(total > 1 << 59 && total < MAX_MEMORY, "{total}");
        // materialized, the logits add 2^54 rows × 8 columns (the 8-aligned stride) × 4 bytes
        c.logits = LogitsMode::Materialized;
        assert_eq!(c.rank0_total(), Some(total + (1 << 59)));
    }

    #[test]
    fn a_reserve_beyond_63_bits_has_no_total() {
        // `fc + reserved` used to overflow (a panic in debug, a small wrapped total in release).
        let c = PlanConfig::new(1000, 4, 1 << 30);
        let fc = c.rank0_total().unwrap();
        for reserved in [u64::MAX, u64::MAX - fc + 1, 1 << 63] {
            assert_eq!(
                PlanConfig { reserved, ..c }.rank0_total(),
                None,
                "{reserved}"
            );
        }
        let most = PlanConfig {
            reserved: (1 << 63) - 1 - fc,
            ..c
        };
        assert_eq!(most.rank0_total(), Some((1 << 63) - 1));
    }
}
