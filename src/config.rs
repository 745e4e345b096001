//! Configuration of the Partial FC layer: margin, sampler, optimizer, and the layer's shape.
//!
//! Every type here validates itself (`validate`) so that a bad value is a typed error at
//! construction, never a NaN ten thousand steps later.

use crate::error::{PfcError, Result};
use std::f64::consts::PI;

/// How the gradient flows through the margin on the target logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradMode {
    /// Differentiate through `cos(m1·θ + m2) − m3` (the original ArcFace paper).
    Exact,
    /// The margin changes the forward value only; d logit / d cos θ = s everywhere. This is what
    /// the published PyTorch implementation (PartialFC_V2 + CombinedMarginLoss) does.
    #[default]
    StraightThrough,
}

/// What happens to the target logit where `m1·θ + m2` would pass π.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetFallback {
    /// No fallback: the logit is `cos(m1·θ + m2) − m3` everywhere (published PyTorch behaviour).
    #[default]
    None,
    /// The original ArcFace trick: where `cos θ <= cos((π − m2) / m1)`, use
    /// `cos θ − m2·sin(π − m2) − m3`, which keeps the target logit monotonic in θ.
    Monotonic,
}

/// The combined margin `s · (cos(m1·θ + m2) − m3)` on the target logit, and its options.
///
/// ```
/// use partial_fc::Margin;
/// let arc = Margin::arcface();
/// assert_eq!((arc.m1, arc.m2, arc.m3), (1.0, 0.5, 0.0));
/// arc.validate().unwrap();
/// assert!(Margin { scale: 0.0, ..arc }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Margin {
    /// Scale `s` applied to every logit (> 0).
    pub scale: f64,
    /// Multiplicative angular margin (SphereFace), `m1 >= 1`.
    pub m1: f64,
    /// Additive angular margin (ArcFace), `0 <= m2 < π/2`.
    pub m2: f64,
    /// Additive cosine margin (CosFace), `0 <= m3 < 1`.
    pub m3: f64,
    /// Gradient through the margin.
    pub grad_mode: GradMode,
    /// Behaviour where `m1·θ + m2 > π`.
    pub fallback: TargetFallback,
    /// Inter-class filtering: non-target cosines above this threshold are set to 0 and pass no
    /// gradient (the published `interclass_filtering_threshold`); `None` or a value <= 0 disables it.
    pub interclass_filter: Option<f64>,
}

impl Margin {
    /// ArcFace: s = 64, (m1, m2, m3) = (1, 0.5, 0).
    pub fn arcface() -> Margin {
        Margin::combined(64.0, 1.0, 0.5, 0.0)
    }

    /// CosFace: s = 64, (m1, m2, m3) = (1, 0, 0.4).
    pub fn cosface() -> Margin {
        Margin::combined(64.0, 1.0, 0.0, 0.4)
    }

    /// Any combined margin, with the published implementation's gradient mode and no filtering.
    ///
    /// This is the formula of the ArcFace paper's combined margin for every (m1, m2, m3). The
    /// published `CombinedMarginLoss` agrees for ArcFace (m1 = 1, m3 = 0) and CosFace (m1 = 1,
    /// m2 = 0) but not for the other combinations: with m3 > 0 it applies `cos θ − m3` only
    /// (ignoring m1 and m2), and with m1 ≠ 1 and m3 = 0 it raises an error. Compare other
    /// combinations with it only after setting them to what it computes.
    pub fn combined(scale: f64, m1: f64, m2: f64, m3: f64) -> Margin {
        Margin {
            scale,
            m1,
            m2,
            m3,
            grad_mode: GradMode::StraightThrough,
            fallback: TargetFallback::None,
            interclass_filter: None,
        }
    }

