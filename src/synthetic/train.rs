//! The training driver: a shared MLP backbone, a Partial FC head sharded over k thread ranks.
//!
//! # Data-parallel structure
//!
//! Real Partial FC training runs one backbone replica per GPU, each on its own slice of the
//! global batch, and averages the backbone gradients (DDP). Here the k ranks are threads of one
//! process, so the backbone replicas are collapsed into one, which computes exactly the same thing:
//!
//! 1. the main thread draws the global batch (`k · batch_per_rank` samples) and runs the backbone
//!    forward on all of it;
//! 2. rows `r·n .. (r+1)·n` go to rank r; the k ranks run [`PartialFc::forward_backward`] and
//!    [`PartialFc::step`] on their own threads, talking through the [`ThreadGroup`] collective
//!    (all-gather of embeddings, all-reduce of the softmax normalizers, reduce-scatter of the
//!    embedding gradient);
//! 3. each rank's `grad_embeddings` is the gradient of the *global* mean loss w.r.t. its own rows,
//!    so concatenating them in rank order gives the full gradient w.r.t. the global batch's
//!    embeddings: no factor k (that factor, [`PartialFc::data_parallel_grad_factor`], only
//!    compensates DDP's averaging, which a single shared backbone does not do);
//! 4. the main thread backpropagates once through the backbone and takes a plain SGD step.

