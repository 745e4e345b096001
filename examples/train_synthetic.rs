//! Trains an embedding model on synthetic identities with a Partial FC head sharded over thread
//! ranks, and reports held-out face-verification metrics before and after.
//!
//! ```text
//! cargo run --release --example train_synthetic
//! cargo run --release --example train_synthetic -- --compare-rates 1.0,0.1 --plot loss.svg
//! ```
//!
//! See docs/training.md for the design and a measured run.

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use partial_fc::plan::Dtype;
use partial_fc::synthetic::data::GeneratorConfig;
use partial_fc::synthetic::metrics::EvalMetrics;
use partial_fc::synthetic::plot::plot_losses;
use partial_fc::synthetic::{train, RowMarginMode, TrainConfig, TrainReport};
use partial_fc::{
    AdamW, Margin, MarginKind, NegativeSampler, PfcError, Sgd, StateDtype, UpdateMode,
};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WireArg {
    F32,
    F16,
    Bf16,
}

impl WireArg {
    fn dtype(self) -> Dtype {
        match self {
            WireArg::F32 => Dtype::F32,
            WireArg::F16 => Dtype::F16,
            WireArg::Bf16 => Dtype::Bf16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FcOptimizerArg {
    Sgd,
    Adamw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum UpdateArg {
    Sparse,
    Dense,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MomentumArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    /// The CPU backend (rayon + gemm).
    Cpu,
    /// The CUDA backend (needs the `cuda` feature and a device).
    Cuda,
    /// The CUDA backend on the CPU emulator of the CUDA driver (crates/cuda-emulator): the
    /// kernels' results without a GPU, for checking, at a fraction of the CPU backend's speed.
    CudaEmulator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MarginArg {
    /// Additive angular margin: s·cos(θ + m).
    Arcface,
    /// Additive cosine margin: s·(cos θ − m).
    Cosface,
    /// ElasticFace-Arc: ArcFace with each row's m drawn from N(m, std²) every step.
    ElasticArc,
    /// ElasticFace-Cos: CosFace with each row's m drawn from N(m, std²) every step.
    ElasticCos,
    /// AdaFace: s·(cos(θ − m·ĝ) − m − m·ĝ), ĝ from each embedding's norm against the running
    /// statistics of the batches' norms.
    Adaface,
    /// MagFace: ArcFace whose m grows with the embedding's norm (0.45 to 0.8 over norms of
    /// --magface-norms), plus a regularizer that pulls the norm up; the norm learns quality.
    Magface,
}

/// Train an embedding model on synthetic identities with Partial FC (sharded over thread ranks)
/// and report held-out verification (TAR@FAR) and identification (top-1) before and after.
#[derive(Parser, Debug)]
#[command(name = "train_synthetic")]
struct Args {
    /// Training identities (= classes of the sharded classifier).
    #[arg(long, default_value_t = TrainConfig::default().identities)]
    identities: u64,
    /// Samples (views) per training identity.
    #[arg(long, default_value_t = TrainConfig::default().samples_per_identity)]
    samples_per_identity: u32,
    /// Held-out identities for evaluation.
    #[arg(long, default_value_t = TrainConfig::default().eval_identities)]
    eval_identities: u64,
    /// Samples per held-out identity.
    #[arg(long, default_value_t = TrainConfig::default().eval_samples_per_identity)]
    eval_samples_per_identity: u32,
    /// Input ("image") dimension.
    #[arg(long, default_value_t = GeneratorConfig::default().input_dim)]
    input_dim: usize,
    /// Dimension of the identity latent.
    #[arg(long, default_value_t = GeneratorConfig::default().identity_dim)]
    identity_dim: usize,
    /// Dimension of the nuisance (pose/lighting) subspace shared by all identities.
    #[arg(long, default_value_t = GeneratorConfig::default().nuisance_dim)]
    nuisance_dim: usize,
    /// Strength of the nuisance relative to the identity.
    #[arg(long, default_value_t = GeneratorConfig::default().nuisance_scale)]
    nuisance_scale: f32,
    /// Within-identity variation relative to the identity latent.
    #[arg(long, default_value_t = GeneratorConfig::default().within_noise)]
    within_noise: f32,
    /// Per-coordinate noise added after the nonlinear warp.
    #[arg(long, default_value_t = GeneratorConfig::default().pixel_noise)]
    pixel_noise: f32,
    /// Gain of the tanh warp of the views (larger = more nonlinear).
    #[arg(long, default_value_t = GeneratorConfig::default().warp_gain)]
    warp_gain: f32,
    /// Hidden width of the MLP backbone.
    #[arg(long, default_value_t = TrainConfig::default().hidden_dim)]
    hidden_dim: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = TrainConfig::default().embedding_dim)]
    embedding_dim: usize,
    /// Ranks (threads) the classifier is sharded over.
    #[arg(long, default_value_t = TrainConfig::default().ranks)]
    ranks: usize,
    /// Samples per rank per micro-batch (a step is --accumulate micro-batches).
    #[arg(long, default_value_t = TrainConfig::default().batch_per_rank)]
    batch_per_rank: usize,
    /// Micro-batches per optimizer step (gradient accumulation): both models sum their gradients
    /// of loss / ACCUMULATE over them and update once, as one batch of all their samples would.
    /// Needs --fc-update dense.
    #[arg(long, default_value_t = TrainConfig::default().accumulate)]
    accumulate: usize,
    /// The classifier's update: the sampled rows (sparse, the paper's) or every row (dense,
    /// PartialFC_V2's with torch's SGD).
    #[arg(long, value_enum, default_value_t = UpdateArg::Sparse)]
    fc_update: UpdateArg,
    /// Partial FC sample rate r (fraction of class centers per step).
    #[arg(long, default_value_t = TrainConfig::default().sample_rate)]
    sample_rate: f64,
    /// Train once per rate with the same seed and print a table, e.g. 1.0,0.1 (overrides
    /// --sample-rate).
    #[arg(long, value_delimiter = ',')]
    compare_rates: Vec<f64>,
    /// Optimizer steps.
    #[arg(long, default_value_t = TrainConfig::default().steps, conflicts_with = "epochs")]
    steps: usize,
    /// Passes over the training set (sets the number of steps instead of --steps).
    #[arg(long)]
    epochs: Option<f64>,
    /// Peak learning rate of the backbone (plain SGD).
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    lr: f32,
    /// Peak learning rate of the classifier (with --fc-optimizer adamw, 0.005 to 0.01 work here).
    #[arg(long, default_value_t = TrainConfig::default().fc_lr)]
    fc_lr: f32,
    /// Optimizer of the classifier: SGD with momentum 0.9, or AdamW (betas 0.9, 0.999).
    #[arg(long, value_enum, default_value_t = FcOptimizerArg::Sgd)]
    fc_optimizer: FcOptimizerArg,
    /// Weight decay of the classifier (default: 5e-4 for SGD, 0.01 for AdamW's decoupled decay).
    #[arg(long)]
    fc_weight_decay: Option<f32>,
    /// Sample the hardest negatives instead of random ones: this fraction of each shard's
    /// negative slots goes to the classes nearest to the batch (scoring the whole shard every
    /// step), the rest is drawn at random.
    #[arg(long, value_name = "FRACTION")]
    hard_negatives: Option<f64>,
    /// Warm-up steps (then linear decay to 0).
    #[arg(long, default_value_t = TrainConfig::default().warmup_steps)]
    warmup_steps: usize,
    /// Margin type.
    #[arg(long, value_enum, default_value_t = MarginArg::Arcface)]
    margin: MarginArg,
    /// Margin value (ArcFace m2, default 0.5; CosFace m3, default 0.4; the mean of
    /// ElasticFace's, default 0.5 for Arc and 0.35 for Cos; AdaFace's m, default 0.4).
    #[arg(long)]
    margin_value: Option<f64>,
    /// Standard deviation of ElasticFace's margins.
    #[arg(long, default_value_t = 0.05)]
    margin_std: f64,
    /// MagFace's norm range l_a,u_a [default: 10,110, the paper's, which suit a ResNet's
    /// features; the synthetic MLP's embeddings are shorter].
    #[arg(long, value_delimiter = ',')]
    magface_norms: Option<Vec<f64>>,
    /// MagFace's λ_g [default: 35, the paper's; a narrower range needs more: at least
    /// `MagFace::min_lambda(s)`, or the norms fall below l_a].
    #[arg(long)]
    magface_lambda: Option<f64>,
    /// Logit scale s.
    #[arg(long, default_value_t = 64.0)]
    scale: f64,
    /// Seed of data, initialization and sampling.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Write the loss curves to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Save the trained run into this folder (created if missing): every rank's checkpoint
    /// `rank{r}.safetensors` and `probes.safetensors` (embeddings and labels of 2,000 unseen
    /// views), ready for `pfc predict` and `pfc reshard`. One rate only (not with
    /// --compare-rates).
    #[arg(long, conflicts_with = "compare_rates")]
    save: Option<PathBuf>,
    /// Storage dtype of the classifier's momentum (bf16 halves it; arithmetic stays f32).
    #[arg(long, value_enum, default_value_t = MomentumArg::F32)]
    momentum_dtype: MomentumArg,
    /// Dtype of the embeddings on the all-gather's wire.
    #[arg(long, value_enum, default_value_t = WireArg::F32)]
    wire_dtype: WireArg,
    /// Dtype of the embedding gradient's reduce-scatter.
    #[arg(long, value_enum, default_value_t = WireArg::F32)]
    grad_wire_dtype: WireArg,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
    /// No progress bar (for logs).
    #[arg(long)]
    quiet: bool,
}

impl Args {
    fn config(&self) -> Result<TrainConfig, PfcError> {
        let margin = match self.margin {
            MarginArg::Arcface => {
                Margin::combined(self.scale, 1.0, self.margin_value.unwrap_or(0.5), 0.0)
            }
            MarginArg::Cosface => {
                Margin::combined(self.scale, 1.0, 0.0, self.margin_value.unwrap_or(0.4))
            }
            MarginArg::ElasticArc => {
                Margin::combined(self.scale, 1.0, self.margin_value.unwrap_or(0.5), 0.0)
            }
            MarginArg::ElasticCos => {
                Margin::combined(self.scale, 1.0, 0.0, self.margin_value.unwrap_or(0.35))
            }
            MarginArg::Adaface => Margin::combined(self.scale, 1.0, 0.0, 0.0),
            // The row's margin replaces m2; the paper differentiates through the margin (its code
            // uses ArcFace's easy margin, which the crate lacks: the monotonic fallback instead).
            MarginArg::Magface => Margin {
                grad_mode: partial_fc::GradMode::Exact,
                fallback: partial_fc::TargetFallback::Monotonic,
                ..Margin::combined(self.scale, 1.0, 0.45, 0.0)
            },
        };
        let row_margins = match self.margin {
            m if m != MarginArg::Magface
                && (self.magface_norms.is_some() || self.magface_lambda.is_some()) =>
            {
                return Err(PfcError::param(
                    "--magface-norms, --magface-lambda",
                    format!(
                        "--margin {}",
                        m.to_possible_value()
                            .map_or(String::new(), |v| v.get_name().to_string())
                    ),
                    "apply to --margin magface only",
                ))
            }
            MarginArg::Arcface | MarginArg::Cosface => RowMarginMode::None,
            MarginArg::ElasticArc => RowMarginMode::Elastic {
                kind: MarginKind::Angular,
                std: self.margin_std,
            },
            MarginArg::ElasticCos => RowMarginMode::Elastic {
                kind: MarginKind::Additive,
                std: self.margin_std,
            },
            MarginArg::Adaface => RowMarginMode::AdaFace {
                m: self.margin_value.unwrap_or(0.4),
            },
            MarginArg::Magface => {
                let norms = self.magface_norms.clone().unwrap_or(vec![10.0, 110.0]);
                let [lower_norm, upper_norm] = norms[..] else {
                    return Err(PfcError::param(
                        "--magface-norms",
                        format!("{norms:?}"),
                        "give two norms, L,U",
                    ));
                };
                RowMarginMode::MagFace(partial_fc::MagFace {
                    lower_norm,
                    upper_norm,
                    lambda: self.magface_lambda.unwrap_or(35.0),
                    ..partial_fc::MagFace::default()
                })
            }
        };
        let mut cfg = TrainConfig {
            row_margins,
            identities: self.identities,
            samples_per_identity: self.samples_per_identity,
            eval_identities: self.eval_identities,
            eval_samples_per_identity: self.eval_samples_per_identity,
            generator: GeneratorConfig {
                input_dim: self.input_dim,
                identity_dim: self.identity_dim,
                nuisance_dim: self.nuisance_dim,
                within_noise: self.within_noise,
                nuisance_scale: self.nuisance_scale,
                pixel_noise: self.pixel_noise,
                warp_gain: self.warp_gain,
            },
            hidden_dim: self.hidden_dim,
            embedding_dim: self.embedding_dim,
            ranks: self.ranks,
            batch_per_rank: self.batch_per_rank,
            accumulate: self.accumulate,
            fc_update: match self.fc_update {
                UpdateArg::Sparse => UpdateMode::Sparse,
                UpdateArg::Dense => UpdateMode::Dense,
            },
            sample_rate: self.sample_rate,
            steps: self.steps,
            lr: self.lr,
            fc_lr: self.fc_lr,
            fc_optimizer: match self.fc_optimizer {
                FcOptimizerArg::Sgd => {
                    let d = Sgd::default();
                    Sgd {
                        weight_decay: self.fc_weight_decay.unwrap_or(d.weight_decay),
                        ..d
                    }
                    .into()
                }
                FcOptimizerArg::Adamw => {
                    let d = AdamW::default();
                    AdamW {
                        weight_decay: self.fc_weight_decay.unwrap_or(d.weight_decay),
                        ..d
                    }
                    .into()
                }
            },
            warmup_steps: self.warmup_steps,
            margin,
            fc_sampler: match self.hard_negatives {
                Some(fraction) => NegativeSampler::Hard { fraction },
                None => NegativeSampler::Random,
            },
            seed: self.seed,
            momentum_dtype: match self.momentum_dtype {
                MomentumArg::F32 => StateDtype::F32,
                MomentumArg::Bf16 => StateDtype::Bf16,
            },
            wire: self.wire_dtype.dtype(),
            grad_wire: self.grad_wire_dtype.dtype(),
            save_to: self.save.clone(),
        };
        if let Some(epochs) = self.epochs {
            cfg.steps = cfg.steps_for_epochs(epochs)?;
        }
        Ok(cfg)
    }
}

fn check_backend(backend: BackendArg) -> Result<(), PfcError> {
    match backend {
        BackendArg::Cpu => Ok(()),
        BackendArg::Cuda | BackendArg::CudaEmulator if !cfg!(feature = "cuda") => Err(PfcError::BackendUnavailable(
            "this build has no CUDA backend; rebuild with `--features cuda` or use --backend cpu"
                .into(),
        )),
        BackendArg::Cuda | BackendArg::CudaEmulator => Ok(()),
    }
}

fn pct(x: f64) -> String {
    format!("{:6.2}%", 100.0 * x)
}

fn metrics_row(name: &str, m: &EvalMetrics) -> String {
    format!(
        "{name:<18} {:>10} {:>10} {:>10}",
        pct(m.tar_far_1e3),
        pct(m.tar_far_1e4),
        pct(m.top1)
    )
}

fn run_one(cfg: &TrainConfig, backend: BackendArg, quiet: bool) -> Result<TrainReport, PfcError> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cfg.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("r={prefix} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}", cfg.sample_rate));
    bar.set_message("evaluating untrained model");
    let mut on_step = |ev: &partial_fc::synthetic::StepEvent| {
        let speed = ev.samples as f64 / ev.elapsed.as_secs_f64().max(1e-9);
        bar.set_position(ev.step as u64);
        bar.set_message(format!("loss {:7.3}  {speed:7.0} samples/s", ev.loss));
        if ev.step == ev.total {
            bar.set_message("evaluating trained model");
        }
    };
    let report = match backend {
        BackendArg::Cpu => train(cfg, &mut on_step),
        BackendArg::Cuda => train_cuda(cfg, &mut on_step),
        BackendArg::CudaEmulator => {
            install_emulator()?;
            train_cuda(cfg, &mut on_step)
        }
    };
    bar.finish_and_clear();
    report
}

/// The classifier's ranks as virtual ranks on CUDA device 0 (the backbone stays on the CPU).
#[cfg(feature = "cuda")]
fn train_cuda(
    cfg: &TrainConfig,
    on_step: &mut dyn FnMut(&partial_fc::synthetic::StepEvent),
) -> Result<TrainReport, PfcError> {
    partial_fc::synthetic::train_on(cfg, || partial_fc::cuda::CudaBackend::new(0), on_step)
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(
    _: &TrainConfig,
    _: &mut dyn FnMut(&partial_fc::synthetic::StepEvent),
) -> Result<TrainReport, PfcError> {
    Err(PfcError::BackendUnavailable(
        "this build has no CUDA backend; rebuild with `--features cuda`".into(),
    ))
}

/// Loads the CPU emulator of the CUDA driver for `--backend cuda-emulator`.
#[cfg(all(unix, feature = "cuda"))]
fn install_emulator() -> Result<(), PfcError> {
    pfc_cuda_emulator::install().map_err(PfcError::BackendUnavailable)
}

#[cfg(not(all(unix, feature = "cuda")))]
fn install_emulator() -> Result<(), PfcError> {
    Err(PfcError::BackendUnavailable(
        "the CUDA emulator needs x86-64 Linux and the `cuda` feature".into(),
    ))
}

fn summary(cfg: &TrainConfig, r: &TrainReport) {
    let (first, last) = r.loss_drop(20);
    let per_step = cfg.global_batch() * cfg.accumulate;
    let micro = if cfg.accumulate > 1 {
        format!(
            " in {} micro-batches of {}",
            cfg.accumulate,
            cfg.global_batch()
        )
    } else {
        String::new()
    };
    println!(
        "r = {}: {} steps × {per_step} samples{micro} ({:.2} epochs), {} classes sampled per {} \
         of {}",
        r.sample_rate,
        r.losses.len(),
        (r.losses.len() * per_step) as f64
            / (cfg.identities * u64::from(cfg.samples_per_identity)) as f64,
        r.sampled_classes,
        if cfg.accumulate > 1 {
            "micro-batch"
        } else {
            "step"
        },
        cfg.identities
    );
    println!(
        "  loss {first:.3} → {last:.3} (mean of first/last 20 steps); {:.1} ms/step \
         (backbone {:.1}, Partial FC {:.1}); training {:.1} s",
        r.step_time().as_secs_f64() * 1e3,
        r.backbone_time.as_secs_f64() * 1e3 / r.losses.len() as f64,
        r.layer_time.as_secs_f64() * 1e3 / r.losses.len() as f64,
        r.train_time.as_secs_f64()
    );
    println!(
        "  held-out: {} identities, {} genuine / {} impostor pairs",
        cfg.eval_identities, r.after.genuine_pairs, r.after.impostor_pairs
    );
    println!(
        "  {:<18} {:>10} {:>10} {:>10}",
        "", "TAR@1e-3", "TAR@1e-4", "top-1"
    );
    println!("  {}", metrics_row("raw input", &r.raw_input));
    println!("  {}", metrics_row("untrained", &r.before));
    println!("  {}", metrics_row("trained", &r.after));
    println!(
        "  classifier (predict_top_k) on an unseen view of {} training identities: top-1 {}, top-5 {}",
        cfg.identities.min(2_000),
        pct(r.classifier_top1).trim(),
        pct(r.classifier_top5).trim()
    );
    let (mean, lo, hi) = r.embedding_norms;
    println!("  held-out embedding norms: mean {mean:.2}, from {lo:.2} to {hi:.2}");
}

fn run(args: Args) -> Result<(), PfcError> {
    check_backend(args.backend)?;
    let base = args.config()?;
    base.validate()?;
    let rates = if args.compare_rates.is_empty() {
        vec![base.sample_rate]
    } else {
        args.compare_rates.clone()
    };
    for &r in &rates {
        TrainConfig {
            sample_rate: r,
            ..base.clone()
        }
        .validate()?;
    }
    if let Some(path) = &args.plot {
        // Fail now, not after minutes of training (and write nothing until the end).
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        if !dir.is_dir() {
            return Err(PfcError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the folder of the plot does not exist",
                ),
            });
        }
    }
    println!(
        "{} training identities × {} samples, {} held out; MLP {} → {} → {}; Partial FC over {} \
         ranks, {:?} s={} m=({}, {}, {}); batch {} × {}; {} steps",
        base.identities,
        base.samples_per_identity,
        base.eval_identities,
        base.generator.input_dim,
        base.hidden_dim,
        base.embedding_dim,
        base.ranks,
        args.margin,
        base.margin.scale,
        base.margin.m1,
        base.margin.m2,
        base.margin.m3,
        base.ranks,
        base.batch_per_rank,
        base.steps
    );
    let start = Instant::now();
    let mut reports = Vec::new();
    for &r in &rates {
        let cfg = TrainConfig {
            sample_rate: r,
            ..base.clone()
        };
        let report = run_one(&cfg, args.backend, args.quiet)?;
        summary(&cfg, &report);
        reports.push(report);
    }
    if reports.len() > 1 {
        println!();
        println!(
            "| r | final loss | TAR@FAR=1e-3 | TAR@FAR=1e-4 | top-1 | classifier top-1 / top-5 | ms/step | Partial FC ms/step |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        println!(
            "| untrained | – | {} | {} | {} | – | – | – |",
            pct(reports[0].before.tar_far_1e3).trim(),
            pct(reports[0].before.tar_far_1e4).trim(),
            pct(reports[0].before.top1).trim()
        );
        for r in &reports {
            println!(
                "| {} | {:.3} | {} | {} | {} | {} / {} | {:.1} | {:.1} |",
                r.sample_rate,
                r.loss_drop(20).1,
                pct(r.after.tar_far_1e3).trim(),
                pct(r.after.tar_far_1e4).trim(),
                pct(r.after.top1).trim(),
                pct(r.classifier_top1).trim(),
                pct(r.classifier_top5).trim(),
                r.step_time().as_secs_f64() * 1e3,
                r.layer_time.as_secs_f64() * 1e3 / r.losses.len() as f64
            );
        }
    }
    if let Some(path) = &args.plot {
        let curves: Vec<(String, Vec<f32>)> = reports
            .iter()
            .map(|r| (format!("r = {}", r.sample_rate), r.losses.clone()))
            .collect();
        plot_losses(path, "Partial FC on synthetic identities", &curves, 10)?;
        println!("loss curves: {}", path.display());
    }
    if let Some(dir) = &args.save {
        println!(
            "saved: {0}/rank0..{1}.safetensors and {0}/probes.safetensors (try: pfc predict \
             --embeddings {0}/probes.safetensors {0}/rank*.safetensors)",
            dir.display(),
            base.ranks - 1
        );
    }
    println!("total wall time {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train_synthetic: {e}");
            ExitCode::FAILURE
        }
    }
}
