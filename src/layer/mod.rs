//! `PartialFc`: one rank's sharded, sampled margin-softmax classifier, and the training step,
//! written once for every backend and collective.

mod predict;
pub use predict::Prediction;

use crate::backend::AdamWStep;
use crate::backend::{Backend, Collective, LogitsShape, ReduceOp, SampleArgs, StateBuf};
use crate::config::{
    LayerConfig, MarginParams, NegativeSampler, Optimizer, StateDtype, UpdateMode,
};
use crate::error::{PfcError, Result};
use crate::plan::buffers::{
    sampled_count, step_buffers, Component, StepShape, HARD_NEGATIVE_CHUNK,
};
use crate::plan::{Dtype, LogitsMode};
use crate::shard::Shard;
use rayon::prelude::*;

/// What one forward/backward pass returns to the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Mean margin-softmax cross-entropy over the gathered batch (identical on every rank).
    pub loss: f32,
    /// d loss / d embeddings for this rank's `N × d` embeddings. The loss is the mean over the
    /// whole gathered batch (`N·k` rows), so this is the gradient of the global mean; a
    /// data-parallel trainer whose backbone gradients are averaged over ranks should multiply by
    /// [`PartialFc::data_parallel_grad_factor`] (= k).
    pub grad_embeddings: Vec<f32>,
    /// Number of classes this rank sampled.
    pub sampled: usize,
}

/// A send and a receive buffer of 16-bit words, present only when a wire dtype is 16-bit.
type U16Pair<B> = Option<(<B as Backend>::Buf<u16>, <B as Backend>::Buf<u16>)>;

struct Buffers<B: Backend> {
    weight: B::Buf<f32>,
    weight_grad: Option<B::Buf<f32>>,
    /// The optimizer's state tensors, in [`Optimizer::state_names`] order (none without one).
    states: Vec<StateBuf<B>>,
    sampled_weights: B::Buf<f32>,
    sampled_weights_grad: B::Buf<f32>,
    weight_norms: B::Buf<f32>,
    x_hat: B::Buf<f32>,
    x_norms: B::Buf<f32>,
    x_grad: B::Buf<f32>,
    logits: Logits<B>,
    gathered_labels: B::Buf<i64>,
    local_labels: B::Buf<i32>,
    sampled_index: B::Buf<i32>,
    keys: B::Buf<u64>,
    scores: Option<B::Buf<f32>>,
    chunk_weights: Option<B::Buf<f32>>,
    chunk_cosines: Option<B::Buf<f32>>,
    row_max: B::Buf<f32>,
    row_sum: B::Buf<f32>,
    target_cos: B::Buf<f32>,
    row_loss: B::Buf<f32>,
    staging: B::Buf<f32>,
    /// The all-gather's send (N rows) and receive (N·k rows) buffers in the wire format.
    packed: Packed<B>,
    /// Send (N·k × d) and receive (N × d) buffers of the gradient's 16-bit reduce-scatter
    /// (`None` when `grad_wire` is f32).
    grad_wire: U16Pair<B>,
}

/// Send and receive buffers of the embedding all-gather in the wire format: each row's values
/// then its i64 label (two f32 words, or four 16-bit words; src/cpu/wire.rs), packed on the host
/// where the embeddings arrive, so a step makes one upload and one all-gather for both.
enum Packed<B: Backend> {
    F32(B::Buf<f32>, B::Buf<f32>),
    Half(B::Buf<u16>, B::Buf<u16>),
}

/// The logits, in the dtype the backend keeps them in ([`Backend::logits_dtype`]): f32, or with
/// 16-bit GEMMs the GEMMs' 16-bit type. Its methods pick the softmax passes of that dtype, so the
/// step is written once for both.
enum Logits<B: Backend> {
    F32(B::Buf<f32>),
    Half(B::Buf<u16>, Dtype),
}

/// The all-reduced row max and row sum and the raw target cosines, for pass 3.
type RowStatBufs<'a, B> = (
    &'a <B as Backend>::Buf<f32>,
    &'a <B as Backend>::Buf<f32>,
    &'a <B as Backend>::Buf<f32>,
);