use super::backbone::{Mlp, MlpGrads};
use super::data::{all_views, permutation, GeneratorConfig, SampleId, SyntheticIdentities};
use super::metrics::{evaluate, EvalMetrics};
use crate::backend::{Backend, Collective};
use crate::collective::{HostStaged, ThreadGroup};
use crate::config::{LayerConfig, Margin, NegativeSampler, Optimizer, Sgd, StateDtype, UpdateMode};
use crate::cpu::CpuBackend;
use crate::error::{PfcError, Result};
use crate::layer::{PartialFc, PassOptions, StepOutput};
use crate::mag_face::MagFace;
use crate::plan::Dtype;
use crate::row_margins::{elastic_margins, AdaFace, AdaFaceMargins, MarginKind};
use crate::tensor_file::{write_atomic, OutTensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Per-row margins of a training run ([`TrainConfig::row_margins`], [`PassOptions`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RowMarginMode {
    /// The layer's margin on every row.
    #[default]
    None,
    /// ElasticFace: each row's margin drawn from N(m, std²) every step ([`elastic_margins`]):
    /// the angular one around the layer's m2 (ElasticFace-Arc) or the cosine one around its m3
    /// (ElasticFace-Cos).
    Elastic {
        /// Which margin is drawn.
        kind: MarginKind,
        /// Standard deviation of the margins (0.05 in the paper).
        std: f64,
    },
    /// AdaFace with margin `m` (0.4 in the paper), each rank keeping its own norm statistics
    /// ([`AdaFace`]); the layer's margin should then be `Margin::combined(s, 1, 0, 0)`.
    AdaFace {
        /// The margin m.
        m: f64,
    },
    /// MagFace: each row's angular margin from its embedding's norm, and the norm's gradient
    /// (through the margin and MagFace's regularizer) added to the backbone's ([`MagFace`]).
    MagFace(MagFace),
}

/// Most steps a run may ask for (the loss history is kept in memory).
pub const MAX_STEPS: usize = 100_000_000;
/// Largest batch per rank, hidden width or embedding dimension accepted.
pub const MAX_WIDTH: usize = 1 << 16;

/// Everything a training run depends on; the same config and seed give the same run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Training identities (= classes of the Partial FC layer).
    pub identities: u64,
    /// Views of each training identity (the dataset has `identities × samples_per_identity`).
    pub samples_per_identity: u32,
    /// Held-out identities for evaluation (never seen in training).
    pub eval_identities: u64,
    /// Views of each held-out identity.
    pub eval_samples_per_identity: u32,
    /// The synthetic task.
    pub generator: GeneratorConfig,
    /// Hidden width of the MLP.
    pub hidden_dim: usize,
    /// Embedding dimension.
    pub embedding_dim: usize,
    /// Ranks the classifier is sharded over (threads).
    pub ranks: usize,
    /// Samples per rank per micro-batch (a micro-batch is `ranks × batch_per_rank` samples; a
    /// step is [`TrainConfig::accumulate`] of them).
    pub batch_per_rank: usize,
    /// Micro-batches per optimizer step (gradient accumulation, 1 for none): both models sum
    /// their gradients of `loss / accumulate` over them ([`PartialFc::set_grad_scale`]) and
    /// update once, as one batch of all their samples would. More than 1 needs
    /// [`TrainConfig::fc_update`] = `UpdateMode::Dense`.
    pub accumulate: usize,
    /// The classifier's update: sparse (the sampled rows, the paper's, the default) or dense
    /// (every row, PartialFC_V2's with torch's SGD).
    pub fc_update: UpdateMode,
    /// Partial FC sample rate r.
    pub sample_rate: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate of the backbone (plain SGD).
    pub lr: f32,
    /// Peak learning rate of the classifier.
    pub fc_lr: f32,
    /// Optimizer of the classifier: SGD (momentum 0.9, weight decay 5e-4, the default) or
    /// AdamW (here 0.005–0.01 works, against SGD's 0.2; docs/training.md). Its state dtype is
    /// [`TrainConfig::momentum_dtype`].
    pub fc_optimizer: Optimizer,
    /// Steps of linear warm-up; afterwards both rates decay linearly to 0.
    pub warmup_steps: usize,
    /// Margin of the softmax.
    pub margin: Margin,
    /// Margins per row on top of [`TrainConfig::margin`] (ElasticFace, AdaFace), or none.
    pub row_margins: RowMarginMode,
    /// Negative sampler of the classifier: random (the paper's, the default) or the hardest
    /// negatives, which score the whole shard every step (docs/training.md has both).
    pub fc_sampler: NegativeSampler,
    /// Seed of the data, the backbone initialization and the class sampler.
    pub seed: u64,
    /// Storage dtype of the classifier's optimizer state (SGD momentum or AdamW moments).
    pub momentum_dtype: StateDtype,
    /// Dtype of the embeddings on the all-gather's wire (`LayerConfig::wire`).
    pub wire: Dtype,
    /// Dtype of the embedding gradient's reduce-scatter (`LayerConfig::grad_wire`).
    pub grad_wire: Dtype,
    /// A folder to save the trained run in (created if missing): every rank's checkpoint,
    /// `rank{r}.safetensors` ([`PartialFc::save`]), and the probes of the classifier's accuracy,
    /// `probes.safetensors` (F32 `embeddings` `[rows, embedding_dim]`, I64 `labels` `[rows]`),
    /// the inputs `pfc predict` and `pfc reshard` take.
    pub save_to: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            identities: 20_000,
            samples_per_identity: 8,
            eval_identities: 1_000,
            eval_samples_per_identity: 5,
            generator: GeneratorConfig::default(),
            hidden_dim: 512,
            embedding_dim: 128,
            ranks: 4,
            batch_per_rank: 128,
            accumulate: 1,
            fc_update: UpdateMode::Sparse,
            sample_rate: 0.1,
            steps: 1200,
            lr: 0.1,
            fc_lr: 0.2,
            fc_optimizer: Optimizer::Sgd(Sgd::default()),
            warmup_steps: 20,
            margin: Margin::arcface(),
            row_margins: RowMarginMode::None,
            fc_sampler: NegativeSampler::Random,
            seed: 42,
            momentum_dtype: StateDtype::F32,
            wire: Dtype::F32,
            grad_wire: Dtype::F32,
            save_to: None,
        }
    }
}

impl TrainConfig {
    /// Steps that make `epochs` passes over the training set; an error unless `epochs` is
    /// finite and > 0.
    pub fn steps_for_epochs(&self, epochs: f64) -> Result<usize> {
        if !(epochs.is_finite() && epochs > 0.0) {
            return Err(PfcError::param("epochs", epochs, "must be finite and > 0"));
        }
        let per_epoch = self.identities as f64 * f64::from(self.samples_per_identity);
        let per_step = self.global_batch().max(1) as f64 * self.accumulate.max(1) as f64;
        let steps = (epochs * per_epoch / per_step).ceil();
        if steps > MAX_STEPS as f64 {
            return Err(PfcError::param(
                "epochs",
                epochs,
                format!("{steps} steps exceed {MAX_STEPS}"),
            ));
        }
        Ok(steps as usize)
    }

    /// Samples of one micro-batch over all ranks (a step takes [`TrainConfig::accumulate`]).
    pub fn global_batch(&self) -> usize {
        self.ranks * self.batch_per_rank
    }