    /// Checks every parameter against its domain.
    pub fn validate(&self) -> Result<()> {
        // The kernels compute in f32: a value finite in f64 but not in f32 (1e39) would become
        // +inf there and the loss NaN, and a tiny scale (1e-50) would become 0.
        let (scale32, m1_32) = (self.scale as f32, self.m1 as f32);
        if !(scale32.is_finite() && scale32 > 0.0) {
            return Err(PfcError::param(
                "scale",
                self.scale,
                "must be finite and > 0 in f32",
            ));
        }
        if !(m1_32.is_finite() && self.m1 >= 1.0) {
            return Err(PfcError::param(
                "m1",
                self.m1,
                "must be finite in f32 and >= 1",
            ));
        }
        if !(self.m2 >= 0.0 && self.m2 < PI / 2.0) {
            return Err(PfcError::param("m2", self.m2, "must lie in [0, π/2)"));
        }
        if !(self.m3 >= 0.0 && self.m3 < 1.0) {
            return Err(PfcError::param("m3", self.m3, "must lie in [0, 1)"));
        }
        if let Some(t) = self.interclass_filter {
            if !t.is_finite() || t > 1.0 {
                return Err(PfcError::param(
                    "interclass_filter",
                    t,
                    "must be finite and <= 1 (<= 0 disables it)",
                ));
            }
        }
        Ok(())
    }

    /// The scalar parameters a kernel needs, in f32.
    pub fn params(&self) -> MarginParams {
        let threshold_theta = (PI - self.m2) / self.m1;
        MarginParams {
            scale: self.scale as f32,
            m1: self.m1 as f32,
            m2: self.m2 as f32,
            m3: self.m3 as f32,
            exact_grad: self.grad_mode == GradMode::Exact,
            fallback: self.fallback == TargetFallback::Monotonic,
            // The angle never passes π (m1·θ + m2 <= π for every θ in [0, π]): no cosine
            // takes the fallback. (−1 here took it at c = −1, where a negative per-row m2
            // leaves the angle short of π; for m2 = 0 both give the same bits.)
            fallback_cos: if threshold_theta >= PI {
                f32::NEG_INFINITY
            } else {
                threshold_theta.cos() as f32
            },
            fallback_mm: (self.m2 * (PI - self.m2).sin()) as f32,
            filter: self
                .interclass_filter
                .filter(|t| *t > 0.0)
                .map(|t| t as f32),
        }
    }
}

impl Default for Margin {
    fn default() -> Self {
        Margin::arcface()
    }
}

/// Floats per row of a per-row margin table: the row's m2, m3, and its monotonic fallback's
/// `fallback_cos` and `fallback_mm` ([`MarginParams`]), as [`Margin::row_entry`] writes them
/// and [`MarginParams::for_row`] reads them.
pub const ROW_MARGIN_FLOATS: usize = 4;

impl Margin {
    /// One row's entry of a per-row margin table: this margin with the row's own m2 and m3
    /// (the scale, m1, gradient mode, fallback mode and filter stay the layer's). The fallback's
    /// constants are computed from the row's m2 in f64, as [`Margin::params`] computes the
    /// layer's, so a row whose m2 and m3 equal the layer's gets its exact parameters.
    pub fn row_entry(&self, m2: f64, m3: f64) -> [f32; ROW_MARGIN_FLOATS] {
        let p = Margin { m2, m3, ..*self }.params();
        [p.m2, p.m3, p.fallback_cos, p.fallback_mm]
    }
}

impl MarginParams {
    /// The parameters of row `row`: `self` with the row's m2, m3 and fallback constants from a
    /// per-row table of [`ROW_MARGIN_FLOATS`] floats per row ([`Margin::row_entry`]), or `self`
    /// when there is no table. The CPU reference of the kernels' `row_margin`.
    pub fn for_row(&self, table: Option<&[f32]>, row: usize) -> MarginParams {
        match table {
            None => *self,
            Some(t) => {
                let r = &t[ROW_MARGIN_FLOATS * row..ROW_MARGIN_FLOATS * (row + 1)];
                MarginParams {
                    m2: r[0],
                    m3: r[1],
                    fallback_cos: r[2],
                    fallback_mm: r[3],
                    ..*self
                }
            }
        }
    }
}

/// Margin parameters in the form kernels consume them (f32, precomputed constants).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarginParams {
    /// Scale s.
    pub scale: f32,
    /// m1.
    pub m1: f32,
    /// m2.
    pub m2: f32,
    /// m3.
    pub m3: f32,
    /// Differentiate through the margin ([`GradMode::Exact`]).
    pub exact_grad: bool,
    /// Use the monotonic fallback ([`TargetFallback::Monotonic`]).
    pub fallback: bool,
    /// cos((π − m2) / m1): at or below it the fallback applies (−∞ where the angle cannot
    /// pass π).
    pub fallback_cos: f32,
    /// m2 · sin(π − m2): the fallback's offset.
    pub fallback_mm: f32,
    /// Inter-class filtering threshold, when enabled.
    pub filter: Option<f32>,
}

