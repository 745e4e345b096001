//! The buffers one rank's training step allocates, by name and size: the single source of truth
//! shared by the memory planner (which predicts) and the layers (which allocate and report).
//!
//! A layer allocates every buffer once, at construction, at the sizes computed here for the
//! worst case of its configuration, so that its report is exactly the planner's prediction and
//! no step ever allocates on the hot path.

use crate::config::{GemmPrecision, UpdateMode};

/// Element type of stored weights or of the embeddings on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    /// 32-bit float.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Whether the N·k × S logits matrix exists in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsMode {
    /// The logits buffer exists (and holds its gradient in place after the backward pass).
    #[default]
    Materialized,
    /// Logits are produced and consumed tile by tile, never stored (roadmap).
    Fused,
}

/// Classes per chunk when hard negatives are scored; bounds the scoring scratch.
pub const HARD_NEGATIVE_CHUNK: u64 = 4096;

/// The shape of one rank's step: everything that decides how many bytes it allocates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepShape {
    /// Classes in this rank's shard.
    pub shard_classes: u64,
    /// Ranks in the group (k).
    pub world_size: u64,
    /// Embeddings per rank per step (N).
    pub batch_per_rank: u64,
    /// Embedding dimension (d).
    pub dim: u64,
    /// Sample rate r in [0, 1].
    pub sample_rate: f64,
    /// Storage dtype of the weight shard.
    pub weight_dtype: Dtype,
    /// Optimizer state tensors per weight (0 none, 1 SGD momentum, 2 AdamW).
    pub optimizer_states: u64,
    /// Storage dtype of each optimizer state tensor.
    pub state_dtype: Dtype,
    /// Sparse or dense weight gradient.
    pub update: UpdateMode,
    /// Materialized or fused logits.
    pub logits: LogitsMode,
    /// Dtype of the gathered embeddings on the wire.
    pub wire_dtype: Dtype,
    /// Dtype of the embedding gradient on the backward's reduce-scatter (16-bit adds its send
    /// and receive buffers).
    pub grad_wire_dtype: Dtype,
    /// Whether hard negatives are scored (adds the scoring scratch).
    pub hard_negatives: bool,
    /// Operand precision of the step's GEMMs (16-bit operands add `gemm_operands`).
    pub gemm_precision: GemmPrecision,
}

impl StepShape {
    /// Rows of the gathered batch, N·k.
    pub fn gathered_rows(&self) -> u64 {
        self.batch_per_rank * self.world_size
    }

    /// The most classes a step can sample from this shard: `floor(r · shard)`, but never fewer
    /// than the worst-case number of positives, `min(shard, N·k)`.
    pub fn sampled_capacity(&self) -> u64 {
        sampled_capacity(self.shard_classes, self.sample_rate, self.gathered_rows())
    }

    /// The logits' row length and the rows of the sampled-center buffers:
    /// [`StepShape::sampled_capacity`] rounded up to a multiple of
    /// [`crate::backend::LOGITS_ROW_ALIGN`], so that every logits row starts on a 16-byte
    /// boundary for the GEMMs and the softmax (see [`crate::backend::LogitsShape`]).
    pub fn sampled_stride(&self) -> u64 {
        self.sampled_capacity()
            .next_multiple_of(crate::backend::LOGITS_ROW_ALIGN as u64)
    }

    /// Elements of the two 16-bit GEMM operand buffers `(a, b)`, `(0, 0)` in f32.
    ///
    /// With 16-bit GEMMs the logits themselves are 16-bit ([`StepShape::logits_bytes`]): the
    /// logits GEMM `gemm_nt16(M, S, d)` writes them from the 16-bit copies of x̂ `[M×d]` (buffer
    /// `a`) and ŵ `[S×d]` (buffer `b`, `S` padded to [`StepShape::sampled_stride`] rows), and
    /// the backward GEMMs read the 16-bit gradient in place with the same two copies, which stay
    /// in the buffers from the forward to the backward pass. So `a` holds `M·d` and `b` holds
    /// `S·d` elements, and nothing logits-sized is copied.
    pub fn gemm_operand_lens(&self) -> (u64, u64) {
        if self.gemm_precision == GemmPrecision::F32 {
            return (0, 0);
        }
        let (m, s, d) = (self.gathered_rows(), self.sampled_stride(), self.dim);
        (m * d, s * d)
    }

    /// Bytes per logit: 4, or 2 with 16-bit GEMMs (the logits GEMM writes the cosines in the
    /// operands' 16-bit type, as PyTorch's autocast does).
    pub fn logits_bytes(&self) -> u64 {
        self.gemm_precision.operand_bytes()
    }
}

/// `floor(r · shard)` as the published code computes it (`int(r * shard)` in f64), raised to the
/// worst-case positive count `min(shard, gathered_rows)`.
pub fn sampled_capacity(shard_classes: u64, sample_rate: f64, gathered_rows: u64) -> u64 {
    let drawn = sampled_count(shard_classes, sample_rate);
    drawn.max(shard_classes.min(gathered_rows))
}