    /// The learning-rate multiplier at `step`: linear warm-up, then linear decay to 0.
    pub fn lr_factor(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            (step + 1) as f32 / self.warmup_steps as f32
        } else {
            let rest = self.steps.saturating_sub(self.warmup_steps).max(1);
            1.0 - (step - self.warmup_steps) as f32 / rest as f32
        }
    }

    /// Checks every field (the layer and generator check their own).
    pub fn validate(&self) -> Result<()> {
        if self.ranks == 0 || self.ranks > 256 {
            return Err(PfcError::param("ranks", self.ranks, "must lie in [1, 256]"));
        }
        if self.identities < self.ranks as u64 || self.identities > i32::MAX as u64 {
            return Err(PfcError::param(
                "identities",
                self.identities,
                format!("must lie in [ranks = {}, 2^31 - 1]", self.ranks),
            ));
        }
        if self.samples_per_identity == 0 {
            return Err(PfcError::param("samples_per_identity", 0, "must be >= 1"));
        }
        let dataset = self.identities * u64::from(self.samples_per_identity);
        if dataset > u64::from(u32::MAX) {
            return Err(PfcError::param(
                "samples_per_identity",
                self.samples_per_identity,
                format!("identities × samples = {dataset} exceeds 2^32 - 1"),
            ));
        }
        if self.eval_identities < 2 || self.eval_samples_per_identity < 2 {
            return Err(PfcError::param(
                "eval",
                format!(
                    "{} identities × {} samples",
                    self.eval_identities, self.eval_samples_per_identity
                ),
                "evaluation needs >= 2 held-out identities with >= 2 samples each",
            ));
        }
        let eval_rows = self.eval_identities * u64::from(self.eval_samples_per_identity);
        if eval_rows > 20_000 {
            return Err(PfcError::param(
                "eval",
                eval_rows,
                "at most 20000 evaluation samples (all pairs are scored)",
            ));
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(PfcError::param(
                "steps",
                self.steps,
                format!("must lie in [1, {MAX_STEPS}]"),
            ));
        }
        for (name, v) in [
            ("batch_per_rank", self.batch_per_rank),
            ("hidden_dim", self.hidden_dim),
            ("embedding_dim", self.embedding_dim),
        ] {
            if v == 0 || v > MAX_WIDTH {
                return Err(PfcError::param(
                    name,
                    v,
                    format!("must lie in [1, {MAX_WIDTH}]"),
                ));
            }
        }
        if self.accumulate == 0 || self.accumulate > 1024 {
            return Err(PfcError::param(
                "accumulate",
                self.accumulate,
                "must lie in [1, 1024]",
            ));
        }
        if self.accumulate > 1 && self.fc_update != UpdateMode::Dense {
            return Err(PfcError::param(
                "accumulate",
                self.accumulate,
                "gradient accumulation needs the dense update (--fc-update dense): each \
                 micro-batch samples other classes",
            ));
        }
        for (name, lr) in [("lr", self.lr), ("fc_lr", self.fc_lr)] {
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(PfcError::param(name, lr, "must be finite and >= 0"));
            }
        }
        if let Some(dir) = &self.save_to {
            // Refused now, not after the training.
            if dir.exists() && !dir.is_dir() {
                return Err(PfcError::param(
                    "save_to",
                    dir.display(),
                    "is a file; give a folder (created if missing)",
                ));
            }
        }
        match self.row_margins {
            RowMarginMode::None => {}
            RowMarginMode::Elastic { kind, std } => {
                if !(std.is_finite() && (0.0..=0.5).contains(&std)) {
                    return Err(PfcError::param(
                        "row_margins std",
                        std,
                        "must lie in [0, 0.5]",
                    ));
                }
                // The mean is checked now, not at the first step.
                elastic_margins(kind, self.elastic_mean(kind), std, 0, 0, 0, 0)?;
            }
            RowMarginMode::AdaFace { m } => {
                if !(0.0..0.5).contains(&m) {
                    return Err(PfcError::param("row_margins m", m, "must lie in [0, 0.5)"));
                }
            }
            // Its settings are checked now, not at the first step (no rows: nothing else).
            RowMarginMode::MagFace(magface) => {
                magface.margins(&[], 1)?;
            }
        }
        self.generator.validate()?;
        self.layer_config().validate(self.ranks)
    }

    /// ElasticFace's mean: the layer's margin of that kind.
    fn elastic_mean(&self, kind: MarginKind) -> f64 {
        match kind {
            MarginKind::Angular => self.margin.m2,
            MarginKind::Additive => self.margin.m3,
        }
    }

    fn layer_config(&self) -> LayerConfig {
        let mut cfg = LayerConfig::new(self.identities, self.embedding_dim, self.batch_per_rank);
        cfg.sample_rate = self.sample_rate;
        cfg.margin = self.margin;
        cfg.sampler = self.fc_sampler;
        cfg.seed = self.seed;
        cfg.update = self.fc_update;
        cfg.optimizer = Some(self.fc_optimizer);
        if let Some(o) = cfg.optimizer.as_mut() {
            o.set_state_dtype(self.momentum_dtype);
        }
        cfg.wire = self.wire;
        cfg.grad_wire = self.grad_wire;
        cfg
    }
}