impl<B: Backend> Logits<B> {
    /// The scale the softmax folds into the logits' gradient for a loss averaged with `mean`
    /// (= 1/rows). 16-bit logits keep it out, as the backward GEMMs' alpha: `p · s / rows` of a
    /// non-target is ~1e-9 at 100k classes and 1024 rows, below f16's smallest normal (6e-5),
    /// while `p · s` stays in range (the same reason mixed-precision training scales its loss).
    fn softmax_grad_scale(&self, mean: f32) -> f32 {
        match self {
            Logits::F32(_) => mean,
            Logits::Half(..) => 1.0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fused(
        &mut self,
        b: &B,
        shape: LogitsShape,
        labels: &B::Buf<i32>,
        margin: &MarginParams,
        grad_scale: f32,
        row_loss: &mut B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(l) => {
                b.margin_softmax_fused(l, shape, labels, margin, grad_scale, row_loss)
            }
            Logits::Half(l, dt) => {
                b.margin_softmax_fused16(l, shape, *dt, labels, margin, grad_scale, row_loss)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn rowmax(
        &mut self,
        b: &B,
        shape: LogitsShape,
        labels: &B::Buf<i32>,
        margin: &MarginParams,
        row_max: &mut B::Buf<f32>,
        target_cos: &mut B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(l) => b.margin_rowmax(l, shape, labels, margin, row_max, target_cos),
            Logits::Half(l, dt) => {
                b.margin_rowmax16(l, shape, *dt, labels, margin, row_max, target_cos)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn exp_rowsum(
        &self,
        b: &B,
        shape: LogitsShape,
        labels: &B::Buf<i32>,
        margin: &MarginParams,
        row_max: &B::Buf<f32>,
        row_sum: &mut B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(l) => b.exp_rowsum(l, shape, row_max, row_sum),
            Logits::Half(l, dt) => b.exp_rowsum16(l, shape, *dt, labels, margin, row_max, row_sum),
        }
    }

    /// Pass 3; `stats` are the all-reduced row max and sum and the raw target cosines.
    #[allow(clippy::too_many_arguments)]
    fn loss_grad(
        &mut self,
        b: &B,
        shape: LogitsShape,
        labels: &B::Buf<i32>,
        margin: &MarginParams,
        (row_max, row_sum, target_cos): RowStatBufs<'_, B>,
        grad_scale: f32,
        row_loss: &mut B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(l) => b.softmax_loss_grad(
                l, shape, labels, margin, row_max, row_sum, target_cos, grad_scale, row_loss,
            ),
            Logits::Half(l, dt) => b.softmax_loss_grad16(
                l, shape, *dt, labels, margin, row_max, row_sum, target_cos, grad_scale, row_loss,
            ),
        }
    }
}

/// One rank's Partial FC layer: its shard of class centers, optimizer state and sampler.
///
/// Generic over the backend (CPU, CUDA) and the collective (single rank, threads, NCCL).
///
/// ```
/// use partial_fc::{CpuBackend, LayerConfig, PartialFc, collective::SingleRank};
/// let mut cfg = LayerConfig::new(1000, 16, 8);
/// cfg.sample_rate = 0.2;
/// let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
/// let x: Vec<f32> = (0..8 * 16).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
/// let labels: Vec<i64> = (0..8).map(|i| i * 100).collect();
/// let out = layer.forward_backward(&x, &labels).unwrap();
/// assert!(out.loss.is_finite() && out.sampled == 200);
/// layer.step(0.1).unwrap();
/// ```
pub struct PartialFc<B: Backend, C: Collective<B>> {
    backend: B,
    comm: C,
    config: LayerConfig,
    shard: Shard,
    capacity: usize,
    /// Rows of the sampled-center buffer that a gather has written (the largest sample so far).
    /// Rows past the current sample are the logits' padding columns: the backward GEMMs multiply
    /// them by a zero gradient, so they must hold finite values; a larger earlier sample may
    /// have left anything there (a NaN row from a diverged step), so they are zeroed again.
    sampled_rows_written: usize,
    step: u64,
    /// Optimizer updates applied (`step` calls that ran an update): AdamW's t.
    optimizer_step: u64,
    /// Whether the last backward pass's gradient still waits for `step`.
    grad_pending: bool,
    /// Set once every rank has agreed to run the current pass: a failure after that point
    /// (a device or collective error on this rank) breaks the group (`Collective::abort`), since
    /// the peers are in, or about to enter, collectives this rank will not join.
    mid_pass: bool,
    /// Classes sampled by the last forward pass, whose gradient the buffers still hold (kept
    /// after `step`, cleared when the weights are replaced).
    last_sampled: Option<usize>,
    /// A checkpoint load failed after it began replacing the weights: they are part old, part
    /// new, and the layer refuses to train or save until a load succeeds.
    incomplete: bool,
    bufs: Buffers<B>,
}

/// What is wrong with embedding row `row`, if anything: a NaN or infinite value, all zeros,
/// or a finite row the step still cannot carry: its sum of squares overflows f32, or the
/// 16-bit wire rounds a value to infinity or the whole row to zeros. Every rank normalizes
/// the gathered rows, so one such row would turn every shard's gradient to NaN.
pub(crate) fn row_error(row: usize, x: &[f32], wire: Dtype) -> Option<PfcError> {
    // One pass, eight independent lanes (so it vectorizes): the sum of squares in f32, as
    // the kernels compute it, and the largest magnitude. A NaN or infinity makes the sum
    // non-finite; only then is the row searched for it.
    const LANES: usize = 8;
    let (mut squares, mut largest) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            squares[l] += chunk[l] * chunk[l];
            largest[l] = if chunk[l].abs() > largest[l] {
                chunk[l].abs()
            } else {
                largest[l]
            };
        }
    }
    for &v in chunks.remainder() {
        squares[0] += v * v;
        largest[0] = if v.abs() > largest[0] {
            v.abs()
        } else {
            largest[0]
        };
    }
    let squares: f32 = squares.iter().sum();
    let largest = largest.iter().fold(0.0f32, |m, &v| m.max(v));
    if !squares.is_finite() {
        if let Some(&value) = x.iter().find(|v| !v.is_finite()) {
            return Some(PfcError::NonFinite { row, value });
        }
    }
    if largest == 0.0 {
        return Some(PfcError::ZeroRow { row });
    }
    // Half of f32::MAX: the kernels add in another order and may overflow a little earlier.
    if squares >= f32::MAX / 2.0 {
        return Some(PfcError::OutOfRange {
            row,
            value: largest,
            reason: format!(
                "its sum of squares overflows f32 (largest |value| {largest:e}); scale the \
                 embeddings down"
            ),
        });
    }
    if wire == Dtype::F32 {
        return None;
    }
    // Rounding is monotonic in magnitude: some value rounds to infinity exactly when the
    // largest does, and every value rounds to zero exactly when the largest does.
    let rounded = crate::cpu::wire::from_wire(crate::cpu::wire::to_wire(largest, wire), wire);
    let name = || format!("{wire:?}").to_lowercase();
    if rounded.is_infinite() {
        return Some(PfcError::OutOfRange {
            row,
            value: largest,
            reason: format!(
                "{largest:e} rounds to infinity on the {} all-gather wire (LayerConfig::wire); \
                 scale the embeddings or use an f32 or bf16 wire",
                name()
            ),
        });
    }
    if rounded == 0.0 {
        return Some(PfcError::OutOfRange {
            row,
            value: largest,
            reason: format!(
                "every value rounds to zero on the {} all-gather wire (largest |value| \
                 {largest:e}); scale the embeddings or use an f32 or bf16 wire",
                name()
            ),
        });
    }
    None
}

/// A NaN or infinite weight or optimizer state would reach every logit of its class and,
/// through the softmax's normalizer, every row's gradient: refuse it where it enters.
fn check_finite(name: &'static str, values: &[f32], dim: usize) -> Result<()> {
    refuse_first(
        name,
        values,
        dim,
        |v| !v.is_finite(),
        "every value must be finite",
    )
}

/// Whether `value` may enter tensor `name` (weight or optimizer state): finite, and not negative
/// in a second moment. What `check_finite` and `check_state_range` refuse, with their
/// messages; checkpoint reads test it value by value.
pub(crate) fn storable(name: &str, value: f32) -> bool {
    value.is_finite() && !(name == "exp_avg_sq" && value < 0.0)
}

/// A second moment (`exp_avg_sq`) is an average of squares: a negative one would put NaN into
/// the weights through its square root at the next update, so it is refused where it enters.
fn check_state_range(name: &'static str, values: &[f32], dim: usize) -> Result<()> {
    if name != "exp_avg_sq" {
        return Ok(());
    }
    refuse_first(
        name,
        values,
        dim,
        |v| v < 0.0,
        "a second moment must be >= 0",
    )
}

/// [`PfcError::Param`] naming the row and column of the first value that is `bad`.
fn refuse_first(
    name: &'static str,
    values: &[f32],
    dim: usize,
    bad: impl Fn(f32) -> bool,
    rule: &str,
) -> Result<()> {
    match values.iter().position(|&v| bad(v)) {
        None => Ok(()),
        Some(i) => Err(PfcError::param(
            name,
            format!(
                "{} at row {}, column {}",
                values[i],
                i / dim.max(1),
                i % dim.max(1)
            ),
            rule,
        )),
    }
}

/// FNV-1a of the fields that size a rank's collectives (the batch and embedding shapes, the
/// shard split, the wire dtypes; for a prediction also its k), folded to 21 bits (an f32 holds
/// it exactly, times eight plus three flag bits: `agree_on_input`). Stable across processes and
/// builds: no random keys. The sample rate may differ between ranks (each sizes its own shard's
/// sample).
fn config_fingerprint(c: &LayerConfig, call: Call) -> u32 {
    let shared = format!(
        "{} {} {} {:?} {:?}",
        c.num_classes, c.dim, c.batch_per_rank, c.wire, c.grad_wire
    );
    let hash = shared.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let folded = ((hash ^ (hash >> 21) ^ (hash >> 42)) & 0x1f_ffff) as u32;
    match call {
        // k sizes the prediction's all-gathers: compared exactly (its low 6 bits, k - 1 for k in
        // 1..=64), not hashed, so two k can never collide; 15 bits of hash remain.
        Call::Predict { k } => (folded & !0x3f) | ((k.wrapping_sub(1) & 0x3f) as u32),
        _ => folded,
    }
}

/// Largest value a rank contributes to an agreement ([`PartialFc::agree`]): 2^24, every integer
/// up to which an f32 holds exactly (a sum with zeros keeps it exact).
pub(crate) const AGREED_VALUE_MAX: u32 = 1 << 24;

/// Which call a pass is. Each pairs its own sequence of collectives, so ranks must all make the
/// same one: `agree_on_input` tells them apart and refuses a mix on every rank.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Call {
    /// `forward_backward`: the sample is drawn.
    Drawn,
    /// `forward_backward_with_sample`: a second agreement follows (the sample's positives).
    Given,
    /// `predict_top_k` with this k.
    Predict { k: usize },
    /// `load_resharded`: the ranks agree after their checks, before any layer changes.
    Load,
}

impl Call {
    fn code(self) -> u32 {
        match self {
            Call::Drawn => 0,
            Call::Given => 1,
            Call::Predict { .. } => 2,
            Call::Load => 3,
        }
    }

