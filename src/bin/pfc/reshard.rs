//! `pfc reshard`: a run's checkpoint files rewritten for another world size (1 merges them).

use indicatif::{ProgressBar, ProgressStyle};
use partial_fc::checkpoint::{reshard, CheckpointSet};
use std::path::PathBuf;

/// Arguments of `pfc reshard`.
#[derive(clap::Args)]
pub struct ReshardArgs {
    /// Every rank's checkpoint file of the run (as `PartialFc::save` wrote them), in any order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// World size to write the files for; 1 merges the classifier into one file.
    #[arg(long)]
    world_size: usize,
    /// Folder for the new files (created if missing; its parent must exist), named
    /// rank{r}-of-{k}.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs `pfc reshard`.
pub fn run(args: ReshardArgs) -> Result<(), String> {
    let set = CheckpointSet::open(&args.files).map_err(|e| e.to_string())?;
    println!(
        "{} files of a run of {} ranks: {} classes, d = {}, step {}, {}",
        args.files.len(),
        set.world_size(),
        set.num_classes(),
        set.dim(),
        set.step(),
        match set.state_names() {
            [] => "weights only",
            ["momentum"] => "weights and momentum",
            _ => "weights and AdamW moments",
        }
    );
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(set.total_values() * 4)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[{bar:30}] {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let written = reshard(&args.files, args.world_size, &args.out, &|values| {
        bar.inc(values * 4)
    });
    bar.finish_and_clear();
    let written = written.map_err(|e| e.to_string())?;
    println!(
        "wrote {} files for {} ranks to {}",
        written.len(),
        args.world_size,
        args.out.display()
    );
    Ok(())
}