/// How negative classes are chosen when the sample rate is below 1.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum NegativeSampler {
    /// Uniform without replacement, from the counter-based generator (the paper's sampler).
    #[default]
    Random,
    /// A fraction (0..=1) of the negatives are the hardest ones: the classes whose best cosine
    /// against any embedding of the gathered batch is highest; the rest are random.
    Hard {
        /// Fraction of the negative slots filled by hard negatives.
        fraction: f64,
    },
}

/// Which rows of the shard the optimizer touches each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdateMode {
    /// Only sampled rows and their optimizer state are updated (the paper's algorithm; the
    /// default); no full-shard gradient buffer exists. A row not sampled keeps its momentum
    /// and gets no weight decay that step.
    #[default]
    Sparse,
    /// Every row is updated from a full-shard gradient that is zero outside the sample (the
    /// published PyTorch v2 semantics: weight decay and momentum act on every row).
    Dense,
}

/// Operand precision of the step's three GEMMs (logits, embedding gradient, sampled-weight
/// gradient). The master weights and the accumulation stay f32. With `Bf16` or `F16` both
/// operands are rounded to 16 bits (into buffers the backend keeps for the layer's life,
/// `gemm_operands` in the memory plan) and multiplied with f32 accumulation, and the logits and
/// their gradient are stored in the 16-bit type, as PyTorch's autocast does
/// ([`crate::Backend::logits_dtype`]); the softmax between them computes in f32. Each product
/// carries a relative error of at most about 2·2⁻⁸ (bf16) or 2·2⁻¹¹ (f16), the unit roundoffs of
/// their 8 and 11 significant bits. Only the CUDA backend implements the 16-bit variants; the
/// CPU backend rejects them with [`PfcError::Param`]. The hard-negative scoring GEMM stays f32.
///
/// ```
/// use partial_fc::{CpuBackend, GemmPrecision, LayerConfig, PartialFc, collective::SingleRank};
/// let mut cfg = LayerConfig::new(1000, 16, 8);
/// assert_eq!(cfg.precision, GemmPrecision::F32);
/// cfg.precision = GemmPrecision::Bf16;
/// // The CPU backend multiplies in f32 only.
/// assert!(PartialFc::new(cfg, CpuBackend, SingleRank).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPrecision {
    /// f32 operands (cuBLAS SGEMM in its default math mode: no TF32).
    #[default]
    F32,
    /// bf16 operands and logits, f32 accumulation.
    Bf16,
    /// f16 operands and logits, f32 accumulation.
    F16,
}

impl GemmPrecision {
    /// Bytes per operand element.
    pub fn operand_bytes(self) -> u64 {
        match self {
            GemmPrecision::F32 => 4,
            GemmPrecision::Bf16 | GemmPrecision::F16 => 2,
        }
    }

    /// The lower-case name used by the CLI and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            GemmPrecision::F32 => "f32",
            GemmPrecision::Bf16 => "bf16",
            GemmPrecision::F16 => "f16",
        }
    }
}

impl std::fmt::Display for GemmPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// SGD with momentum and weight decay on the class centers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    /// Momentum (0 disables the momentum buffer's effect, it is still allocated).
    pub momentum: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
    /// Storage dtype of the momentum buffer (see [`StateDtype`]).
    pub state_dtype: StateDtype,
}

impl Default for Sgd {
    /// The paper's: momentum 0.9, weight decay 5e-4, momentum stored in f32.
    fn default() -> Self {
        Sgd {
            momentum: 0.9,
            weight_decay: 5e-4,
            state_dtype: StateDtype::F32,
        }
    }
}