/// Progress of one step, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEvent {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps in the run.
    pub total: usize,
    /// This step's loss.
    pub loss: f32,
    /// Samples trained on so far.
    pub samples: usize,
    /// Time since training began (evaluation excluded).
    pub elapsed: Duration,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The sample rate it ran with.
    pub sample_rate: f64,
    /// Loss of every step.
    pub losses: Vec<f32>,
    /// Held-out metrics of cosine similarity on the raw inputs (how hard the task is).
    pub raw_input: EvalMetrics,
    /// Held-out metrics of the untrained backbone.
    pub before: EvalMetrics,
    /// Held-out metrics after training.
    pub after: EvalMetrics,
    /// The trained classifier's closed-set identification ([`PartialFc::predict_top_k`]) of an
    /// unseen view of up to 2,000 training identities: top-1 and top-5 accuracy.
    pub classifier_top1: f64,
    /// See `classifier_top1`.
    pub classifier_top5: f64,
    /// The trained backbone's held-out embeddings' norms: mean, smallest, largest (what the
    /// norm-aware margins, AdaFace's and MagFace's, read; the loss sees only the directions).
    pub embedding_norms: (f64, f64, f64),
    /// Classes sampled per step, summed over ranks (last step).
    pub sampled_classes: usize,
    /// Wall time of the training steps.
    pub train_time: Duration,
    /// Of which: data generation and backbone forward/backward.
    pub backbone_time: Duration,
    /// Of which: the k ranks' Partial FC forward/backward and optimizer step.
    pub layer_time: Duration,
}

impl TrainReport {
    /// Mean wall time of one training step.
    pub fn step_time(&self) -> Duration {
        self.train_time / self.losses.len().max(1) as u32
    }

    /// Mean loss of the first and the last `window` steps.
    pub fn loss_drop(&self, window: usize) -> (f32, f32) {
        let w = window.clamp(1, self.losses.len().max(1));
        let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len().max(1) as f32;
        (
            mean(&self.losses[..w.min(self.losses.len())]),
            mean(&self.losses[self.losses.len().saturating_sub(w)..]),
        )
    }
}

