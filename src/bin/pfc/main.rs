//! `pfc`: the command-line face of partial-fc.
//!
//! - `pfc plan`: what fits on a cluster (the memory planner).
//! - `pfc step`: one forward/backward pass from a safetensors file (parity with other
//!   implementations).
//! - `pfc reshard`: a run's checkpoint files for another world size.
//! - `pfc predict`: the k nearest classes of a saved classifier for a file of embeddings.
//!
//! Every error is one line on stderr and exit status 2 (bad usage or input, a refused file);
//! `pfc plan --check` exits 1 when the configuration does not fit.

mod out_file;
mod plan;
mod predict;
mod reshard;
mod step;
mod text;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "pfc",
    version,
    about = "Partial FC: sharded, sampled margin softmax for millions of classes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-GPU memory of a Partial FC configuration, the largest class count that fits, and the
    /// upper bound on classes over cluster sizes at its sample rate (r = 1: model parallelism).
    Plan(plan::PlanArgs),
    /// One forward/backward pass from a safetensors file of inputs, outputs to another.
    Step(step::StepArgs),
    /// Rewrites a run's checkpoint files for another world size (1 merges them into one file).
    Reshard(reshard::ReshardArgs),
    /// The k nearest classes of a saved classifier for a file of embeddings (on the CPU or one
    /// GPU, the centers streamed from the files), and their top-j accuracy when the file has
    /// labels.
    Predict(predict::PredictArgs),
}

fn main() -> ExitCode {
    // A closed pipe (`pfc plan ... | head -1`) ends the process as it ends other Unix tools,
    // instead of a panic in println!.
    #[cfg(unix)]
    // SAFETY: at the start of main, before any thread: resets one signal's disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan::run(args),
        Command::Step(args) => step::run(args).map(|()| ExitCode::SUCCESS),
        Command::Reshard(args) => reshard::run(args).map(|()| ExitCode::SUCCESS),
        Command::Predict(args) => predict::run(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("pfc: {msg}");
            ExitCode::from(2)
        }
    }
}