/// AdamW (Adam with decoupled weight decay, Loshchilov & Hutter 2019) on the class centers, with
/// the update of `torch.optim.AdamW`: per weight, `w ← w·(1 − lr·λ)`, `m ← β₁m + (1 − β₁)g`,
/// `v ← β₂v + (1 − β₂)g²`, `w ← w − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε)`.
///
/// The bias corrections take `t` from the layer's count of updates
/// ([`crate::PartialFc::optimizer_steps`]), as PyTorch counts `optimizer.step()` calls: a pass
/// without an update does not change it, and a checkpoint restores it.
///
/// With [`UpdateMode::Dense`] every row moves each step (the published PyTorch code's
/// `PartialFC_V2` under AdamW: its full weight's gradient is zero outside the sample, yet the
/// moments decay and the weight decays everywhere). With [`UpdateMode::Sparse`] only the
/// sampled rows and their moments move ("lazy" Adam, as `torch.optim.SparseAdam` does, plus the
/// decoupled decay on those rows): an unsampled class keeps its moments until it is drawn again.
/// Both moments are stored in [`AdamW::state_dtype`]; the arithmetic is f32. In bf16 they are
/// stored by stochastic rounding (unbiased; keyed by the layer's seed, the update and the
/// element, identical on CPU and GPU): with β₂ = 0.999 the second moment changes by 0.1% a step,
/// less than half a bf16 step, so rounding to nearest would store the old value forever, while
/// stochastic rounding follows f32 on average (tests/adamw.rs). `lr · weight_decay` must stay
/// below 1.
///
/// ```
/// use partial_fc::{AdamW, CpuBackend, LayerConfig, PartialFc, collective::SingleRank};
/// let mut cfg = LayerConfig::new(1_000, 16, 8);
/// cfg.optimizer = Some(AdamW { weight_decay: 0.1, ..AdamW::default() }.into());
/// let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank)?;
/// let x = vec![0.5f32; 8 * 16];
/// let labels: Vec<i64> = (0..8).collect();
/// layer.forward_backward(&x, &labels)?;
/// layer.step(1e-3)?;
/// assert_eq!(layer.optimizer_state("exp_avg")?.len(), 1_000 * 16);
/// # Ok::<(), partial_fc::PfcError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Decay of the first moment, β₁ in [0, 1).
    pub beta1: f32,
    /// Decay of the second moment, β₂ in [0, 1).
    pub beta2: f32,
    /// Added to the denominator, ε > 0.
    pub eps: f32,
    /// Decoupled weight decay λ (multiplies `lr`, as in PyTorch).
    pub weight_decay: f32,
    /// Storage dtype of both moments (see [`StateDtype`]).
    pub state_dtype: StateDtype,
}

impl Default for AdamW {
    /// PyTorch's defaults: β = (0.9, 0.999), ε = 1e-8, λ = 0.01; moments in f32.
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            state_dtype: StateDtype::F32,
        }
    }
}

/// The optimizer of the class centers. Each keeps state tensors of the shard's size, named as
/// in PyTorch's optimizer state and in checkpoints ([`Optimizer::state_names`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// SGD with momentum (the paper's optimizer): one state, `momentum`.
    Sgd(Sgd),
    /// AdamW: two states, `exp_avg` and `exp_avg_sq`.
    AdamW(AdamW),
}

impl Optimizer {
    /// Names of the state tensors, in storage order.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            Optimizer::Sgd(_) => &["momentum"],
            Optimizer::AdamW(_) => &["exp_avg", "exp_avg_sq"],
        }
    }

    /// Storage dtype of the state tensors.
    pub fn state_dtype(&self) -> StateDtype {
        match self {
            Optimizer::Sgd(o) => o.state_dtype,
            Optimizer::AdamW(o) => o.state_dtype,
        }
    }

    /// Sets the storage dtype of the state tensors.
    ///
    /// ```
    /// use partial_fc::{LayerConfig, StateDtype};
    /// let mut cfg = LayerConfig::new(1_000, 64, 32);
    /// cfg.optimizer.as_mut().unwrap().set_state_dtype(StateDtype::Bf16);
    /// assert_eq!(cfg.optimizer.unwrap().state_dtype(), StateDtype::Bf16);
    /// ```
    pub fn set_state_dtype(&mut self, dtype: StateDtype) {
        match self {
            Optimizer::Sgd(o) => o.state_dtype = dtype,
            Optimizer::AdamW(o) => o.state_dtype = dtype,
        }
    }

    /// The planner's name for this optimizer's state.
    pub fn plan_kind(&self) -> crate::plan::Optimizer {
        match self {
            Optimizer::Sgd(_) => crate::plan::Optimizer::SgdMomentum,
            Optimizer::AdamW(_) => crate::plan::Optimizer::AdamW,
        }
    }
}

impl From<Sgd> for Optimizer {
    fn from(sgd: Sgd) -> Self {
        Optimizer::Sgd(sgd)
    }
}

impl From<AdamW> for Optimizer {
    fn from(adamw: AdamW) -> Self {
        Optimizer::AdamW(adamw)
    }
}

