//! `pfc predict`: the k nearest classes of a saved classifier for a file of embeddings, scored
//! on the CPU or one GPU with the centers streamed from the files, and their top-j accuracy when
//! the file has labels.

use crate::out_file::{refuse_unsafe_output, Existing};
use crate::text::{plural, progress};
use indicatif::{ProgressBar, ProgressStyle};
use partial_fc::checkpoint::CheckpointSet;
use partial_fc::cpu::top_k::TOP_K_MAX;
use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Arguments of `pfc predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// Every rank's checkpoint file of the run (as `PartialFc::save` or `pfc reshard` wrote
    /// them), in any order.
    #[arg(required = true)]
    checkpoints: Vec<PathBuf>,
    /// Safetensors file of the embeddings: an F32 tensor `[rows, dim]`, and optionally an I64
    /// tensor of true classes: `[rows]` (one per row) or `[rows, width]` (a set per row, padded
    /// with -1: multi-label, as extreme classification's).
    #[arg(long)]
    embeddings: PathBuf,
    /// Name of the embeddings tensor in that file.
    #[arg(long, default_value = "embeddings")]
    tensor: String,
    /// Name of the labels tensor: the top-j accuracies are printed (precision@j, nDCG@j and
    /// recall@j for label sets). Without this option a tensor `labels` is used when the file has
    /// one; with it, the tensor must be there.
    #[arg(long)]
    labels: Option<String>,
    /// Safetensors file of the training set's labels (an I64 tensor `labels`, `[rows]` or
    /// `[rows, width]` padded with -1): their counts give each class's propensity, and the
    /// propensity-scored PSP@j and PSnDCG@j are printed beside the other metrics (extreme
    /// classification's measure of the rare labels).
    #[arg(long, value_name = "FILE")]
    train_labels: Option<PathBuf>,
    /// The propensity model's A,B (Jain et al. 2016): 0.55,1.5 in general; 0.5,0.4 for
    /// Wikipedia-LSHTC; 0.6,2.6 for Amazon.
    #[arg(
        long,
        value_name = "A,B",
        default_value = "0.55,1.5",
        requires = "train_labels"
    )]
    propensity: String,
    /// Classes per row, 1 to 256 (TOP_K_MAX) and at most the classifier's classes.
    #[arg(long, allow_negative_numbers = true, default_value_t = 5)]
    k: usize,
    /// Where to write `classes` (I64 `[rows, k]`, best first; -1 for a row of zeros, which has
    /// no nearest class) and `scores` (F32 cosines; -inf there), atomically. An existing file is refused unless --force is given; an input file, or a
    /// partial-fc checkpoint shard (of any run), is refused even with --force.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Let --out replace an existing file (never an input or a checkpoint shard).
    #[arg(long, requires = "out")]
    force: bool,
    /// Where the centers are scored: the CPU, or CUDA device 0 (a block of centers at a time;
    /// needs a pfc built with `--features cuda`).
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Cpu,
    Cuda,
}

/// Runs `pfc predict`.
pub fn run(args: PredictArgs) -> Result<(), String> {
    let set = CheckpointSet::open(&args.checkpoints).map_err(|e| e.to_string())?;
    // Everything that can be refused without the embeddings is refused before they are read.
    set.require_complete().map_err(|e| e.to_string())?;
    let limit = set.num_classes().min(TOP_K_MAX as u64) as usize;
    if args.k == 0 || args.k > limit {
        return Err(format!(
            "--k {}: must be between 1 and {limit} (the classifier's classes, at most {TOP_K_MAX})",
            args.k
        ));
    }
    if let Some(out) = &args.out {
        refuse_out(out, &args)?;
    }
    let train = match &args.train_labels {
        Some(path) => Some(TrainCounts::read(
            path,
            &args.propensity,
            set.num_classes(),
        )?),
        None => None,
    };
    let scorer = Scorer::new(args.backend).map_err(|e| e.to_string())?;
    let file = TensorFile::read(&args.embeddings).map_err(|e| e.to_string())?;
    let (x, shape) = file
        .require(&args.tensor, file.f32(&args.tensor))
        .map_err(|e| e.to_string())?;
    let dim = set.dim();
    let rows = match shape[..] {
        [rows, d] if d == dim => rows,
        _ => {
            return Err(format!(
                "{}: tensor {} has shape {shape:?}; [rows, {dim}] expected (the classifier's dim)",
                args.embeddings.display(),
                args.tensor
            ))
        }
    };
    let labels_name = args.labels.as_deref().unwrap_or("labels");
    let found = file.i64(labels_name).map_err(|e| e.to_string())?;
    if found.is_none() && args.labels.is_some() {
        return Err(format!(
            "{}: --labels {labels_name}: no I64 tensor of that name",
            args.embeddings.display()
        ));
    }
    // Labels: one class per row, or a set per row (`width` columns padded with -1).
    let labels = match found {
        Some((labels, s)) if s == [rows] => Some((labels, None)),
        Some((labels, s)) if s.len() == 2 && s[0] == rows && s[1] > 0 => Some((labels, Some(s[1]))),
        Some((_, s)) => {
            return Err(format!(
                "{}: tensor {} has shape {s:?}; [{rows}] (one class per row) or [{rows}, width] \
                 (a set per row, padded with -1) expected",
                args.embeddings.display(),
                labels_name
            ))
        }
        None => None,
    };
    if train.is_some() && labels.is_none() {
        return Err(format!(
            "--train-labels: {} has no labels to score (a tensor `labels`, or --labels NAME)",
            args.embeddings.display()
        ));
    }
    println!(
        "{} against {} (d = {dim}, {}, {}), k = {}",
        plural(rows as u64, "row", "rows"),
        plural(set.num_classes(), "class", "classes"),
        progress(set.step(), set.optimizer_steps()),
        plural(args.checkpoints.len() as u64, "file", "files"),
        args.k
    );
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(set.num_classes() * dim as u64 * 4)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[{bar:30}] {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let progress = |values: u64| bar.inc(values * 4);
    let prediction = scorer.predict(&set, &x, args.k, &progress);
    bar.finish_and_clear();
    let prediction = prediction.map_err(|e| e.to_string())?;
    let empty = (0..rows).filter(|&r| prediction.row(r)[0] < 0).count();
    if empty > 0 {
        println!(
            "note: {} of zeros {} no direction: no prediction, counted as {}",
            plural(empty as u64, "row", "rows"),
            if empty == 1 { "has" } else { "have" },
            if empty == 1 { "a miss" } else { "misses" }
        );
    }
    match &labels {
        Some(_) if rows == 0 => println!("no rows: no accuracy to report"),
        Some((labels, Some(width))) => {
            let m = prediction
                .ranking_metrics(labels.chunks(*width))
                .map_err(|e| e.to_string())?;
            let outside = labels
                .iter()
                .filter(|&&c| c >= 0 && c as u64 >= set.num_classes())
                .count();
            if outside > 0 {
                let (are, what) = if outside == 1 {
                    ("is", "a class")
                } else {
                    ("are", "classes")
                };
                println!(
                    "note: {outside} of the labels {are} not {what} of this classifier (0 .. {}): \
                     true classes no prediction can find",
                    set.num_classes()
                );
            }
            if m.rows_with_labels < rows {
                println!(
                    "note: {} of {} without a label (all negative: padding) score 0 and count in \
                     the means",
                    plural((rows - m.rows_with_labels) as u64, "row", "rows"),
                    rows
                );
            }
            for j in 0..args.k {
                println!(
                    "P@{0}: {1:.2}%  nDCG@{0}: {2:.2}%  recall@{0}: {3:.2}%",
                    j + 1,
                    100.0 * m.precision[j],
                    100.0 * m.ndcg[j],
                    100.0 * m.recall[j]
                );
            }
            if let Some(train) = &train {
                train.print(&prediction, labels.chunks(*width), set.num_classes())?;
            }
        }
        Some((labels, None)) => {
            let outside = labels
                .iter()
                .filter(|&&c| c < 0 || c as u64 >= set.num_classes())
                .count();
            if outside > 0 {
                let (are, classes, rows_count) = if outside == 1 {
                    ("is", "a class", "that row counts as a miss")
                } else {
                    ("are", "classes", "those rows count as misses")
                };
                println!(
                    "note: {outside} of {} {are} not {classes} of this classifier (0 .. {}): \
                     {rows_count}",
                    plural(rows as u64, "label", "labels"),
                    set.num_classes()
                );
            }
            let accuracy = prediction.top_accuracy(labels).map_err(|e| e.to_string())?;
            for (j, a) in accuracy.iter().enumerate() {
                println!("top-{} accuracy: {:.2}%", j + 1, 100.0 * a);
            }
            if let Some(train) = &train {
                train.print(&prediction, labels.chunks(1), set.num_classes())?;
            }
        }
        None => {}
    }
    if args.out.is_none() {
        // Nothing is written: show the first rows, so that the command answers on its own.
        const SHOWN: usize = 10;
        for row in 0..rows.min(SHOWN) {
            let classes = prediction.row(row);
            let scores = &prediction.scores[row * args.k..(row + 1) * args.k];
            let pairs: Vec<String> = classes
                .iter()
                .zip(scores)
                .map(|(c, s)| format!("{c} ({s:.4})"))
                .collect();
            println!("row {row}: {}", pairs.join(", "));
        }
        if rows > SHOWN {
            println!(
                "... {} more rows (--out FILE writes them all)",
                rows - SHOWN
            );
        }
    }
    if let Some(out) = &args.out {
        // Again: the scoring may have taken minutes, time for a file to appear there.
        refuse_out(out, &args)?;
        let shape = vec![rows, args.k];
        let tensors = [
            OutTensor::I64("classes", shape.clone(), &prediction.classes),
            OutTensor::F32("scores", shape, &prediction.scores),
        ];
        let meta = HashMap::from([
            ("k".to_string(), args.k.to_string()),
            ("empty_rows".to_string(), empty.to_string()),
        ]);
        write_atomic(out, &tensors, meta).map_err(|e| e.to_string())?;
        println!("wrote classes and scores to {}", out.display());
    }
    Ok(())
}

/// The output replaces a file atomically: refuse a folder, a path whose folder does not exist,
/// one of the inputs, a checkpoint shard, and without `--force` any existing file.
fn refuse_out(out: &Path, args: &PredictArgs) -> Result<(), String> {
    let inputs: Vec<&Path> = args
        .checkpoints
        .iter()
        .chain([&args.embeddings])
        .chain(&args.train_labels)
        .map(PathBuf::as_path)
        .collect();
    let existing = Existing::RefuseUnlessForced { force: args.force };
    refuse_unsafe_output("--out", out, &inputs, existing)
}

/// Where the centers are scored, set up before the embeddings are read (so a missing CUDA
/// driver is reported at once).
enum Scorer {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<partial_fc::cuda::CudaBackend>),
}

impl Scorer {
    fn new(backend: BackendArg) -> partial_fc::Result<Self> {
        match backend {
            BackendArg::Cpu => Ok(Scorer::Cpu),
            #[cfg(feature = "cuda")]
            BackendArg::Cuda => Ok(Scorer::Cuda(Box::new(partial_fc::cuda::CudaBackend::new(
                0,
            )?))),
            #[cfg(not(feature = "cuda"))]
            BackendArg::Cuda => Err(partial_fc::PfcError::param(
                "backend",
                "cuda",
                "this pfc was built without the `cuda` feature (cargo build --features cuda, or \
                 cargo install --path . --features cuda)",
            )),
        }
    }

    fn predict(
        &self,
        set: &CheckpointSet,
        x: &[f32],
        k: usize,
        progress: &dyn Fn(u64),
    ) -> partial_fc::Result<partial_fc::Prediction> {
        match self {
            Scorer::Cpu => set.predict_top_k(x, k, progress),
            #[cfg(feature = "cuda")]
            Scorer::Cuda(cuda) => set.predict_top_k_on(cuda.as_ref(), x, k, progress),
        }
    }
}

/// The training set's label counts, for the propensity-scored metrics (`--train-labels`).
struct TrainCounts {
    /// Training rows with each class, indexed by class (a class listed twice in a row once).
    counts: Vec<u64>,
    rows: u64,
    a: f64,
    b: f64,
    path: PathBuf,
}

impl TrainCounts {
    /// Reads `labels` (I64, `[rows]` or `[rows, width]`, -1 padding) from `path`, counting the
    /// classes of the classifier (`num_classes`; others cannot be predicted and are counted
    /// as unseen when a test row has them), and parses `--propensity A,B`.
    fn read(path: &Path, propensity: &str, num_classes: u64) -> Result<TrainCounts, String> {
        let parse = |t: &str| t.trim().parse::<f64>().ok().filter(|v| v.is_finite());
        let (a, b) = match propensity.split_once(',') {
            Some((a, b)) => match (parse(a), parse(b)) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(format!(
                        "--propensity {propensity}: A,B must be two numbers"
                    ))
                }
            },
            None => {
                return Err(format!(
                    "--propensity {propensity}: A,B expected (e.g. 0.55,1.5)"
                ))
            }
        };
        let file = TensorFile::read(path).map_err(|e| e.to_string())?;
        let (labels, shape) = file
            .require("labels", file.i64("labels"))
            .map_err(|e| e.to_string())?;
        let width = match shape[..] {
            [_] => 1,
            [_, w] if w > 0 => w,
            _ => {
                return Err(format!(
                    "{}: tensor labels has shape {shape:?}; [rows] or [rows, width] expected",
                    path.display()
                ))
            }
        };
        let classes = usize::try_from(num_classes)
            .map_err(|_| "too many classes for a propensity table".to_string())?;
        let mut counts: Vec<u64> = Vec::new();
        counts
            .try_reserve_exact(classes)
            .map_err(|_| format!("no memory for a propensity table of {classes} classes"))?;
        counts.resize(classes, 0);
        for row in labels.chunks(width) {
            let mut set: Vec<i64> = row
                .iter()
                .copied()
                .filter(|&c| c >= 0 && (c as u64) < num_classes)
                .collect();
            set.sort_unstable();
            set.dedup();
            for c in set {
                counts[c as usize] += 1;
            }
        }
        let rows = (labels.len() / width) as u64;
        // The parameters are checked now, on every class's count, not after the scoring (a
        // table with no counts computed no propensity, and so passed any A and B).
        partial_fc::layer::inverse_propensities(&counts, rows, a, b)
            .map_err(|e| format!("--train-labels {} / --propensity: {e}", path.display()))?;
        Ok(TrainCounts {
            counts,
            rows,
            a,
            b,
            path: path.to_path_buf(),
        })
    }

    /// Prints PSP@j and PSnDCG@j of `prediction` against `label_sets`. A true class beyond
    /// the classifier (which no prediction can find) still weighs in the best ranking: each
    /// such class gets an id of its own after the classifier's, with the propensity of a class
    /// the training set never had.
    fn print<'a>(
        &self,
        prediction: &partial_fc::Prediction,
        label_sets: impl Iterator<Item = &'a [i64]> + Clone,
        num_classes: u64,
    ) -> Result<(), String> {
        let mut beyond: Vec<i64> = label_sets
            .clone()
            .flatten()
            .copied()
            .filter(|&c| c >= 0 && c as u64 >= num_classes)
            .collect();
        beyond.sort_unstable();
        beyond.dedup();
        let remapped: Vec<Vec<i64>> = label_sets
            .map(|set| {
                set.iter()
                    .map(|&c| match beyond.binary_search(&c) {
                        Ok(i) => (self.counts.len() + i) as i64,
                        Err(_) => c,
                    })
                    .collect()
            })
            .collect();
        let mut counts = self.counts.clone();
        counts.resize(self.counts.len() + beyond.len(), 0);
        let inv = partial_fc::layer::inverse_propensities(&counts, self.rows, self.a, self.b)
            .map_err(|e| e.to_string())?;
        let m = prediction
            .propensity_scored_metrics(&remapped, &inv)
            .map_err(|e| e.to_string())?;
        println!(
            "propensities from {} training rows of {} (A = {}, B = {})",
            self.rows,
            self.path.display(),
            self.a,
            self.b
        );
        for j in 0..prediction.k {
            println!(
                "PSP@{0}: {1:.2}%  PSnDCG@{0}: {2:.2}%",
                j + 1,
                100.0 * m.psp[j],
                100.0 * m.psndcg[j]
            );
        }
        Ok(())
    }
}
