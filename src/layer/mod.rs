//! `PartialFc`: one rank's sharded, sampled margin-softmax classifier, and the training step,
//! written once for every backend and collective.

mod agreement;
mod buffers;
mod checks;
mod gather;
mod memory;
mod options;
mod pass;
mod predict;
mod propensity;
mod ranking;
mod row_results;
mod state;
mod update;

pub(crate) use agreement::{fnv1a_bits, Call};
pub(crate) use checks::{
    center_norm_reason, prediction_row_error, storable, storable_as, zero_rows, CenterNorms,
};
pub use options::{PassOptions, ROW_ADDITIVE_MARGIN, ROW_ANGULAR_MARGIN};
pub use predict::Prediction;
pub use propensity::{inverse_propensities, PropensityMetrics};
pub use ranking::RankingMetrics;
pub use row_results::RowResults;

use crate::backend::{Backend, Collective, StateBuf};
use crate::config::{LayerConfig, NegativeSampler, Optimizer, UpdateMode};
use crate::error::{PfcError, Result};
use crate::plan::buffers::HARD_NEGATIVE_CHUNK;
use crate::plan::Dtype;
use crate::shard::Shard;
use buffers::{Buffers, Logits, Packed};

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
    /// Per-row results for this rank's rows: loss, target cosine, and the gradient with respect
    /// to each row's margins (what a margin that depends on the embedding, MagFace's, needs).
    pub rows: RowResults,
}

/// What the dense gradient buffer (`UpdateMode::Dense`) holds of a gradient accumulated over
/// passes ([`PartialFc::forward_backward_accumulate`]). The last pass's gradient always lives in
/// the sampled rows until `step` (or the next accumulating pass) adds it in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Accumulated {
    /// Nothing of the pending gradient: it is the last pass's alone.
    None,
    /// The sum of the accumulation's passes before the last one, not yet applied.
    Earlier,
    /// The whole sum, which the last `step` applied.
    Applied,
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
    /// The configuration's hash that ranks compare in every agreement
    /// (`agreement::config_fingerprint`), computed once: the configuration never changes.
    fingerprint: u32,
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
    /// What the dense gradient buffer holds of a gradient accumulation.
    accumulated: Accumulated,
    /// Passes in the pending gradient (0 when none; more than 1 with accumulation).
    pending_passes: u64,
    /// Every pass's gradients are those of `grad_scale × loss` (`set_grad_scale`; 1 by default).
    grad_scale: f32,
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
                crate::init::INIT_STD,
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
            row_loss: b.alloc(2 * m)?,
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
            margin_table: None,
        };
        Ok(PartialFc {
            backend,
            comm,
            fingerprint: agreement::config_fingerprint(&config),
            config,
            shard,
            capacity,
            step: 0,
            optimizer_step: 0,
            grad_pending: false,
            accumulated: Accumulated::None,
            pending_passes: 0,
            grad_scale: 1.0,
            mid_pass: false,
            last_sampled: None,
            sampled_rows_written: 0,
            incomplete: false,
            bufs,
        })
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

    /// Forgets the gradient of the last pass and of any accumulation: it must not be applied
    /// (a failed pass, new weights).
    pub(crate) fn drop_grad(&mut self) {
        self.grad_pending = false;
        self.last_sampled = None;
        self.accumulated = Accumulated::None;
        self.pending_passes = 0;
    }

    /// Discards the pending gradient, a single pass's or an accumulated sum, without an update:
    /// PyTorch's `optimizer.zero_grad()` where no `optimizer.step()` came before it (a skipped
    /// step: a loss scaler that found an overflow, a window cut short). Afterwards the layer is
    /// as after new weights: [`step`](Self::step) needs a new pass,
    /// [`weight_grad_dense`](Self::weight_grad_dense) is zero and
    /// [`sampled_classes`](Self::sampled_classes) empty.
    /// Weights, optimizer state and counters are untouched. Local to this rank, like
    /// [`set_steps`](Self::set_steps): call it on every rank.
    pub fn discard_grad(&mut self) {
        self.drop_grad();
    }

    /// Makes every later pass's gradients (the class centers' and the embeddings') those of
    /// `scale × loss`: PyTorch's `(loss / K).backward()` with `scale = 1 / K`, which turns the
    /// sum of K [`forward_backward_accumulate`](Self::forward_backward_accumulate) passes into
    /// their mean, with the optimizer's hyperparameters and state as PyTorch's (docs/design.md).
    /// The reported loss stays the unscaled mean. Every rank must use the same scale: a pass
    /// where they differ is refused on every rank. A checkpoint does not record it (it belongs
    /// to the run's schedule, like the learning rate): set it again after a resume
    /// ([`load`](Self::load), [`load_resharded`](Self::load_resharded)), or the resumed run
    /// steps with the sum of its passes instead of their mean. The embedding gradient crosses a 16-bit
    /// `grad_wire` scaled: with f16 (whose range ends near 6·10⁻⁸) a small scale sends more of
    /// its values into f16's subnormals; bf16 has f32's range.
    ///
    /// ```
    /// use partial_fc::{collective::SingleRank, CpuBackend, LayerConfig, PartialFc};
    /// let mut cfg = LayerConfig::new(1000, 16, 8);
    /// cfg.sample_rate = 1.0; // the same sample in both passes
    /// let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    /// let x: Vec<f32> = (0..8 * 16).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
    /// let labels: Vec<i64> = (0..8).map(|i| i * 100).collect();
    /// let full = layer.forward_backward(&x, &labels).unwrap();
    /// layer.set_grad_scale(0.25).unwrap();
    /// let quarter = layer.forward_backward(&x, &labels).unwrap();
    /// assert_eq!(quarter.loss, full.loss);
    /// let (a, b) = (full.grad_embeddings[0], quarter.grad_embeddings[0]);
    /// assert!((b - a / 4.0).abs() <= 1e-6 * a.abs());
    /// ```
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] unless `scale` is finite and positive.
    pub fn set_grad_scale(&mut self, scale: f32) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(PfcError::param(
                "grad_scale",
                scale,
                "must be finite and > 0",
            ));
        }
        self.grad_scale = scale;
        Ok(())
    }

    /// The gradient scale of [`set_grad_scale`](Self::set_grad_scale) (1 by default).
    pub fn grad_scale(&self) -> f32 {
        self.grad_scale
    }

    /// Passes whose gradient [`step`](Self::step) would apply now: 0 when none is pending, 1
    /// after a [`forward_backward`](Self::forward_backward), and one more for each
    /// [`forward_backward_accumulate`](Self::forward_backward_accumulate) since (the number to
    /// divide by for a mean; see docs/design.md).
    pub fn pending_passes(&self) -> u64 {
        self.pending_passes
    }
}