/// Storage dtype of the optimizer state (the SGD momentum, the AdamW moments), one value per
/// weight of the shard and state.
///
/// The momentum is as large as the shard itself, so with f32 it doubles the bytes of the
/// classifier; stored as bfloat16 it adds half instead (1M classes × d 512: 2 GiB → 1 GiB per
/// GPU). The arithmetic stays f32: each update reads the stored momentum, computes
/// `v = μ·v + g + λ·w` and `w −= lr·v` in f32, and only the stored `v` is rounded (to nearest
/// even), a relative error of at most 2⁻⁸ per step that the decay μ < 1 keeps from accumulating.
/// AdamW's moments are the exception: they are rounded stochastically (see [`AdamW`]).
/// bfloat16 rather than f16 because gradients of class centers are small (1e-6 and below are
/// common) and f16 would flush them to zero; bfloat16 has f32's range.
///
/// ```
/// use partial_fc::{LayerConfig, StateDtype};
/// let mut cfg = LayerConfig::new(1_000, 64, 32);
/// cfg.optimizer.as_mut().unwrap().set_state_dtype(StateDtype::Bf16);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateDtype {
    /// 32-bit float (the published algorithm's state; the default).
    #[default]
    F32,
    /// bfloat16 storage, f32 arithmetic.
    Bf16,
}

impl StateDtype {
    /// Bytes per stored value.
    pub fn bytes(self) -> u64 {
        match self {
            StateDtype::F32 => 4,
            StateDtype::Bf16 => 2,
        }
    }

    /// The lowercase name used by the command line and reports.
    pub fn name(self) -> &'static str {
        match self {
            StateDtype::F32 => "f32",
            StateDtype::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for StateDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that fixes the shape of one rank's layer and its allocations.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    /// Total number of classes C over all ranks.
    pub num_classes: u64,
    /// Embedding dimension d.
    pub dim: usize,
    /// Largest batch a rank passes to one step (N); buffers are sized for it.
    pub batch_per_rank: usize,
    /// Fraction r of each shard's classes sampled per step; 1 = the whole shard (model parallel),
    /// 0 = positives only.
    pub sample_rate: f64,
    /// Margin.
    pub margin: Margin,
    /// Negative sampler.
    pub sampler: NegativeSampler,
    /// Optimizer update mode.
    pub update: UpdateMode,
    /// Optimizer of the class centers (SGD with momentum or AdamW); `None` allocates no
    /// optimizer state (inference or forward/backward only).
    pub optimizer: Option<Optimizer>,
    /// Seed of the counter-based sampling generator.
    pub seed: u64,
    /// Dtype of the embeddings on the all-gather's wire: `F32`, or `F16`/`Bf16` to halve the
    /// bytes (each rank then normalizes the rounded embeddings; labels travel in the same buffer).
    pub wire: crate::plan::Dtype,
    /// Dtype of the embedding gradient on the backward's reduce-scatter: `F32`, or `F16`/`Bf16`
    /// to halve its bytes (the point for multi-node jobs, where that reduce-scatter crosses the
    /// network). Every value is valid; 16-bit costs two buffers of N·k·d and N·d 16-bit values
    /// (`collective_staging`) and this accuracy: each rank's contribution (its N·k × d gradient)
    /// is rounded once to the 16-bit type (nearest even: relative error at most 2⁻¹¹ in f16,
    /// 2⁻⁸ in bf16; f16 also has only 2⁻¹⁴..65504 as normal range, and gradients are small, so
    /// bf16 is the safer choice) before the sum. The sum's own rounding depends on the
    /// collective: `ThreadGroup` and `HostStaged` add the rounded values in f32 in rank order and
    /// round the total once (deterministic); NCCL reduces 16-bit types in that type along its
    /// ring (a rounding per hop). Only `grad_embeddings` changes: the loss and the class
    /// centers' gradient and update are those of the f32 path, bit for bit.
    pub grad_wire: crate::plan::Dtype,
    /// Operand precision of the step's GEMMs; the master weights stay f32 (see
    /// [`GemmPrecision`]). The backend must support it: the layer asks it at construction.
    pub precision: GemmPrecision,
}

impl LayerConfig {
    /// A configuration with the paper's defaults: ArcFace (s = 64, m = 0.5), r = 0.1, random
    /// negatives, SGD with momentum 0.9 and weight decay 5e-4 updating the sampled rows only
    /// ([`UpdateMode::Sparse`]). Two differ from insightface's `PartialFC_V2` with
    /// `torch.optim.SGD`: its `sample_rate` defaults to 1.0, and its optimizer moves every row
    /// (decay and momentum on rows not sampled): set `update = UpdateMode::Dense` for that,
    /// which is torch's SGD formula (each product rounded on its own; torch may fuse a
    /// multiply-add, so the two can differ in the last bit).
    pub fn new(num_classes: u64, dim: usize, batch_per_rank: usize) -> LayerConfig {
        LayerConfig {
            num_classes,
            dim,
            batch_per_rank,
            sample_rate: 0.1,
            margin: Margin::arcface(),
            sampler: NegativeSampler::Random,
            update: UpdateMode::Sparse,
            optimizer: Some(Optimizer::Sgd(Sgd::default())),
            seed: 0x5eed,
            wire: crate::plan::Dtype::F32,
            grad_wire: crate::plan::Dtype::F32,
            precision: GemmPrecision::F32,
        }
    }