/// `floor(r · shard)`: the sample size before positives are accounted for.
pub fn sampled_count(shard_classes: u64, sample_rate: f64) -> u64 {
    if sample_rate >= 1.0 {
        shard_classes
    } else {
        ((sample_rate * shard_classes as f64) as u64).min(shard_classes)
    }
}

/// Names of the buffers of one step, in the order reports list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The shard of class centers, `shard × d` in the weight dtype.
    WeightShard,
    /// Full-shard gradient (dense update only), f32.
    WeightGrad,
    /// Optimizer state (momentum, Adam moments), one `shard × d` per state in the state dtype.
    OptimizerState,
    /// Gathered and L2-normalized sampled rows, `S × d`, with room for the padding rows of the
    /// logits layout (`S` rounded up to a multiple of 8: [`StepShape::sampled_stride`]).
    SampledWeights,
    /// Gradient of the sampled rows, `S × d` and padding rows (normalized, then raw in place).
    SampledWeightsGrad,
    /// Norms of the sampled rows, kept for the backward pass, `S`.
    WeightNorms,
    /// The all-gathered embeddings in the wire format, `N·k` packed rows of `d` wire values and
    /// the row's i64 label (`N·k × (d·b_x + 8)` bytes), unpacked straight into the normalized
    /// copy.
    GatheredEmbeddings,
    /// Their L2-normalized copy, `N·k × d`.
    NormalizedEmbeddings,
    /// Norms of the gathered embeddings, `N·k`.
    EmbeddingNorms,
    /// Gradient of the gathered embeddings, `N·k × d` (normalized, then raw in place).
    EmbeddingsGrad,
    /// The logits, `N·k × S` (f32, or 16-bit with 16-bit GEMMs), each row padded to a multiple
    /// of 8 columns, overwritten in place by their gradient.
    Logits,
    /// Gathered global labels (i64) and their shard-local remap (i32), `N·k` each.
    Labels,
    /// The sorted sampled class ids of the shard (i32), `S`.
    SampledIndex,
    /// One 64-bit selection key per class of the shard.
    SamplerKeys,
    /// Hard-negative scoring: per-class score and one chunk of normalized weights and cosines.
    HardNegativeScratch,
    /// Per-row softmax statistics: max, sum, target cosine, and the all-reduced loss and target
    /// cosine (f32 each), `N·k × 5`.
    RowStats,
    /// The 16-bit copies of the GEMM operands (bf16/f16 precision only, 0 in f32), kept for the
    /// layer's life: `N·k·d` (x̂) and `S·d` (ŵ) elements of 2 bytes.
    GemmOperands,
    /// The reduce-scattered embedding gradient (`N × d`, f32); the all-gather's send buffer, this
    /// rank's `N` packed rows (`N × (d·b_x + 8)` bytes); when the gradient's wire dtype is not
    /// f32, the 16-bit send (`N·k × d`) and receive (`N × d`) buffers of its reduce-scatter.
    CollectiveStaging,
    /// Memory the user reserves for everything outside the FC layer.
    Reserved,
}

impl Component {
    /// Every component, in report order.
    pub const ALL: [Component; 19] = [
        Component::WeightShard,
        Component::WeightGrad,
        Component::OptimizerState,
        Component::SampledWeights,
        Component::SampledWeightsGrad,
        Component::WeightNorms,
        Component::GatheredEmbeddings,
        Component::NormalizedEmbeddings,
        Component::EmbeddingNorms,
        Component::EmbeddingsGrad,
        Component::Logits,
        Component::Labels,
        Component::SampledIndex,
        Component::SamplerKeys,
        Component::HardNegativeScratch,
        Component::RowStats,
        Component::GemmOperands,
        Component::CollectiveStaging,
        Component::Reserved,
    ];

    /// The snake_case name used in reports and in `pfc plan --json`.
    pub fn name(self) -> &'static str {
        match self {
            Component::WeightShard => "weight_shard",
            Component::WeightGrad => "weight_grad",
            Component::OptimizerState => "optimizer_state",
            Component::SampledWeights => "sampled_weights",
            Component::SampledWeightsGrad => "sampled_weights_grad",
            Component::WeightNorms => "weight_norms",
            Component::GatheredEmbeddings => "gathered_embeddings",
            Component::NormalizedEmbeddings => "normalized_embeddings",
            Component::EmbeddingNorms => "embedding_norms",
            Component::EmbeddingsGrad => "embeddings_grad",
            Component::Logits => "logits",
            Component::Labels => "labels",
            Component::SampledIndex => "sampled_index",
            Component::SamplerKeys => "sampler_keys",
            Component::HardNegativeScratch => "hard_negative_scratch",
            Component::RowStats => "row_stats",
            Component::GemmOperands => "gemm_operands",
            Component::CollectiveStaging => "collective_staging",
            Component::Reserved => "reserved",
        }
    }
}

/// Bytes of one packed row of the embedding all-gather: `d` values of the wire dtype and the
/// row's i64 label (src/cpu/wire.rs).
pub fn packed_row_bytes(wire: Dtype, dim: u64) -> u64 {
    dim * wire.bytes() + 8
}

