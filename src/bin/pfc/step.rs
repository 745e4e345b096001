//! `pfc step`: one forward/backward pass from a step file (see `partial_fc::golden`).

use partial_fc::golden::{write_result, StepCase};
use partial_fc::{GradMode, PfcError};
use std::path::PathBuf;

/// Arguments of `pfc step`.
#[derive(clap::Args)]
pub struct StepArgs {
    /// Step file with `embeddings`, `labels`, `weight` (and optionally `sampled_index`).
    #[arg(long)]
    input: PathBuf,
    /// Where to write `loss`, `grad_embeddings`, `grad_weight` and `sampled_index`.
    #[arg(long)]
    output: PathBuf,
    /// Number of ranks (threads on the CPU); the batch and the classes are split over them.
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Backend that runs the step.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
    /// Overrides the file's scale s.
    #[arg(long)]
    scale: Option<f64>,
    /// Overrides the file's m1.
    #[arg(long)]
    m1: Option<f64>,
    /// Overrides the file's m2.
    #[arg(long)]
    m2: Option<f64>,
    /// Overrides the file's m3.
    #[arg(long)]
    m3: Option<f64>,
    /// Overrides the file's sample rate.
    #[arg(long)]
    sample_rate: Option<f64>,
    /// Overrides the file's inter-class filtering threshold (<= 0 disables it).
    #[arg(long)]
    interclass_filter: Option<f64>,
    /// Overrides the file's gradient mode.
    #[arg(long, value_enum)]
    grad_mode: Option<GradModeArg>,
    /// Seed of the sampler (when the file gives no sample).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GradModeArg {
    StraightThrough,
    Exact,
}

/// Runs `pfc step`.
pub fn run(args: StepArgs) -> Result<(), String> {
    let fail = |e: PfcError| e.to_string();
    let mut case = StepCase::read(&args.input).map_err(fail)?;
    let m = &mut case.margin;
    m.scale = args.scale.unwrap_or(m.scale);
    m.m1 = args.m1.unwrap_or(m.m1);
    m.m2 = args.m2.unwrap_or(m.m2);
    m.m3 = args.m3.unwrap_or(m.m3);
    if let Some(t) = args.interclass_filter {
        m.interclass_filter = (t > 0.0).then_some(t);
    }
    if let Some(g) = args.grad_mode {
        m.grad_mode = match g {
            GradModeArg::StraightThrough => GradMode::StraightThrough,
            GradModeArg::Exact => GradMode::Exact,
        };
    }
    case.sample_rate = args.sample_rate.unwrap_or(case.sample_rate);
    case.seed = args.seed.unwrap_or(case.seed);
    let result = match args.backend {
        BackendArg::Cpu => case.run_threads(args.world_size).map_err(fail)?,
        BackendArg::Cuda => run_cuda(&case, args.world_size)?,
    };
    write_result(&args.output, &case, &result, args.world_size).map_err(fail)?;
    println!(
        "loss {:.6}  sampled {} classes  ranks {}  -> {}",
        result.loss,
        result.sampled_index.len(),
        args.world_size,
        args.output.display()
    );
    Ok(())
}

/// On CUDA device 0; more than one rank runs as virtual ranks on that device.
#[cfg(feature = "cuda")]
fn run_cuda(case: &StepCase, world_size: usize) -> Result<partial_fc::golden::StepResult, String> {
    case.run_virtual_ranks(world_size, || partial_fc::cuda::CudaBackend::new(0))
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &StepCase, _: usize) -> Result<partial_fc::golden::StepResult, String> {
    Err("--backend cuda: this pfc was built without the `cuda` feature (cargo build --features cuda)".into())
}