    /// Checks every field.
    pub fn validate(&self, world_size: usize) -> Result<()> {
        if world_size == 0 {
            return Err(PfcError::param("world_size", 0, "must be >= 1"));
        }
        if self.num_classes < world_size as u64 {
            return Err(PfcError::param(
                "num_classes",
                self.num_classes,
                format!("must be >= world size {world_size} so that no shard is empty"),
            ));
        }
        if self.num_classes > (i32::MAX as u64).saturating_mul(world_size as u64) {
            return Err(PfcError::param(
                "num_classes",
                self.num_classes,
                "a shard may hold at most 2^31 - 1 classes",
            ));
        }
        if self.dim == 0 {
            return Err(PfcError::param("dim", 0, "must be >= 1"));
        }
        if self.batch_per_rank == 0 {
            return Err(PfcError::param("batch_per_rank", 0, "must be >= 1"));
        }
        // Ranks tell each other their row counts in an f32 all-reduce, exact up to 2^24.
        if self.batch_per_rank > 1 << 24 {
            return Err(PfcError::param(
                "batch_per_rank",
                self.batch_per_rank,
                "must be <= 2^24 (16,777,216)",
            ));
        }
        // Every buffer's element count must fit in memory arithmetic (and in the address
        // space): the largest are shard × d, (N·k) × d and the worst-case logits (N·k) × shard.
        let shard = self.num_classes.div_ceil(world_size as u64);
        let rows = (self.batch_per_rank as u64).checked_mul(world_size as u64);
        let largest = [
            shard.checked_mul(self.dim as u64),
            rows.and_then(|m| m.checked_mul(self.dim as u64)),
            rows.and_then(|m| m.checked_mul(shard)),
        ];
        let limit = isize::MAX as u64 / 8;
        if largest.iter().any(|n| n.is_none_or(|n| n > limit)) {
            return Err(PfcError::param(
                "num_classes",
                self.num_classes,
                format!(
                    "with {} classes over {world_size} ranks and {} rows per rank, a buffer \
                     would not fit in memory arithmetic",
                    self.num_classes, self.batch_per_rank
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(PfcError::param(
                "sample_rate",
                self.sample_rate,
                "must lie in [0, 1]",
            ));
        }
        if let NegativeSampler::Hard { fraction } = self.sampler {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(PfcError::param(
                    "hard_fraction",
                    fraction,
                    "must lie in [0, 1]",
                ));
            }
        }
        let unit = |name: &'static str, value: f32| {
            if value.is_finite() && (0.0..1.0).contains(&value) {
                Ok(())
            } else {
                Err(PfcError::param(name, value, "must lie in [0, 1)"))
            }
        };
        let decay = |value: f32| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(PfcError::param("weight_decay", value, "must be >= 0"))
            }
        };
        match self.optimizer {
            None => {}
            Some(Optimizer::Sgd(sgd)) => {
                unit("momentum", sgd.momentum)?;
                decay(sgd.weight_decay)?;
            }
            Some(Optimizer::AdamW(adamw)) => {
                unit("beta1", adamw.beta1)?;
                unit("beta2", adamw.beta2)?;
                decay(adamw.weight_decay)?;
                if !(adamw.eps.is_finite() && adamw.eps > 0.0) {
                    return Err(PfcError::param("eps", adamw.eps, "must be finite and > 0"));
                }
            }
        }
        self.margin.validate()
    }
}