/// Mean, smallest and largest L2 norm of the rows of `x` (`dim` columns).
fn norm_range(x: &[f32], dim: usize) -> (f64, f64, f64) {
    let norms: Vec<f64> = x
        .chunks(dim.max(1))
        .map(|r| {
            r.iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mean = norms.iter().sum::<f64>() / norms.len().max(1) as f64;
    let lo = norms.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = norms.iter().copied().fold(0.0, f64::max);
    (mean, lo, hi)
}

fn embed_and_evaluate(mlp: &Mlp, x: &[f32], labels: &[u64]) -> Result<EvalMetrics> {
    let fwd = mlp.forward(x, labels.len())?;
    evaluate(&fwd.output, labels, mlp.output_dim())
}

/// Trains the backbone and the sharded classifier, evaluating on held-out identities before and
/// after; `on_step` is called after every step.
///
/// ```
/// use partial_fc::synthetic::train::{train, TrainConfig};
/// let cfg = TrainConfig {
///     identities: 64,
///     samples_per_identity: 2,
///     eval_identities: 8,
///     eval_samples_per_identity: 2,
///     hidden_dim: 16,
///     embedding_dim: 8,
///     ranks: 2,
///     batch_per_rank: 8,
///     steps: 3,
///     warmup_steps: 1,
///     ..TrainConfig::default()
/// };
/// let report = train(&cfg, &mut |_| {}).unwrap();
/// assert_eq!(report.losses.len(), 3);
/// ```
pub fn train(cfg: &TrainConfig, on_step: &mut dyn FnMut(&StepEvent)) -> Result<TrainReport> {
    cfg.validate()?;
    let layers = ThreadGroup::handles(cfg.ranks)
        .into_iter()
        .map(|comm| PartialFc::new(cfg.layer_config(), CpuBackend, comm))
        .collect::<Result<Vec<_>>>()?;
    train_layers(cfg, layers, on_step)
}

/// The same training with the classifier on any backend: `cfg.ranks` virtual ranks, each a
/// thread with its own backend from `make` (for example `CudaBackend::new(0)`: every shard on one
/// GPU), exchanging through a host-staged [`ThreadGroup`].
pub fn train_on<B: Backend>(
    cfg: &TrainConfig,
    make: impl Fn() -> Result<B>,
    on_step: &mut dyn FnMut(&StepEvent),
) -> Result<TrainReport> {
    cfg.validate()?;
    let layers = ThreadGroup::handles(cfg.ranks)
        .into_iter()
        .map(|comm| PartialFc::new(cfg.layer_config(), make()?, HostStaged::new(comm)))
        .collect::<Result<Vec<_>>>()?;
    train_layers(cfg, layers, on_step)
}

fn train_layers<B: Backend, C: Collective<B>>(
    cfg: &TrainConfig,
    mut layers: Vec<PartialFc<B, C>>,
    on_step: &mut dyn FnMut(&StepEvent),
) -> Result<TrainReport> {
    // Each micro-batch's gradients are those of loss / accumulate, so that their sum is the
    // mean's; the backbone gets them through the embedding gradients.
    let micro = cfg.accumulate.max(1);
    if micro > 1 {
        for layer in &mut layers {
            layer.set_grad_scale(1.0 / micro as f32)?;
        }
    }
    let gen = SyntheticIdentities::new(cfg.generator.clone(), cfg.seed)?;
    let mut mlp = Mlp::new(
        cfg.generator.input_dim,
        cfg.hidden_dim,
        cfg.embedding_dim,
        cfg.seed,
    )?;

    // Held-out identities come after the training ones: ids never used as labels.
    let eval_ids = all_views(
        cfg.identities,
        cfg.eval_identities,
        cfg.eval_samples_per_identity,
    )?;
    let eval_x = gen.generate(&eval_ids)?;
    let eval_labels: Vec<u64> = eval_ids.iter().map(|s| s.identity).collect();
    let raw_input = evaluate(&eval_x, &eval_labels, cfg.generator.input_dim)?;
    let before = embed_and_evaluate(&mlp, &eval_x, &eval_labels)?;

    let (n, e) = (cfg.batch_per_rank, cfg.embedding_dim);
    let batch = cfg.global_batch();
    let dataset = cfg.identities as usize * cfg.samples_per_identity as usize;
    let spi = cfg.samples_per_identity as usize;
    let (mut epoch, mut cursor) = (0u64, 0usize);
    let mut order = permutation(dataset, cfg.seed, epoch);

    let mut losses = Vec::with_capacity(cfg.steps);
    let mut adaface = match cfg.row_margins {
        RowMarginMode::AdaFace { m } => vec![
            AdaFace {
                m,
                ..AdaFace::new()
            };
            cfg.ranks
        ],
        _ => Vec::new(),
    };
    let (mut backbone_time, mut layer_time) = (Duration::ZERO, Duration::ZERO);
    let mut sampled_classes = 0;
    let start = Instant::now();
    for step in 0..cfg.steps {
        let mut grads: Option<MlpGrads> = None;
        let mut loss_sum = 0.0f32;
        for m in 0..micro {
            let t0 = Instant::now();
            let mut ids = Vec::with_capacity(batch);
            while ids.len() < batch {
                if cursor == dataset {
                    epoch += 1;
                    cursor = 0;
                    order = permutation(dataset, cfg.seed, epoch);
                }
                let i = order[cursor] as usize;
                cursor += 1;
                ids.push(SampleId {
                    identity: (i / spi) as u64,
                    view: (i % spi) as u32,
                });
            }
            let labels: Vec<i64> = ids.iter().map(|s| s.identity as i64).collect();
            let x = gen.generate(&ids)?;
            let fwd = mlp.forward(&x, batch)?;
            let t1 = Instant::now();

            // Each rank's rows' margins, when the run has per-row margins.
            let (margins, adaface_next) =
                rank_margins(cfg, &adaface, &fwd.output, step * micro + m)?;
            // The first micro-batch starts the classifier's sum, the others add to it.
            let mut outputs =
                rank_passes(&mut layers, &fwd.output, &labels, n, e, m > 0, &margins)?;
            for (a, next) in adaface.iter_mut().zip(&adaface_next) {
                a.update(next);
            }
            // MagFace's margin depends on the norm: its gradient, and the regularizer's, join
            // the layer's before the backbone's backward; its loss term joins the reported loss.
            if let RowMarginMode::MagFace(magface) = cfg.row_margins {
                for (r, out) in outputs.iter_mut().enumerate() {
                    let x = &fwd.output[r * n * e..(r + 1) * n * e];
                    let share = magface.backward(x, e, &out.rows, &mut out.grad_embeddings)?;
                    loss_sum += share as f32;
                }
            }
            let t2 = Instant::now();

            let grad: Vec<f32> = outputs
                .iter()
                .flat_map(|o| o.grad_embeddings.iter().copied())
                .collect();
            let g = mlp.backward(&x, &fwd, &grad)?;
            match grads.as_mut() {
                None => grads = Some(g),
                Some(sum) => sum.add(&g),
            }
            let t3 = Instant::now();
            backbone_time += (t1 - t0) + (t3 - t2);
            layer_time += t2 - t1;
            sampled_classes = outputs.iter().map(|o| o.sampled).sum();
            loss_sum += outputs[0].loss;
        }
        // One update from the sums (of loss / accumulate: the mean's).
        let factor = cfg.lr_factor(step);
        let t3 = Instant::now();
        rank_updates(&mut layers, cfg.fc_lr * factor)?;
        let t4 = Instant::now();
        if let Some(g) = &grads {
            mlp.apply_sgd(g, cfg.lr * factor)?;
        }
        backbone_time += t4.elapsed();
        layer_time += t4 - t3;
        let loss = loss_sum / micro as f32;
        if !loss.is_finite() {
            return Err(PfcError::param(
                "lr",
                cfg.lr,
                format!(
                    "the loss diverged ({loss}) at step {}; lower the rates",
                    step + 1
                ),
            ));
        }
        losses.push(loss);
        on_step(&StepEvent {
            step: step + 1,
            total: cfg.steps,
            loss,
            samples: (step + 1) * batch * micro,
            elapsed: start.elapsed(),
        });
    }
    let train_time = start.elapsed();
    let after = embed_and_evaluate(&mlp, &eval_x, &eval_labels)?;
    let embedding_norms = norm_range(
        &mlp.forward(&eval_x, eval_labels.len())?.output,
        cfg.embedding_dim,
    );
    let (classifier_top1, classifier_top5, probes) =
        classifier_accuracy(cfg, &gen, &mlp, &mut layers)?;
    if let Some(dir) = &cfg.save_to {
        save_run(dir, &layers, &probes, cfg.embedding_dim)?;
    }
    Ok(TrainReport {
        sample_rate: cfg.sample_rate,
        losses,
        raw_input,
        before,
        after,
        classifier_top1,
        classifier_top5,
        embedding_norms,
        sampled_classes,
        train_time,
        backbone_time,
        layer_time,
    })
}

/// The probe rows of [`classifier_accuracy`]: embeddings and their true classes.
struct Probes {
    embeddings: Vec<f32>,
    labels: Vec<i64>,
}

/// Writes every rank's checkpoint and the probes into `dir` (see [`TrainConfig::save_to`]).
fn save_run<B: Backend, C: Collective<B>>(
    dir: &Path,
    layers: &[PartialFc<B, C>],
    probes: &Probes,
    dim: usize,
) -> Result<()> {
    let io = |source| PfcError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    for (r, layer) in layers.iter().enumerate() {
        layer.save(&dir.join(format!("rank{r}.safetensors")))?;
    }
    let rows = probes.labels.len();
    let tensors = [
        OutTensor::F32("embeddings", vec![rows, dim], &probes.embeddings),
        OutTensor::I64("labels", vec![rows], &probes.labels),
    ];
    write_atomic(&dir.join("probes.safetensors"), &tensors, HashMap::new())
}

/// Top-1 and top-5 accuracy of the sharded classifier on a view no training step saw (view
/// `samples_per_identity`) of up to 2,000 training identities, spread over all of them; and
/// those probes.
fn classifier_accuracy<B: Backend, C: Collective<B>>(
    cfg: &TrainConfig,
    gen: &SyntheticIdentities,
    mlp: &Mlp,
    layers: &mut [PartialFc<B, C>],
) -> Result<(f64, f64, Probes)> {
    let probes = cfg.identities.min(2_000);
    let stride = cfg.identities / probes;
    let ids: Vec<SampleId> = (0..probes)
        .map(|i| SampleId {
            identity: i * stride,
            view: cfg.samples_per_identity,
        })
        .collect();
    let x = gen.generate(&ids)?;
    let embeddings = mlp.forward(&x, ids.len())?.output;
    let (n, e, k) = (cfg.batch_per_rank, cfg.embedding_dim, 5usize);
    let mut classes = Vec::with_capacity(ids.len() * k);
    for (batch, rows) in ids.chunks(cfg.global_batch()).enumerate() {
        let first = batch * cfg.global_batch();
        let x = &embeddings[first * e..(first + rows.len()) * e];
        classes.extend(rank_predict(layers, x, n, e, k)?);
    }
    let prediction = crate::Prediction {
        k,
        scores: vec![0.0; classes.len()], // not needed for the accuracy
        classes,
    };
    let labels: Vec<i64> = ids.iter().map(|id| id.identity as i64).collect();
    let accuracy = prediction.top_accuracy(&labels)?;
    let probes = Probes { embeddings, labels };
    Ok((accuracy[0], accuracy[k - 1], probes))
}

/// Every rank's `predict_top_k` on its own thread, rank r taking rows r·n .. (r+1)·n of
/// `embeddings` (fewer, or none, at the end); the classes of every row, in row order.
fn rank_predict<B: Backend, C: Collective<B>>(
    layers: &mut [PartialFc<B, C>],
    embeddings: &[f32],
    n: usize,
    e: usize,
    k: usize,
) -> Result<Vec<i64>> {
    let rows = embeddings.len() / e;
    let classes = on_every_rank(layers, |r, layer| {
        let (a, b) = ((r * n).min(rows), ((r + 1) * n).min(rows));
        Ok(layer.predict_top_k(&embeddings[a * e..b * e], k)?.classes)
    })?;
    Ok(classes.concat())
}

/// Each rank's per-row margins for micro-batch `draw` (angular, additive), or none.
type RankMargins = Vec<(Option<Vec<f32>>, Option<Vec<f32>>)>;

/// The per-row margins of every rank's rows of this micro-batch ([`TrainConfig::row_margins`]):
/// ElasticFace draws them for (seed, `draw`, global row), AdaFace from each rank's rows' norms.
/// AdaFace's margins also carry the statistics to keep ([`AdaFace::update`]) once the passes ran.
fn rank_margins(
    cfg: &TrainConfig,
    adaface: &[AdaFace],
    embeddings: &[f32],
    draw: usize,
) -> Result<(RankMargins, Vec<AdaFaceMargins>)> {
    let (n, e) = (cfg.batch_per_rank, cfg.embedding_dim);
    let (seed, draw) = (cfg.seed ^ 0x3a5f_0e1a, draw as u64);
    match cfg.row_margins {
        RowMarginMode::None => Ok((Vec::new(), Vec::new())),
        RowMarginMode::Elastic { kind, std } => Ok((
            (0..cfg.ranks)
                .map(|r| {
                    let first = (r * n) as u64;
                    let mean = cfg.elastic_mean(kind);
                    let m = elastic_margins(kind, mean, std, seed, draw, first, n)?;
                    Ok(match kind {
                        MarginKind::Angular => (Some(m), None),
                        MarginKind::Additive => (None, Some(m)),
                    })
                })
                .collect::<Result<_>>()?,
            Vec::new(),
        )),
        RowMarginMode::AdaFace { .. } => {
            let margins = adaface
                .iter()
                .enumerate()
                .map(|(r, a)| a.margins(&embeddings[r * n * e..(r + 1) * n * e], e))
                .collect::<Result<Vec<_>>>()?;
            let per_rank = margins
                .iter()
                .map(|m| (Some(m.angular.clone()), Some(m.additive.clone())))
                .collect();
            Ok((per_rank, margins))
        }
        RowMarginMode::MagFace(magface) => Ok((
            (0..cfg.ranks)
                .map(|r| {
                    let x = &embeddings[r * n * e..(r + 1) * n * e];
                    Ok((Some(magface.margins(x, e)?.angular), None))
                })
                .collect::<Result<_>>()?,
            Vec::new(),
        )),
    }
}

/// Every rank's forward/backward pass on its own thread (accumulating onto the pending gradient
/// when `accumulate`, with the rank's per-row margins when there are); outputs in rank order.
fn rank_passes<B: Backend, C: Collective<B>>(
    layers: &mut [PartialFc<B, C>],
    embeddings: &[f32],
    labels: &[i64],
    n: usize,
    e: usize,
    accumulate: bool,
    margins: &RankMargins,
) -> Result<Vec<StepOutput>> {
    on_every_rank(layers, |r, layer| {
        let x = &embeddings[r * n * e..(r + 1) * n * e];
        let y = &labels[r * n..(r + 1) * n];
        let mut options = PassOptions::new().accumulate(accumulate);
        if let Some((angular, additive)) = margins.get(r) {
            if let Some(m2) = angular {
                options = options.angular_margins(m2);
            }
            if let Some(m3) = additive {
                options = options.additive_margins(m3);
            }
        }
        layer.forward_backward_with(x, y, options)
    })
}

/// Every rank's optimizer step on its own thread.
fn rank_updates<B: Backend, C: Collective<B>>(
    layers: &mut [PartialFc<B, C>],
    fc_lr: f32,
) -> Result<()> {
    on_every_rank(layers, |_, layer| layer.step(fc_lr)).map(|_| ())
}

/// `f(rank, layer)` for every rank, each on its own thread; the results in rank order.
fn on_every_rank<B: Backend, C: Collective<B>, T: Send>(
    layers: &mut [PartialFc<B, C>],
    f: impl Fn(usize, &mut PartialFc<B, C>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let results: Vec<Result<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = layers
            .iter_mut()
            .enumerate()
            .map(|(r, layer)| {
                let f = &f;
                scope.spawn(move || f(r, layer))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_warms_up_and_decays() {
        let cfg = TrainConfig {
            steps: 10,
            warmup_steps: 2,
            ..TrainConfig::default()
        };
        assert_eq!(cfg.lr_factor(0), 0.5);
        assert_eq!(cfg.lr_factor(1), 1.0);
        assert_eq!(cfg.lr_factor(2), 1.0);
        assert!((cfg.lr_factor(9) - 0.125).abs() < 1e-6);
        assert_eq!(cfg.steps_for_epochs(1.0).unwrap(), 20_000 * 8 / 512 + 1);
        assert!(cfg.steps_for_epochs(f64::NAN).is_err());
        assert!(cfg.steps_for_epochs(-1.0).is_err());
        assert!(cfg.steps_for_epochs(1e30).is_err());
    }

    #[test]
    fn bad_configs_are_errors_not_panics() {
        let ok = TrainConfig::default();
        for bad in [
            TrainConfig {
                ranks: 0,
                ..ok.clone()
            },
            TrainConfig {
                identities: 3,
                ..ok.clone()
            },
            TrainConfig {
                sample_rate: 1.5,
                ..ok.clone()
            },
            TrainConfig {
                steps: 0,
                ..ok.clone()
            },
            TrainConfig {
                steps: usize::MAX,
                ..ok.clone()
            },
            TrainConfig {
                batch_per_rank: 1 << 20,
                ..ok.clone()
            },
            TrainConfig {
                identities: u64::from(u32::MAX),
                samples_per_identity: 2,
                ranks: 1,
                ..ok.clone()
            },
            TrainConfig {
                lr: -1.0,
                ..ok.clone()
            },
            TrainConfig {
                eval_samples_per_identity: 1,
                ..ok.clone()
            },
            TrainConfig {
                embedding_dim: 0,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        ok.validate().unwrap();
    }

    /// The concatenated per-rank gradients equal the single-rank gradient of the same global
    /// batch at r = 1 (where the sample is the whole class set, so it is deterministic).
    #[test]
    fn sharded_gradient_equals_single_rank_gradient() {
        let (classes, d, n, k) = (40u64, 6usize, 3usize, 4usize);
        let x: Vec<f32> = (0..n * k * d)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let labels: Vec<i64> = (0..n * k).map(|i| (i * 7 % 40) as i64).collect();
        let mut cfg = LayerConfig::new(classes, d, n);
        cfg.sample_rate = 1.0;
        let mut layers = ThreadGroup::handles(k)
            .into_iter()
            .map(|c| PartialFc::new(cfg.clone(), CpuBackend, c))
            .collect::<Result<Vec<_>>>()
            .unwrap();
        let outs = rank_passes(&mut layers, &x, &labels, n, d, false, &Vec::new()).unwrap();
        let sharded: Vec<f32> = outs
            .iter()
            .flat_map(|o| o.grad_embeddings.clone())
            .collect();

        let mut one_cfg = cfg.clone();
        one_cfg.batch_per_rank = n * k;
        let mut one = PartialFc::new(one_cfg, CpuBackend, crate::collective::SingleRank).unwrap();
        let full = one.forward_backward(&x, &labels).unwrap();
        assert!((full.loss - outs[0].loss).abs() < 1e-5);
        for (a, b) in sharded.iter().zip(&full.grad_embeddings) {
            assert!((a - b).abs() < 1e-6 + 1e-4 * b.abs(), "{a} vs {b}");
        }
    }
}
