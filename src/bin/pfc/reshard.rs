//! `pfc reshard`: a run's checkpoint files rewritten for another world size (1 merges them).

use crate::text::{plural, progress};
use indicatif::{ProgressBar, ProgressStyle};
use partial_fc::checkpoint::{reshard_grown, shard_file_name, CheckpointSet};
use std::path::{Path, PathBuf};

/// Arguments of `pfc reshard`.
#[derive(clap::Args)]
pub struct ReshardArgs {
    /// Every rank's checkpoint file of the run (as `PartialFc::save` wrote them), in any order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// World size to write the files for; 1 merges the classifier into one file.
    #[arg(long, allow_negative_numbers = true)]
    world_size: usize,
    /// Grow the classifier to this many classes (e.g. 120000 or 1.2M): the run's classes keep
    /// their weights and optimizer state; the new ones, with ids from the run's class count on,
    /// start as a fresh layer's (drawn from the run's seed; zero optimizer state). Default:
    /// the run's classes.
    #[arg(long, value_name = "C")]
    num_classes: Option<Box<str>>,
    /// The run's seed (`LayerConfig::seed`), which the new classes' weights are drawn from, for
    /// files that do not record it (hand-written or imported from PyTorch). Files that record
    /// a seed keep theirs (another value is refused).
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// Folder for the new files (created if missing; its parent must exist), named
    /// rank{r}-of-{k}.safetensors. A file of one of those names already there is refused
    /// unless --force is given; other files there are left alone.
    #[arg(long)]
    out: PathBuf,
    /// Let the new files replace files of the same names in the --out folder (never an input).
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs `pfc reshard`.
pub fn run(args: ReshardArgs) -> Result<(), String> {
    let set = CheckpointSet::open(&args.files).map_err(|e| e.to_string())?;
    // What is wrong with the input is said first (reshard checks it again).
    set.require_complete().map_err(|e| e.to_string())?;
    let num_classes = match &args.num_classes {
        Some(text) => partial_fc::plan::units::parse_count("--num-classes", text)
            .map_err(|e| e.to_string())?,
        None => set.num_classes(),
    };
    if !args.force {
        refuse_existing_outputs(&args.out, args.world_size)?;
    }
    println!(
        "{} of a run of {}: {}, d = {}, {}, {}",
        plural(args.files.len() as u64, "file", "files"),
        plural(set.world_size() as u64, "rank", "ranks"),
        plural(set.num_classes(), "class", "classes"),
        set.dim(),
        progress(set.step(), set.optimizer_steps()),
        match set.state_names() {
            [] => "weights only",
            ["momentum"] => "weights and momentum",
            _ => "weights and AdamW moments",
        }
    );
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(set.total_values_grown(num_classes).saturating_mul(4))
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[{bar:30}] {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let written = reshard_grown(
        &args.files,
        args.world_size,
        Some(num_classes),
        args.seed,
        &args.out,
        &|values| bar.inc(values * 4),
    );
    bar.finish_and_clear();
    let written = written.map_err(|e| e.to_string())?;
    if num_classes > set.num_classes() {
        println!(
            "grew the classifier to {}: {} new, from class {} on (a fresh layer's weights, no \
             optimizer state)",
            plural(num_classes, "class", "classes"),
            num_classes - set.num_classes(),
            set.num_classes()
        );
    }
    println!(
        "wrote {} for {} to {}",
        plural(written.len() as u64, "file", "files"),
        plural(args.world_size as u64, "rank", "ranks"),
        args.out.display()
    );
    note_stale_temporaries(&args.out);
    Ok(())
}

/// Says so when `out` holds temporary files of an earlier write that was killed (a reshard or a
/// save interrupted by Ctrl-C leaves `.NAME.safetensors.tmp<pid>.<n>`, a killed `save_set` its
/// backups `.NAME.safetensors.prev<pid>.<n>`, a shard's size each):
/// nothing reads them, and only the user can tell that no other job is writing them now.
fn note_stale_temporaries(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    let ours = format!(".tmp{}.", std::process::id());
    let (mut count, mut bytes, mut example) = (0u64, 0u64, None);
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let leftover = name.contains(".safetensors.tmp") || name.contains(".safetensors.prev");
        if name.starts_with('.') && leftover && !name.contains(&ours) {
            count += 1;
            bytes += entry.metadata().map_or(0, |m| m.len());
            example.get_or_insert(name);
        }
    }
    if let Some(example) = example {
        eprintln!(
            "note: {} also holds {} of an interrupted write ({example}{}; {:.1} MB): nothing \
             reads them; remove them once no other job is writing there",
            out.display(),
            plural(count, "temporary file", "temporary files"),
            if count > 1 { ", …" } else { "" },
            bytes as f64 / 1e6
        );
    }
}

/// The library's `reshard` renames its files over whatever has their names (once every one is
/// written): refuse, before anything is read, the files of `out` that would be replaced. (A
/// missing folder is made, one that is a file is refused by `reshard`.)
fn refuse_existing_outputs(out: &Path, world_size: usize) -> Result<(), String> {
    if !out.is_dir() {
        return Ok(());
    }
    let entries = std::fs::read_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let suffix = format!("-of-{world_size}.safetensors");
    let mut taken = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", out.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let rank = name
            .strip_prefix("rank")
            .and_then(|n| n.strip_suffix(&suffix))
            .and_then(|r| r.parse::<usize>().ok());
        if let Some(rank) = rank.filter(|&r| r < world_size) {
            if shard_file_name(world_size, rank) == name {
                taken.push((rank, name.to_string()));
            }
        }
    }
    taken.sort();
    let Some((_, first)) = taken.first() else {
        return Ok(());
    };
    let (which, them) = match taken.len() {
        1 => (first.clone(), "it"),
        n => (
            format!(
                "{first} (and {} more of the {world_size} files to write)",
                n - 1
            ),
            "them",
        ),
    };
    Err(format!(
        "--out {} already holds {which}: give --force to replace {them}, or another folder",
        out.display()
    ))
}