    fn name(code: u32) -> &'static str {
        match code {
            0 => "forward_backward",
            1 => "forward_backward_with_sample",
            2 => "predict_top_k",
            _ => "load_resharded",
        }
    }
}

fn alloc_opt<B: Backend>(b: &B, len: usize, want: bool) -> Result<Option<B::Buf<f32>>> {
    if want {
        Ok(Some(b.alloc(len)?))
    } else {
        Ok(None)
    }
}

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// A layer whose shard is initialized from N(0, 0.01), as the published implementation does,
    /// from a generator keyed by `config.seed` and the global class id (so the full weight matrix
    /// does not depend on the world size).
    pub fn new(config: LayerConfig, backend: B, comm: C) -> Result<Self> {
        let mut layer = Self::zeroed(config, backend, comm)?;
        // In blocks of rows, so that no second copy of the shard ever exists on the host.
        let d = layer.config.dim;
        let block = (1 << 22) / d.max(1) + 1;
        let mut row = 0;
        while row < layer.shard.len as usize {
            let rows = block.min(layer.shard.len as usize - row);
            let init = crate::init::normal_rows(
                layer.config.seed,
                layer.shard.start + row as u64,
                rows,
                d,
                0.01,
            );
            layer
                .backend
                .upload_at(&init, &mut layer.bufs.weight, row * d)?;
            row += rows;
        }
        Ok(layer)
    }

    /// A layer with an all-zero shard (to be filled by [`PartialFc::set_weight`] or a checkpoint).
    pub fn zeroed(config: LayerConfig, mut backend: B, comm: C) -> Result<Self> {
        let world = comm.world_size();
        config.validate(world)?;
        if comm.rank() >= world {
            return Err(PfcError::param(
                "rank",
                comm.rank(),
                format!("the collective's rank must lie in [0, world size {world})"),
            ));
        }
        let shard = Shard::of(config.num_classes, world, comm.rank());
        let shape = Self::shape_of(&config, shard, world);
        // The backend rejects a precision it cannot multiply in (the CPU: anything but f32),
        // then holds the 16-bit operand buffers the planner sized, for the layer's life.
        backend.set_gemm_precision(config.precision)?;
        if matches!(config.optimizer, Some(Optimizer::AdamW(_))) && !backend.supports_adamw() {
            return Err(PfcError::param(
                "optimizer",
                "adamw",
                format!("the {} backend does not implement AdamW", backend.name()),
            ));
        }
        // The planner sizes the logits by the precision; the backend must keep them in it.
        let wanted = match config.precision {
            crate::GemmPrecision::F32 => Dtype::F32,
            crate::GemmPrecision::Bf16 => Dtype::Bf16,
            crate::GemmPrecision::F16 => Dtype::F16,
        };
        if backend.logits_dtype() != wanted {
            return Err(PfcError::param(
                "precision",
                config.precision,
                format!(
                    "the {} backend accepted it but keeps its logits in {:?}",
                    backend.name(),
                    backend.logits_dtype()
                ),
            ));
        }
        let (a16, b16) = shape.gemm_operand_lens();
        backend.reserve_gemm_operands(a16 as usize, b16 as usize)?;
        let capacity = shape.sampled_capacity() as usize;
        // Sampled-center buffers hold `capacity_ld` rows, the logits `capacity_ld` columns: room
        // for the padded layout of any sample up to `capacity` (see `LogitsShape`).
        let capacity_ld = shape.sampled_stride() as usize;
        let (d, n, m) = (
            config.dim,
            config.batch_per_rank,
            config.batch_per_rank * world,
        );
        let shard_len = shard.len as usize;
        let hard = matches!(config.sampler, NegativeSampler::Hard { .. });
        let chunk = (HARD_NEGATIVE_CHUNK as usize).min(shard_len);
        let b = &backend;
        let bufs = Buffers {
            weight: b.alloc(shard_len * d)?,
            weight_grad: alloc_opt(b, shard_len * d, config.update == UpdateMode::Dense)?,
            states: match config.optimizer {
                None => Vec::new(),
                Some(o) => o
                    .state_names()
                    .iter()
                    .map(|_| StateBuf::alloc(b, o.state_dtype(), shard_len * d))
                    .collect::<Result<_>>()?,
            },
            sampled_weights: b.alloc(capacity_ld * d)?,
            sampled_weights_grad: b.alloc(capacity_ld * d)?,
            weight_norms: b.alloc(capacity)?,
            x_hat: b.alloc(m * d)?,
            x_norms: b.alloc(m)?,
            x_grad: b.alloc(m * d)?,
            logits: match b.logits_dtype() {
                Dtype::F32 => Logits::F32(b.alloc(m * capacity_ld)?),
                half => Logits::Half(b.alloc(m * capacity_ld)?, half),
            },
            gathered_labels: b.alloc(m)?,
            local_labels: b.alloc(m)?,
            sampled_index: b.alloc(capacity)?,
            keys: b.alloc(shard_len)?,
            scores: alloc_opt(b, shard_len, hard)?,
            chunk_weights: alloc_opt(b, chunk * d, hard)?,
            chunk_cosines: alloc_opt(b, chunk * m, hard)?,
            row_max: b.alloc(m)?,
            row_sum: b.alloc(m)?,
            target_cos: b.alloc(m)?,
            row_loss: b.alloc(m)?,
            staging: b.alloc(n * d)?,
            packed: match config.wire {
                Dtype::F32 => {
                    let row = crate::cpu::wire::packed_row_len_f32(d);
                    Packed::F32(b.alloc(n * row)?, b.alloc(m * row)?)
                }
                _ => {
                    let row = crate::cpu::wire::packed_row_len(d);
                    Packed::Half(b.alloc(n * row)?, b.alloc(m * row)?)
                }
            },
            grad_wire: if config.grad_wire != Dtype::F32 {
                Some((b.alloc(m * d)?, b.alloc(n * d)?))
            } else {
                None
            },
        };
        Ok(PartialFc {
            backend,
            comm,
            config,
            shard,
            capacity,
            step: 0,
            optimizer_step: 0,
            grad_pending: false,
            mid_pass: false,
            last_sampled: None,
            sampled_rows_written: 0,
            incomplete: false,
            bufs,
        })
    }

    fn shape_of(config: &LayerConfig, shard: Shard, world: usize) -> StepShape {
        StepShape {
            shard_classes: shard.len,
            world_size: world as u64,
            batch_per_rank: config.batch_per_rank as u64,
            dim: config.dim as u64,
            sample_rate: config.sample_rate,
            weight_dtype: Dtype::F32,
            optimizer_states: config.optimizer.map_or(0, |o| o.state_names().len() as u64),
            state_dtype: config
                .optimizer
                .map_or(Dtype::F32, |o| match o.state_dtype() {
                    StateDtype::F32 => Dtype::F32,
                    StateDtype::Bf16 => Dtype::Bf16,
                }),
            update: config.update,
            logits: LogitsMode::Materialized,
            wire_dtype: config.wire,
            grad_wire_dtype: config.grad_wire,
            hard_negatives: matches!(config.sampler, NegativeSampler::Hard { .. }),
            gemm_precision: config.precision,
        }
    }

    /// The planner's view of this layer (for comparing prediction and allocation).
    pub fn step_shape(&self) -> StepShape {
        Self::shape_of(&self.config, self.shard, self.comm.world_size())
    }

    /// Bytes this layer really allocated, by component (the planner's names), in report order.
    pub fn memory_report(&self) -> Vec<(Component, u64)> {
        let b = &self.backend;
        let f = |buf: &B::Buf<f32>| b.len(buf) as u64 * 4;
        let fo = |buf: &Option<B::Buf<f32>>| buf.as_ref().map_or(0, f);
        let u16_pair = |pair: &U16Pair<B>| {
            pair.as_ref()
                .map_or(0, |(send, recv)| (b.len(send) + b.len(recv)) as u64 * 2)
        };
        let x = &self.bufs;
        vec![
            (Component::WeightShard, f(&x.weight)),
            (Component::WeightGrad, fo(&x.weight_grad)),
            (
                Component::OptimizerState,
                x.states.iter().map(|m| m.bytes(b)).sum(),
            ),
            (Component::SampledWeights, f(&x.sampled_weights)),
            (Component::SampledWeightsGrad, f(&x.sampled_weights_grad)),
            (Component::WeightNorms, f(&x.weight_norms)),
            (
                Component::GatheredEmbeddings,
                match &x.packed {
                    Packed::F32(_, recv) => f(recv),
                    Packed::Half(_, recv) => b.len(recv) as u64 * 2,
                },
            ),
            (Component::NormalizedEmbeddings, f(&x.x_hat)),
            (Component::EmbeddingNorms, f(&x.x_norms)),
            (Component::EmbeddingsGrad, f(&x.x_grad)),
            (
                Component::Logits,
                match &x.logits {
                    Logits::F32(l) => f(l),
                    Logits::Half(l, _) => b.len(l) as u64 * 2,
                },
            ),
            (
                Component::Labels,
                b.len(&x.gathered_labels) as u64 * 8 + b.len(&x.local_labels) as u64 * 4,
            ),
            (Component::SampledIndex, b.len(&x.sampled_index) as u64 * 4),
            (Component::SamplerKeys, b.len(&x.keys) as u64 * 8),
            (
                Component::HardNegativeScratch,
                fo(&x.scores) + fo(&x.chunk_weights) + fo(&x.chunk_cosines),
            ),
            (
                Component::RowStats,
                f(&x.row_max) + f(&x.row_sum) + f(&x.target_cos) + f(&x.row_loss),
            ),
            (Component::GemmOperands, b.gemm_operand_bytes()),
            (
                Component::CollectiveStaging,
                f(&x.staging)
                    + match &x.packed {
                        Packed::F32(send, _) => f(send),
                        Packed::Half(send, _) => b.len(send) as u64 * 2,
                    }
                    + u16_pair(&x.grad_wire),
            ),
        ]
    }

    /// The planner's prediction for this layer, by component.
    pub fn planned_memory(&self) -> Vec<(Component, u64)> {
        step_buffers(&self.step_shape())
    }

    /// This rank's shard of classes.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The layer's configuration.
    pub fn config(&self) -> &LayerConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The collective.
    pub fn collective(&self) -> &C {
        &self.comm
    }

    /// Forward/backward passes that drew their sample so far (the sampler's counter). A pass
    /// refused by the input checks does not count; one that fails after sampling (in the
    /// softmax's all-reduces, the backward, a device call) does, on every rank alike. See
    /// docs/design.md for the one failure that can leave ranks' counters apart.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Sets the step counter, which keys the sampler's draws (`load` and `load_resharded`
    /// restore it from the checkpoint; this is for other ways of resuming). Every rank must hold
    /// the same value.
    pub fn set_steps(&mut self, step: u64) {
        self.step = step;
    }

    /// Optimizer updates applied so far ([`step`](Self::step) calls that ran one): AdamW's bias
    /// corrections take t from it, as `torch.optim.AdamW` counts `optimizer.step()` calls. It is
    /// apart from [`steps`](Self::steps) (the sampler's pass counter), so a pass without an
    /// update (a validation loss, a failed pass) does not change the next update. Checkpoints
    /// save and restore it.
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer_step
    }

    /// Sets the optimizer's update count: 0 with fresh (zero) moments, e.g. after replacing them
    /// with [`set_optimizer_state`](Self::set_optimizer_state) or switching optimizer on a
    /// resumed run, so that AdamW's bias corrections start over; `load` and `load_resharded`
    /// restore it. Every rank must hold the same value.
    pub fn set_optimizer_steps(&mut self, updates: u64) {
        self.optimizer_step = updates;
    }

    /// Factor to multiply `grad_embeddings` by when the backbone's gradients are averaged over
    /// the k data-parallel ranks (as DDP does): the world size.
    pub fn data_parallel_grad_factor(&self) -> f32 {
        self.comm.world_size() as f32
    }

    /// The shard's weights, `shard × d`, row-major.
    pub fn weight(&self) -> Result<Vec<f32>> {
        self.backend
            .download(&self.bufs.weight, self.shard.len as usize * self.config.dim)
    }

    /// Replaces the shard's weights.
    pub fn set_weight(&mut self, weight: &[f32]) -> Result<()> {
        let want = self.shard.len as usize * self.config.dim;
        if weight.len() != want {
            return Err(PfcError::Shape(format!(
                "weight of {} values for a shard of {} × {} = {want}",
                weight.len(),
                self.shard.len,
                self.config.dim
            )));
        }
        check_finite("weight", weight, self.config.dim)?;
        self.backend.upload(weight, &mut self.bufs.weight)?;
        // A gradient of the old weights must not be applied to (or reported for) the new ones.
        self.grad_pending = false;
        self.last_sampled = None;
        Ok(())
    }

    /// The error of a layer a failed load left part old, part new; `Ok` otherwise.
    pub(crate) fn check_complete(&self) -> Result<()> {
        if self.incomplete {
            return Err(PfcError::param(
                "checkpoint",
                "a load that failed midway",
                "the weights are part old, part new: load a checkpoint again before training or saving",
            ));
        }
        Ok(())
    }

    /// A checkpoint load starts overwriting weights and optimizer state block by block.
    pub(crate) fn begin_replacing_state(&mut self) {
        self.incomplete = true;
        self.grad_pending = false;
        self.last_sampled = None;
    }

    /// Uploads a block of tensor `name` (`weight` or one of the optimizer's
    /// [`Optimizer::state_names`]) at element `offset`.
    pub(crate) fn put_block(&mut self, name: &str, offset: usize, values: &[f32]) -> Result<()> {
        if name == "weight" {
            return self
                .backend
                .upload_at(values, &mut self.bufs.weight, offset);
        }
        let i = self.state_index(name)?;
        self.bufs.states[i].upload_at(&self.backend, values, offset)
    }

    /// The load that began replacing the state finished.
    pub(crate) fn finish_replacing_state(&mut self) {
        self.incomplete = false;
    }

    /// Weight values `offset .. offset + len` (row-major over the shard), for streaming.
    pub(crate) fn weight_block(&self, offset: usize, len: usize) -> Result<Vec<f32>> {
        self.backend.download_at(&self.bufs.weight, offset, len)
    }

    /// Values `offset .. offset + len` of the optimizer state `name`, widened to f32.
    pub(crate) fn state_block(&self, name: &str, offset: usize, len: usize) -> Result<Vec<f32>> {
        let i = self.state_index(name)?;
        self.bufs.states[i].download_at(&self.backend, offset, len)
    }

    /// Names of this layer's optimizer state tensors (`momentum` for SGD, `exp_avg` and
    /// `exp_avg_sq` for AdamW, none without an optimizer): what checkpoints hold beside the
    /// weights.
    pub fn state_names(&self) -> &'static [&'static str] {
        self.config.optimizer.map_or(&[], |o| o.state_names())
    }

    fn state_index(&self, name: &str) -> Result<usize> {
        let names = self.state_names();
        names.iter().position(|n| *n == name).ok_or_else(|| {
            PfcError::Shape(if names.is_empty() {
                format!("this layer has no optimizer state (asked for {name})")
            } else {
                format!("this layer's optimizer state is {names:?}, not {name}")
            })
        })
    }

    /// The SGD momentum, if the layer's optimizer is SGD (a bf16 momentum widened to f32,
    /// exactly); `None` without an optimizer or with AdamW (see
    /// [`optimizer_state`](Self::optimizer_state)).
    pub fn momentum(&self) -> Result<Option<Vec<f32>>> {
        match self.config.optimizer {
            Some(Optimizer::Sgd(_)) => self.optimizer_state("momentum").map(Some),
            _ => Ok(None),
        }
    }

    /// Replaces the SGD momentum (rounded to nearest even for a bf16 momentum).
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when the layer's optimizer is not SGD or the length is not the
    /// shard's; [`PfcError::Param`] for a NaN or infinite value.
    pub fn set_momentum(&mut self, momentum: &[f32]) -> Result<()> {
        self.set_optimizer_state("momentum", momentum)
    }

    /// The optimizer state tensor `name` (one of [`state_names`](Self::state_names)), `shard × d`
    /// row-major, widened to f32 (exactly, for bf16 state).
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when the layer has no such state.
    pub fn optimizer_state(&self, name: &str) -> Result<Vec<f32>> {
        let i = self.state_index(name)?;
        let len = self.shard.len as usize * self.config.dim;
        self.bufs.states[i].download(&self.backend, len)
    }

    /// Replaces the optimizer state tensor `name` (rounded to nearest even for bf16 state).
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when the layer has no such state or the length is not the shard's;
    /// [`PfcError::Param`] for a NaN or infinite value, or a negative `exp_avg_sq` (nothing is
    /// changed).
    pub fn set_optimizer_state(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let i = self.state_index(name)?;
        let want = self.shard.len as usize * self.config.dim;
        if values.len() != want {
            return Err(PfcError::Shape(format!(
                "{name} of {} values for a shard of {want}",
                values.len()
            )));
        }
        let name = self.state_names()[i];
        check_finite(name, values, self.config.dim)?;
        check_state_range(name, values, self.config.dim)?;
        self.bufs.states[i].upload(&self.backend, values)
    }

    /// Checks this rank's input; `None` when it is fine.
    fn check_input(&self, embeddings: &[f32], labels: &[i64]) -> Option<PfcError> {
        let d = self.config.dim;
        let n = labels.len();
        if n > self.config.batch_per_rank {
            return Some(PfcError::Shape(format!(
                "batch of {n} labels; this layer takes at most {} per rank",
                self.config.batch_per_rank
            )));
        }
        if embeddings.len() != n * d {
            return Some(PfcError::Shape(format!(
                "embeddings hold {} values, {n} labels × dim {d} = {} expected",
                embeddings.len(),
                n * d
            )));
        }
        if let Some((row, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l < 0 || l as u64 >= self.config.num_classes)
        {
            return Some(PfcError::Label {
                row,
                label,
                num_classes: self.config.num_classes,
            });
        }
        // Rows in parallel, the first bad row (in row order) reported: this runs before every
        // pass, on the host, so it must cost little next to a GPU step.
        let wire = self.config.wire;
        let bad_row = embeddings
            .par_chunks(d.max(1))
            .enumerate()
            .find_map_first(|(row, x)| row_error(row, x, wire));
        if bad_row.is_some() {
            return bad_row;
        }
        if self.step == u64::MAX {
            return Some(PfcError::param(
                "step",
                self.step,
                "the step counter cannot advance past u64::MAX (set_steps or a checkpoint set it)",
            ));
        }
        None
    }

    /// Every rank learns whether any rank's input was bad, so that all of them stop together
    /// instead of leaving the good ranks waiting in a collective (nothing has been modified yet),
    /// and how many real rows the gathered batch holds. Returns that count.
    ///
    /// `call`: which call this pass is (`Call`); ranks on different calls would pair different
    /// collectives, so they are told apart here and refused together.
    pub(crate) fn agree_on_input(
        &mut self,
        own: Option<PfcError>,
        rows: usize,
        call: Call,
    ) -> Result<usize> {
        // rows <= batch_per_rank <= 2^24: LayerConfig::validate.
        let counts = self.agree(own, rows as u32, call)?;
        Ok(counts.iter().map(|&c| c as usize).sum())
    }

    /// [`agree_on_input`](Self::agree_on_input)'s exchange: besides the refusals, each rank
    /// contributes one `value` (at most [`AGREED_VALUE_MAX`], exact in f32) and every rank gets
    /// all of them, in rank order: a pass's row counts, or `load_resharded`'s identity of the
    /// files each rank loaded.
    pub(crate) fn agree(
        &mut self,
        own: Option<PfcError>,
        value: u32,
        call: Call,
    ) -> Result<Vec<u32>> {
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        // Slots [0, k): "rank r rejected its input"; [k, 2k): rank r's row count. row_loss holds
        // N·k >= 2k floats whenever N >= 2; a single-row layer exchanges through row_max too.
        // Each rank's slot also carries a 21-bit fingerprint of the configuration its buffers
        // and collectives were sized by, and which call it made (24 bits in all: exact in f32,
        // and a sum with zeros leaves it exact): ranks built with different configurations
        // would pair collectives of different sizes.
        let fingerprint = config_fingerprint(&self.config, call);
        let mut flags = vec![0.0f32; 2 * world];
        flags[rank] = (fingerprint * 8 + call.code() * 2 + u32::from(own.is_some())) as f32;
        flags[world + rank] = value.min(AGREED_VALUE_MAX) as f32;
        let (first, second) = flags.split_at(world);
        let exchanged = (|| {
            let (b, x) = (&self.backend, &mut self.bufs);
            b.upload(first, &mut x.row_loss)?;
            b.upload(second, &mut x.row_max)?;
            self.comm
                .all_reduce_f32(b, &mut x.row_loss, world, ReduceOp::Sum)?;
            self.comm
                .all_reduce_f32(b, &mut x.row_max, world, ReduceOp::Sum)?;
            Ok::<_, PfcError>((
                b.download(&x.row_loss, world)?,
                b.download(&x.row_max, world)?,
            ))
        })();
        // This rank's part of the agreement failed: its peers may be waiting in it, or may have
        // its result and go on without this rank. Break the group so they fail too.
        let (rejected, counts) = match exchanged {
            Ok(flags) => flags,
            Err(e) => {
                self.comm.abort(&format!(
                    "rank {rank}'s agreement on {} failed: {e}",
                    Call::name(call.code())
                ));
                return Err(e);
            }
        };
        if let Some(r) = rejected
            .iter()
            .position(|&f| ((f as u32) >> 1) & 3 != call.code())
        {
            return Err(PfcError::Collective(format!(
                "rank {r} called {} while rank {rank} called {}: every rank must make the same \
                 call; no rank took the step",
                Call::name(((rejected[r] as u32) >> 1) & 3),
                Call::name(call.code())
            )));
        }
        if let Some(r) = rejected
            .iter()
            .position(|&f| (f as u32) >> 3 != fingerprint)
        {
            return Err(PfcError::Collective(format!(
                "rank {r}'s layer configuration differs from rank {rank}'s (num_classes, dim, \
                 batch_per_rank, wire and grad_wire must agree{}); no rank took the step",
                if matches!(call, Call::Predict { .. }) {
                    ", and predict_top_k's k"
                } else {
                    ""
                }
            )));
        }
        if let Some(err) = own {
            return Err(err);
        }
        match rejected.iter().position(|&f| (f as u32) & 1 != 0) {
            Some(r) if call == Call::Load => Err(PfcError::Collective(format!(
                "rank {r} could not load the checkpoint files (its own error says why); no \
                 rank's layer changed"
            ))),
            Some(r) => Err(PfcError::Collective(format!(
                "rank {r} rejected its input; no rank took the step"
            ))),
            None => Ok(counts.iter().map(|&c| c as u32).collect()),
        }
    }

    /// All-gathers this rank's rows and labels into every rank's `x_hat` (normalized),
    /// `x_norms` and `gathered_labels`: packed on the host (padding rows are zeros with label
    /// −1), one upload, one all-gather, and one kernel that unpacks the gathered rows straight
    /// into their normalized copy.
    fn gather_rows(&mut self, embeddings: &[f32], labels: &[i64]) -> Result<()> {
        let (b, x) = (&self.backend, &mut self.bufs);
        let d = self.config.dim;
        let n = self.config.batch_per_rank;
        let m = n * self.comm.world_size();
        let wire = self.config.wire;
        match &mut x.packed {
            Packed::F32(send, recv) => {
                let row = crate::cpu::wire::packed_row_len_f32(d);
                let mut host = vec![0f32; n * row];
                crate::cpu::wire::pack_embeddings_f32(
                    embeddings,
                    labels,
                    labels.len(),
                    d,
                    &mut host,
                );
                for pad in host.chunks_exact_mut(row).skip(labels.len()) {
                    pad[d] = f32::from_bits(u32::MAX);
                    pad[d + 1] = f32::from_bits(u32::MAX);
                }
                b.upload(&host, send)?;
                self.comm.all_gather(b, send, n * row, recv)?;
                b.unpack_normalize_f32(
                    recv,
                    m,
                    d,
                    &mut x.gathered_labels,
                    &mut x.x_hat,
                    &mut x.x_norms,
                )?;
            }
            Packed::Half(send, recv) => {
                let row = crate::cpu::wire::packed_row_len(d);
                let mut host = vec![0u16; n * row];
                crate::cpu::wire::pack_embeddings(
                    embeddings,
                    labels,
                    labels.len(),
                    d,
                    wire,
                    &mut host,
                );
                for pad in host.chunks_exact_mut(row).skip(labels.len()) {
                    pad[d..].fill(u16::MAX);
                }
                b.upload(&host, send)?;
                self.comm.all_gather(b, send, n * row, recv)?;
                b.unpack_normalize(
                    recv,
                    m,
                    d,
                    wire,
                    &mut x.gathered_labels,
                    &mut x.x_hat,
                    &mut x.x_norms,
                )?;
            }
        }
        Ok(())
    }

    /// One forward and backward pass on this rank's batch; the sample is drawn by the layer.
    ///
    /// # Errors
    ///
    /// Refused on every rank alike, with nothing changed: a rank's bad input ([`PfcError::Shape`]
    /// for lengths or more rows than `batch_per_rank`, [`PfcError::Label`] for a label outside
    /// `[0, num_classes)`, a NaN/Inf or zero embedding row), an empty batch on every rank, a
    /// layer left incomplete by a failed load. After every rank agreed to run the pass, a
    /// collective or device error discards the pending gradient and breaks the group
    /// ([`Collective::abort`]; see docs/design.md).
    ///
    /// A second pass before [`PartialFc::step`] replaces the pending gradient: there is no
    /// accumulation across passes.
    pub fn forward_backward(&mut self, embeddings: &[f32], labels: &[i64]) -> Result<StepOutput> {
        let out = self.forward_backward_inner(embeddings, labels, None);
        self.end_pass(out)
    }

    /// A pass that failed after every rank agreed to run it breaks the group (see
    /// [`PartialFc::abort_after_agreement`]) and drops the pending gradient: whatever the pass
    /// had reached, the last pass's gradient is not the one to apply.
    fn end_pass<T>(&mut self, out: Result<T>) -> Result<T> {
        if self.abort_after_agreement(&out, "forward/backward pass") {
            self.grad_pending = false;
            self.last_sampled = None;
        }
        out
    }

    /// After a call that agreed with the other ranks to run (`mid_pass` set): a failure past
    /// that point breaks the group, since this rank's peers would otherwise wait for it in the
    /// collective it left (until their timeout), or pair its next call with that one. Refusals
    /// every rank agreed on return before the point. Says whether it broke the group.
    pub(crate) fn abort_after_agreement<T>(&mut self, out: &Result<T>, what: &str) -> bool {
        let agreed = std::mem::take(&mut self.mid_pass);
        match out {
            Err(e) if agreed => {
                let rank = self.comm.rank();
                self.comm
                    .abort(&format!("rank {rank}'s {what} failed: {e}"));
                true
            }
            _ => false,
        }
    }

    /// Like [`PartialFc::forward_backward`], with the sample given instead of drawn: `sampled`
    /// holds sorted global class ids (any rank's; each rank keeps those in its shard) and must
    /// hold every positive of the gathered batch. Used for parity with other implementations.
    ///
    /// # Errors
    ///
    /// Those of [`PartialFc::forward_backward`], and, on every rank alike: a class outside
    /// `[0, num_classes)`, a sample not sorted and unique, more of this shard's classes than its
    /// sample capacity, a positive of the batch missing from the sample.
    pub fn forward_backward_with_sample(
        &mut self,
        embeddings: &[f32],
        labels: &[i64],
        sampled: &[i64],
    ) -> Result<StepOutput> {
        let out = self.forward_backward_inner(embeddings, labels, Some(sampled));
        self.end_pass(out)
    }

    fn forward_backward_inner(
        &mut self,
        embeddings: &[f32],
        labels: &[i64],
        given: Option<&[i64]>,
    ) -> Result<StepOutput> {
        let mut own = self.check_complete().err();
        if own.is_none() {
            own = self.check_input(embeddings, labels);
        }
        let local_sample: Vec<i32> = match given {
            Some(ids) => {
                if own.is_none() {
                    if let Some(&bad) = ids
                        .iter()
                        .find(|&&c| c < 0 || c as u64 >= self.config.num_classes)
                    {
                        own = Some(PfcError::Shape(format!(
                            "a given sample holds class {bad}, outside [0, {})",
                            self.config.num_classes
                        )));
                    }
                }
                if own.is_none() && ids.windows(2).any(|w| w[0] >= w[1]) {
                    own = Some(PfcError::Shape(
                        "a given sample must be sorted and unique".into(),
                    ));
                }
                let ids: Vec<i32> = ids
                    .iter()
                    .filter(|&&c| self.shard.contains(c))
                    .map(|&c| (c as u64 - self.shard.start) as i32)
                    .collect();
                if own.is_none() && ids.len() > self.capacity {
                    own = Some(PfcError::Shape(format!(
                        "a given sample of {} classes exceeds this shard's capacity {}",
                        ids.len(),
                        self.capacity
                    )));
                }
                ids
            }
            None => Vec::new(),
        };
        let call = if given.is_some() {
            Call::Given
        } else {
            Call::Drawn
        };
        let real_rows = self.agree_on_input(own, labels.len(), call)?;
        if real_rows == 0 {
            // Every rank sees the same count, so all of them stop here together.
            return Err(PfcError::Shape(
                "every rank passed an empty batch: there is no loss to take".into(),
            ));
        }
        // Every rank runs this pass now: a failure from here on breaks the group and drops the
        // last pass's gradient (`end_pass`), in the all-gather too.
        self.mid_pass = true;

        // Ranks may pass fewer rows than `batch_per_rank` (a last, smaller batch; a batch that
        // does not split evenly). Every rank pads to N: padding rows are zero embeddings with
        // label −1, which normalize to zero, own no target and so add nothing to the loss or the
        // class centers' gradient; their embedding gradient is computed and discarded.
        let d = self.config.dim;
        let n = self.config.batch_per_rank;
        let world = self.comm.world_size();
        let m = n * world;
        let shard_len = self.shard.len as usize;

        // 1. All-gather embeddings and labels, normalized on arrival.
        self.gather_rows(embeddings, labels)?;
        let (b, x) = (&self.backend, &mut self.bufs);
        // 2. Labels of this shard become shard-local ids.
        b.localize_labels(
            &x.gathered_labels,
            m,
            self.shard.start,
            shard_len,
            &mut x.local_labels,
        )?;

        // 3. Sample.
        let s = match given {
            Some(_) => {
                let mut local = b.download(&x.local_labels, m)?;
                let mut missing = None;
                for (row, l) in local.iter_mut().enumerate().filter(|(_, l)| **l >= 0) {
                    match local_sample.binary_search(l) {
                        Ok(p) => *l = p as i32,
                        Err(_) => {
                            missing.get_or_insert(PfcError::Shape(format!(
                                "the given sample misses class {} (label of gathered row {row})",
                                *l as u64 + self.shard.start
                            )));
                        }
                    }
                }
                // Only the rank that holds the class can tell; every rank must learn it before
                // any returns, or the others wait in the next collective (or pair it with the
                // wrong call). Nothing observable has changed yet.
                // A refusal here is every rank's, not a failure to break the group for.
                self.mid_pass = false;
                self.agree_on_input(missing, 0, Call::Given)?;
                self.mid_pass = true;
                let (b, x) = (&self.backend, &mut self.bufs);
                b.upload(&local, &mut x.local_labels)?;
                b.upload(&local_sample, &mut x.sampled_index)?;
                local_sample.len()
            }
            None => {
                let hard_fraction = match self.config.sampler {
                    NegativeSampler::Hard { fraction } => fraction as f32,
                    NegativeSampler::Random => 0.0,
                };
                let scores = match (&mut x.scores, &mut x.chunk_weights, &mut x.chunk_cosines) {
                    (Some(scores), Some(cw), Some(cc)) if self.config.sample_rate < 1.0 => {
                        b.class_max_cosine(
                            &x.weight,
                            shard_len,
                            d,
                            &x.x_hat,
                            &x.gathered_labels,
                            m,
                            cw,
                            cc,
                            scores,
                        )?;
                        Some(&*scores)
                    }
                    _ => None,
                };
                let args = SampleArgs {
                    shard_len,
                    shard_start: self.shard.start,
                    num_sample: sampled_count(self.shard.len, self.config.sample_rate) as usize,
                    rows: m,
                    seed: self.config.seed,
                    step: self.step,
                    hard_fraction,
                };
                b.sample_classes(
                    &args,
                    &mut x.local_labels,
                    scores,
                    &mut x.keys,
                    &mut x.sampled_index,
                )?
            }
        };
        // The counter counts passes that drew their sample: every rank gets here after the same
        // collectives, so a later failure on some of them advances all counters alike.
        self.step += 1;
        self.grad_pending = false;
        self.last_sampled = None;
        let (b, x) = (&self.backend, &mut self.bufs);

        // 4. Sampled, normalized centers and the cosine logits, each logits row padded to
        //    `shape.ld` columns (see `LogitsShape`): the GEMMs run over all `ld` columns, the
        //    padding rows of the sampled centers are zero (at allocation, and zeroed again
        //    below after a larger sample wrote them), and the softmax ignores the padding
        //    columns and zeroes their gradient, so they add nothing to either backward GEMM.
        let shape = LogitsShape::aligned(m, s)?;
        let ld = shape.ld;
        let stale = self.sampled_rows_written.min(ld);
        if stale > s {
            // Only after a larger sample (a given one, or more positives than `num_sample`).
            b.upload_at(&vec![0.0; (stale - s) * d], &mut x.sampled_weights, s * d)?;
        }
        self.sampled_rows_written = self.sampled_rows_written.max(s);
        b.gather_normalize_rows(
            &x.weight,
            d,
            &x.sampled_index,
            s,
            &mut x.sampled_weights,
            &mut x.weight_norms,
        )?;
        let logits = &mut x.logits;
        match logits {
            Logits::F32(l) => b.gemm_nt(m, ld, d, &x.x_hat, &x.sampled_weights, l)?,
            Logits::Half(l, _) => b.gemm_nt16(m, ld, d, &x.x_hat, &x.sampled_weights, l)?,
        }

        // 5–6. Margin, distributed softmax, loss and the logits' gradient in place. A world of
        //      one has nothing to all-reduce, so it runs the three passes as one kernel.
        let margin = self.config.margin.params();
        let mean = 1.0 / real_rows as f32;
        let grad_scale = logits.softmax_grad_scale(mean);
        if self.comm.world_size() == 1 {
            logits.fused(
                b,
                shape,
                &x.local_labels,
                &margin,
                grad_scale,
                &mut x.row_loss,
            )?;
        } else {
            logits.rowmax(
                b,
                shape,
                &x.local_labels,
                &margin,
                &mut x.row_max,
                &mut x.target_cos,
            )?;
            self.comm
                .all_reduce_f32(b, &mut x.row_max, m, ReduceOp::Max)?;
            logits.exp_rowsum(
                b,
                shape,
                &x.local_labels,
                &margin,
                &x.row_max,
                &mut x.row_sum,
            )?;
            self.comm
                .all_reduce_f32(b, &mut x.row_sum, m, ReduceOp::Sum)?;
            let stats = (&x.row_max, &x.row_sum, &x.target_cos);
            logits.loss_grad(
                b,
                shape,
                &x.local_labels,
                &margin,
                stats,
                grad_scale,
                &mut x.row_loss,
            )?;
            self.comm
                .all_reduce_f32(b, &mut x.row_loss, m, ReduceOp::Sum)?;
        }
        let loss = b
            .download(&x.row_loss, m)?
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>()
            / real_rows as f64;

        // 7. Back through the GEMMs and both normalizations; the embedding gradient is summed
        //    over ranks and each rank keeps its own rows.
        match &x.logits {
            Logits::F32(g) => b.gemm_backward(
                m,
                ld,
                d,
                g,
                &x.sampled_weights,
                &x.x_hat,
                &mut x.x_grad,
                &mut x.sampled_weights_grad,
            )?,
            // The mean's 1/rows rides in the GEMMs' alpha (see `Logits::softmax_grad_scale`);
            // the 16-bit copies of x̂ and ŵ made by gemm_nt16 above are still in place.
            Logits::Half(g, _) => b.gemm_backward16(
                m,
                ld,
                d,
                g,
                mean,
                &x.sampled_weights,
                &x.x_hat,
                &mut x.x_grad,
                &mut x.sampled_weights_grad,
                true,
            )?,
        }
        b.normalize_backward(&mut x.x_grad, &x.x_hat, &x.x_norms, m, d)?;
        b.normalize_backward(
            &mut x.sampled_weights_grad,
            &x.sampled_weights,
            &x.weight_norms,
            s,
            d,
        )?;
        match &mut x.grad_wire {
            None => self
                .comm
                .reduce_scatter_f32(b, &x.x_grad, n * d, &mut x.staging)?,
            Some((send, recv)) => {
                // Half the bytes on the wire: each rank's gradient rounded once, summed in the
                // 16-bit dtype by the collective, widened back (see `LayerConfig::grad_wire`).
                let dtype = self.config.grad_wire;
                b.cast_to_wire(&x.x_grad, m * d, dtype, send)?;
                self.comm.reduce_scatter_16(b, send, n * d, recv, dtype)?;
                b.cast_from_wire(recv, n * d, dtype, &mut x.staging)?;
            }
        }
        let grad_embeddings = b.download(&x.staging, labels.len() * d)?;
        self.grad_pending = true;
        self.last_sampled = Some(s);
        Ok(StepOutput {
            loss: loss as f32,
            grad_embeddings,
            sampled: s,
        })
    }

    /// The sorted global class ids this rank sampled in the last forward pass (also after
    /// [`PartialFc::step`]; empty before the first pass and after the weights were replaced).
    pub fn sampled_classes(&self) -> Result<Vec<i64>> {
        let s = self.last_sampled.unwrap_or(0);
        Ok(self
            .backend
            .download(&self.bufs.sampled_index, s)?
            .into_iter()
            .map(|c| c as i64 + self.shard.start as i64)
            .collect())
    }

    /// d loss / d shard weights from the last backward pass, dense (`shard × d`, zero outside the
    /// sample; also after [`PartialFc::step`]; all zero before the first pass and after the
    /// weights were replaced).
    pub fn weight_grad_dense(&self) -> Result<Vec<f32>> {
        let d = self.config.dim;
        let mut dense = vec![0.0f32; self.shard.len as usize * d];
        if let Some(sampled) = self.last_sampled {
            let rows = self
                .backend
                .download(&self.bufs.sampled_weights_grad, sampled * d)?;
            let index = self.backend.download(&self.bufs.sampled_index, sampled)?;
            for (i, &c) in index.iter().enumerate() {
                let c = c as usize;
                dense[c * d..(c + 1) * d].copy_from_slice(&rows[i * d..(i + 1) * d]);
            }
        }
        Ok(dense)
    }

    /// Applies the optimizer (SGD with momentum, or AdamW) to the shard with learning rate `lr`,
    /// from the gradient of the last [`PartialFc::forward_backward`]. Each call that runs an
    /// update counts one in [`optimizer_steps`](Self::optimizer_steps), AdamW's t.
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] for a NaN, infinite or negative `lr` (with AdamW also `lr ×
    /// weight_decay ≥ 1`), a layer without an optimizer, or one left incomplete by a load that
    /// failed midway;
    /// [`PfcError::Order`] when no gradient is pending (no pass since the last `step`, or the
    /// last pass failed). The gradient is consumed before the update runs: should a device error
    /// stop the update part-way, the gradient is gone (applying it again after a partial update
    /// would count it twice), so the next `step` needs a new pass.
    pub fn step(&mut self, lr: f32) -> Result<()> {
        self.check_complete()?;
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(PfcError::param("lr", lr, "must be finite and >= 0"));
        }
        let Some(optimizer) = self.config.optimizer else {
            return Err(PfcError::param(
                "optimizer",
                "none",
                "this layer was built without an optimizer",
            ));
        };
        if let Optimizer::AdamW(a) = optimizer {
            // The decoupled decay multiplies each weight by 1 − lr·λ: at lr·λ ≥ 1 that flips or
            // zeroes every weight (PyTorch does it anyway; here it is refused).
            if f64::from(lr) * f64::from(a.weight_decay) >= 1.0 {
                return Err(PfcError::param(
                    "lr",
                    lr,
                    format!(
                        "lr × weight_decay ({}) must be < 1 for AdamW's decoupled decay",
                        a.weight_decay
                    ),
                ));
            }
        }
        let sampled = match (self.grad_pending, self.last_sampled) {
            (true, Some(sampled)) => sampled,
            _ => {
                return Err(PfcError::Order(
                    "step() needs a forward_backward() first (none since the last step, or it \
                     failed)"
                        .into(),
                ))
            }
        };
        self.grad_pending = false;
        // Counted before the update runs, as the gradient is consumed: an update stopped part-way
        // by a device error is not retried.
        self.optimizer_step = self.optimizer_step.saturating_add(1);
        let b = &self.backend;
        let x = &mut self.bufs;
        let d = self.config.dim;
        let len = self.shard.len as usize * d;
        let dense = match (self.config.update, x.weight_grad.as_mut()) {
            (UpdateMode::Dense, Some(grad)) => {
                b.scatter_rows(
                    &x.sampled_weights_grad,
                    &x.sampled_index,
                    sampled,
                    d,
                    grad,
                    self.shard.len as usize,
                )?;
                Some(&*grad)
            }
            _ => None,
        };
        match (optimizer, x.states.as_mut_slice()) {
            (Optimizer::Sgd(sgd), [momentum]) => match dense {
                Some(grad) => b.sgd_momentum_dense(
                    &mut x.weight,
                    momentum,
                    grad,
                    len,
                    lr,
                    sgd.momentum,
                    sgd.weight_decay,
                ),
                None => b.sgd_momentum_sparse(
                    &mut x.weight,
                    momentum,
                    &x.sampled_weights_grad,
                    &x.sampled_index,
                    sampled,
                    d,
                    lr,
                    sgd.momentum,
                    sgd.weight_decay,
                ),
            },
            (Optimizer::AdamW(adamw), [exp_avg, exp_avg_sq]) => {
                let step = AdamWStep {
                    lr,
                    adamw,
                    t: self.optimizer_step,
                    seed: self.config.seed,
                };
                match dense {
                    Some(grad) => {
                        b.adamw_dense(&mut x.weight, exp_avg, exp_avg_sq, grad, len, step)
                    }
                    None => b.adamw_sparse(
                        &mut x.weight,
                        exp_avg,
                        exp_avg_sq,
                        &x.sampled_weights_grad,
                        &x.sampled_index,
                        sampled,
                        d,
                        step,
                    ),
                }
            }
            _ => unreachable!("the layer allocates one state buffer per state name"),
        }
    }
}