/// Bytes of every component of one step (reserved excluded: it is the caller's), in report order.
///
/// A component beyond `u64::MAX` bytes reads `u64::MAX`;
/// [`PlanConfig::fc_bytes`](super::PlanConfig::fc_bytes) is the checked total.
pub fn step_buffers(shape: &StepShape) -> Vec<(Component, u64)> {
    step_buffers_wide(shape)
        .into_iter()
        .map(|(c, b)| (c, u64::try_from(b).unwrap_or(u64::MAX)))
        .collect()
}

/// [`step_buffers`] in `u128` with saturating arithmetic, so that any shape, however absurd, gets
/// its exact bytes or a saturated value instead of an overflow: the planner's searches probe
/// shapes no device holds and must see them as "too big", not as a wrapped small number.
pub(crate) fn step_buffers_wide(shape: &StepShape) -> Vec<(Component, u128)> {
    let w = u128::from;
    // a·b·… saturating at u128::MAX
    let mul = |xs: &[u128]| xs.iter().fold(1u128, |acc, &x| acc.saturating_mul(x));
    let f32b = 4u128;
    let shard = w(shape.shard_classes);
    let d = w(shape.dim);
    let n = w(shape.batch_per_rank);
    let m = mul(&[n, w(shape.world_size)]);
    let positives = u64::try_from(m).unwrap_or(u64::MAX);
    let s = w(sampled_capacity(
        shape.shard_classes,
        shape.sample_rate,
        positives,
    ));
    // Sampled centers and their gradient have `ld` rows and the logits `ld` columns: the sample
    // padded for aligned rows (see `LogitsShape`).
    let ld = s.next_multiple_of(crate::backend::LOGITS_ROW_ALIGN as u128);
    let dense = shape.update == UpdateMode::Dense;
    // Every rank packs its N rows as the wire's values followed by the row's i64 label (8 bytes:
    // two f32 words, or four 16-bit words), so one all-gather moves both, from a send buffer of
    // N rows into a receive buffer of N·k rows, which is unpacked straight into the normalized
    // copy.
    let row_bytes = mul(&[d, w(shape.wire_dtype.bytes())]) + 8;
    // A 16-bit gradient wire rounds the N·k × d gradient into a send buffer and receives this
    // rank's N × d sum in a second one, before widening it into the f32 staging buffer.
    let staging_grad = if shape.grad_wire_dtype != Dtype::F32 {
        mul(&[m.saturating_add(n), d, w(shape.grad_wire_dtype.bytes())])
    } else {
        0
    };
    let hard = if shape.hard_negatives {
        let chunk = w(HARD_NEGATIVE_CHUNK).min(shard);
        mul(&[shard, f32b])
            .saturating_add(mul(&[chunk, d, f32b]))
            .saturating_add(mul(&[chunk, m, f32b]))
    } else {
        0
    };
    // With 16-bit GEMMs, 16-bit copies of x̂ (M×d) and ŵ (S×d, S padded): see
    // `StepShape::gemm_operand_lens`.
    let gemm_operands = if shape.gemm_precision == GemmPrecision::F32 {
        0
    } else {
        mul(&[
            m.saturating_add(ld),
            d,
            w(shape.gemm_precision.operand_bytes()),
        ])
    };
    vec![
        (
            Component::WeightShard,
            mul(&[shard, d, w(shape.weight_dtype.bytes())]),
        ),
        (
            Component::WeightGrad,
            if dense { mul(&[shard, d, f32b]) } else { 0 },
        ),
        (
            Component::OptimizerState,
            mul(&[
                w(shape.optimizer_states),
                shard,
                d,
                w(shape.state_dtype.bytes()),
            ]),
        ),
        (Component::SampledWeights, mul(&[ld, d, f32b])),
        (Component::SampledWeightsGrad, mul(&[ld, d, f32b])),
        (Component::WeightNorms, mul(&[s, f32b])),
        (Component::GatheredEmbeddings, mul(&[m, row_bytes])),
        (Component::NormalizedEmbeddings, mul(&[m, d, f32b])),
        (Component::EmbeddingNorms, mul(&[m, f32b])),
        (Component::EmbeddingsGrad, mul(&[m, d, f32b])),
        (
            Component::Logits,
            match shape.logits {
                LogitsMode::Materialized => mul(&[m, ld, w(shape.logits_bytes())]),
                LogitsMode::Fused => 0,
            },
        ),
        (Component::Labels, mul(&[m, 12])),
        (Component::SampledIndex, mul(&[s, 4])),
        (Component::SamplerKeys, mul(&[shard, 8])),
        (Component::HardNegativeScratch, hard),
        (Component::RowStats, mul(&[m, 5, f32b])),
        (Component::GemmOperands, gemm_operands),
        (
            Component::CollectiveStaging,
            mul(&[n, d, f32b])
                .saturating_add(mul(&[n, row_bytes]))
                .saturating_add(staging_grad),
        ),
    ]
}
