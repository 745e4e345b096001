//! `pfc step`: one forward/backward pass from a step file (see `partial_fc::golden`).

use crate::out_file::{refuse_unsafe_output, Existing};
use partial_fc::golden::{write_result, StepCase};
use partial_fc::{GradMode, PfcError};
use std::path::PathBuf;

/// Arguments of `pfc step`.
#[derive(clap::Args)]
pub struct StepArgs {
    /// Step file (safetensors): F32 `embeddings` `[B, d]`, I64 `labels` `[B]`, F32 `weight`
    /// `[C, d]`, optionally I64 `sampled_index` `[S]` (sorted class ids used instead of drawing
    /// a sample);
    /// metadata (all optional): scale (64), m1 (1), m2 (0.5), m3 (0), sample_rate (1),
    /// interclass_filter, grad_mode (straight-through | exact), seed, classes.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `loss`, `grad_embeddings`, `grad_weight` and `sampled_index` (atomically,
    /// over an existing file; never over the input or a partial-fc checkpoint shard).
    #[arg(long)]
    output: PathBuf,
    /// Number of ranks (threads on the CPU); the batch and the classes are split over them.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    world_size: usize,
    /// Backend that runs the step.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
    /// Overrides the file's scale s.
    #[arg(long, allow_negative_numbers = true)]
    scale: Option<f64>,
    /// Overrides the file's m1.
    #[arg(long, allow_negative_numbers = true)]
    m1: Option<f64>,
    /// Overrides the file's m2.
    #[arg(long, allow_negative_numbers = true)]
    m2: Option<f64>,
    /// Overrides the file's m3.
    #[arg(long, allow_negative_numbers = true)]
    m3: Option<f64>,
    /// Overrides the file's sample rate; a new sample is drawn (the file's `sampled_index`, if
    /// any, is not used).
    #[arg(long, allow_negative_numbers = true)]
    sample_rate: Option<f64>,
    /// Overrides the file's inter-class filtering threshold (<= 0 disables it).
    #[arg(long, allow_negative_numbers = true)]
    interclass_filter: Option<f64>,
    /// Overrides the file's gradient mode.
    #[arg(long, value_enum)]
    grad_mode: Option<GradModeArg>,
    /// Seed of the sampler; a new sample is drawn (the file's `sampled_index`, if any, is not
    /// used).
    #[arg(long, allow_negative_numbers = true)]
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
    refuse_overwriting_the_input(&args)?;
    let mut case = StepCase::read(&args.input).map_err(fail)?;
    let m = &mut case.margin;
    m.scale = args.scale.unwrap_or(m.scale);
    m.m1 = args.m1.unwrap_or(m.m1);
    m.m2 = args.m2.unwrap_or(m.m2);
    m.m3 = args.m3.unwrap_or(m.m3);
    if let Some(t) = args.interclass_filter {
        if t.is_nan() {
            return Err("--interclass-filter NaN: give a threshold, or 0 to disable it".into());
        }
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
    if (args.sample_rate.is_some() || args.seed.is_some()) && case.sampled_index.take().is_some() {
        println!(
            "note: --sample-rate/--seed given: drawing a new sample instead of the file's \
             sampled_index"
        );
    }
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
    Err("--backend cuda: this pfc was built without the `cuda` feature (cargo build --features cuda, or cargo install --path . --features cuda)".into())
}

/// The output is written atomically over whatever is there: refuse the input itself, and a
/// checkpoint shard (a user's `--output` typo must not cost a run's file).
fn refuse_overwriting_the_input(args: &StepArgs) -> Result<(), String> {
    refuse_unsafe_output("--output", &args.output, &[&args.input], Existing::Replace)
}
