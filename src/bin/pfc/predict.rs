//! `pfc predict`: the k nearest classes of a saved classifier for a file of embeddings, on the
//! host, and their top-j accuracy when the file has labels.

use indicatif::{ProgressBar, ProgressStyle};
use partial_fc::checkpoint::CheckpointSet;
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
    /// tensor `[rows]` of true classes.
    #[arg(long)]
    embeddings: PathBuf,
    /// Name of the embeddings tensor in that file.
    #[arg(long, default_value = "embeddings")]
    tensor: String,
    /// Name of the labels tensor (used when present: the top-j accuracies are printed).
    #[arg(long, default_value = "labels")]
    labels: String,
    /// Classes per row, 1 to 64.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// Where to write `classes` (I64 `[rows, k]`, best first) and `scores` (F32 cosines).
    #[arg(long)]
    out: Option<PathBuf>,
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
    if let Some(out) = &args.out {
        refuse_overwriting_an_input(out, &args)?;
    }
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
    let labels = match file.i64(&args.labels).map_err(|e| e.to_string())? {
        Some((labels, s)) if s == [rows] => Some(labels),
        Some((_, s)) => {
            return Err(format!(
                "{}: tensor {} has shape {s:?}; [{rows}] expected (one class per row)",
                args.embeddings.display(),
                args.labels
            ))
        }
        None => None,
    };
    println!(
        "{rows} rows against {} classes (d = {dim}, step {}, {} files), k = {}",
        set.num_classes(),
        set.step(),
        args.checkpoints.len(),
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
    let prediction = match args.backend {
        BackendArg::Cpu => set.predict_top_k(&x, args.k, &progress),
        BackendArg::Cuda => predict_on_cuda(&set, &x, args.k, &progress),
    };
    bar.finish_and_clear();
    let prediction = prediction.map_err(|e| e.to_string())?;
    if let Some(labels) = &labels {
        let accuracy = prediction.top_accuracy(labels).map_err(|e| e.to_string())?;
        for (j, a) in accuracy.iter().enumerate() {
            println!("top-{} accuracy: {:.2}%", j + 1, 100.0 * a);
        }
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
        let shape = vec![rows, args.k];
        let tensors = [
            OutTensor::I64("classes", shape.clone(), &prediction.classes),
            OutTensor::F32("scores", shape, &prediction.scores),
        ];
        let meta = HashMap::from([("k".to_string(), args.k.to_string())]);
        write_atomic(out, &tensors, meta).map_err(|e| e.to_string())?;
        println!("wrote classes and scores to {}", out.display());
    }
    Ok(())
}

/// The output replaces a file atomically: refuse, before any work, a folder or one of the inputs.
fn refuse_overwriting_an_input(out: &Path, args: &PredictArgs) -> Result<(), String> {
    if out.is_dir() {
        return Err(format!(
            "--out {} is a folder: give a file name",
            out.display()
        ));
    }
    let Ok(out_canonical) = std::fs::canonicalize(out) else {
        return Ok(()); // it does not exist yet
    };
    let inputs = args.checkpoints.iter().chain([&args.embeddings]);
    for input in inputs {
        if std::fs::canonicalize(input).ok().as_ref() == Some(&out_canonical) {
            return Err(format!(
                "--out {} is one of the input files: write the prediction elsewhere",
                out.display()
            ));
        }
    }
    Ok(())
}

/// On CUDA device 0.
#[cfg(feature = "cuda")]
fn predict_on_cuda(
    set: &CheckpointSet,
    x: &[f32],
    k: usize,
    progress: &dyn Fn(u64),
) -> partial_fc::Result<partial_fc::Prediction> {
    let cuda = partial_fc::cuda::CudaBackend::new(0)?;
    set.predict_top_k_on(&cuda, x, k, progress)
}

#[cfg(not(feature = "cuda"))]
fn predict_on_cuda(
    _: &CheckpointSet,
    _: &[f32],
    _: usize,
    _: &dyn Fn(u64),
) -> partial_fc::Result<partial_fc::Prediction> {
    Err(partial_fc::PfcError::param(
        "backend",
        "cuda",
        "this pfc was built without the `cuda` feature (cargo build --features cuda)",
    ))
}
