//! Per-row margins that follow quality (AdaFace) or are drawn at random (ElasticFace) against
//! fixed margins (ArcFace, CosFace), on synthetic embeddings whose norm tracks their quality.
//!
//! ```text
//! cargo run --release --example quality_margins
//! cargo run --release --example quality_margins -- --methods arcface,adaface --seed 1
//! cargo run --release --example quality_margins -- --classes 4000 --dim 128 --epochs 12
//! ```
//!
//! Data: each class has a random unit prototype in d dimensions. A sample falls in one of four
//! quality buckets (high, mid, low, junk: 40, 30, 20 and 10% of the samples); its embedding is
//! the prototype plus noise N(0, σ²/d) per coordinate, σ = 0.8, 1.5, 2.5 and 5 by bucket,
//! rescaled to the bucket's norm (30, 22, 14, 8) times 1 + 0.1·N(0, 1). So the norm is a clean
//! proxy for quality, the assumption AdaFace rests on. Each class has 16 training and 8
//! held-out samples.
//!
//! Only the Partial FC head trains (the embeddings are fixed inputs; no backbone), sharded over
//! 2 thread ranks (`ThreadGroup`), r = 0.1, 128 rows per rank, SGD (momentum 0.9, weight decay
//! 5e-4, every center moving: `UpdateMode::Dense`, as insightface's PartialFC_V2 with torch's
//! SGD), 20 steps of warm-up then a linear decay to 0. The example reports held-out top-1
//! accuracy (`predict_top_k_all`) overall and per bucket for each margin:
//!
//! - `arcface`: s = 64, m2 = 0.5; `cosface`: s = 64, m3 = 0.4.
//! - `adaface`: `AdaFace` (m = 0.4, h = 0.333) on `Margin::combined(64, 1, 0, 0)`, the layer's
//!   default straight-through gradient; `adaface-exact`: the same with `GradMode::Exact` (the
//!   paper's code differentiates through the margin).
//! - `elastic-arc`: ElasticFace-Arc, an angular margin per row from N(0.5, 0.05²), drawn for
//!   (seed, the layer's `steps()`, global row `rank · 128 + i`).
//!
//! The `oracle` row classifies by the nearest true prototype: the ceiling of each bucket.
//! docs/training.md ("Per-row margins") has a measured table.

use clap::{Parser, ValueEnum};
use partial_fc::collective::ThreadGroup;
use partial_fc::synthetic::SplitMix64;
use partial_fc::{
    elastic_margins, AdaFace, Collective, CpuBackend, GradMode, LayerConfig, Margin, MarginKind,
    PartialFc, PassOptions, PfcError, UpdateMode,
};
use rayon::prelude::*;
use std::process::ExitCode;
use std::time::Instant;

/// Thread ranks the classifier is sharded over.
const WORLD: usize = 2;
/// Rows per rank and step.
const BATCH_PER_RANK: usize = 128;
/// Training and held-out samples of each class.
const TRAIN_PER_CLASS: usize = 16;
const TEST_PER_CLASS: usize = 8;
/// Steps of linear warm-up of the learning rate.
const WARMUP: usize = 20;

/// A quality bucket: its name, the norm σ of the noise added to the unit prototype, the norm the
/// sample is rescaled to, and its share of the samples.
struct Bucket {
    name: &'static str,
    noise: f64,
    norm: f64,
    share: f64,
}

const BUCKETS: [Bucket; 4] = [
    Bucket {
        name: "high",
        noise: 0.8,
        norm: 30.0,
        share: 0.4,
    },
    Bucket {
        name: "mid",
        noise: 1.5,
        norm: 22.0,
        share: 0.3,
    },
    Bucket {
        name: "low",
        noise: 2.5,
        norm: 14.0,
        share: 0.2,
    },
    Bucket {
        name: "junk",
        noise: 5.0,
        norm: 8.0,
        share: 0.1,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    /// ArcFace: s = 64, m2 = 0.5.
    Arcface,
    /// CosFace: s = 64, m3 = 0.4.
    Cosface,
    /// AdaFace (m = 0.4, h = 0.333), straight-through gradient.
    Adaface,
    /// AdaFace with the exact gradient through the margin (the paper's code).
    AdafaceExact,
    /// ElasticFace-Arc: m2 per row from N(0.5, 0.05²).
    ElasticArc,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Arcface => "ArcFace (m = 0.5)",
            Method::Cosface => "CosFace (m = 0.4)",
            Method::Adaface => "AdaFace (m = 0.4)",
            Method::AdafaceExact => "AdaFace, exact gradient",
            Method::ElasticArc => "ElasticFace-Arc (0.5, σ 0.05)",
        }
    }

    fn margin(self) -> Margin {
        match self {
            Method::Arcface | Method::ElasticArc => Margin::arcface(),
            Method::Cosface => Margin::cosface(),
            Method::Adaface => Margin::combined(64.0, 1.0, 0.0, 0.0),
            Method::AdafaceExact => Margin {
                grad_mode: GradMode::Exact,
                ..Margin::combined(64.0, 1.0, 0.0, 0.0)
            },
        }
    }
}

/// Train a Partial FC head with fixed and per-row margins on synthetic embeddings whose norm
/// tracks their quality, and report held-out top-1 accuracy overall and per quality bucket.
#[derive(Parser, Debug)]
#[command(name = "quality_margins")]
struct Args {
    /// Margins to train with, in order (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = [
            Method::Arcface,
            Method::Cosface,
            Method::Adaface,
            Method::AdafaceExact,
            Method::ElasticArc,
        ]
    )]
    methods: Vec<Method>,
    /// Passes over the training samples (the last partial batch of each is dropped).
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Seed of the data, its order, the layer's sampling and ElasticFace's draws.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Classes C.
    #[arg(long, default_value_t = 2_000)]
    classes: usize,
    /// Embedding dimension d.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Peak SGD learning rate (after the warm-up; linear decay to 0 over the run).
    #[arg(long, default_value_t = 0.2)]
    lr: f32,
}

impl Args {
    fn check(&self) -> Result<(), PfcError> {
        if self.dim == 0 {
            return Err(PfcError::param("dim", self.dim, "must be >= 1"));
        }
        if self.epochs == 0 {
            return Err(PfcError::param("epochs", self.epochs, "must be >= 1"));
        }
        // One step takes WORLD × BATCH_PER_RANK training samples.
        let fewest = (WORLD * BATCH_PER_RANK).div_ceil(TRAIN_PER_CLASS);
        if self.classes < fewest {
            let reason = format!(
                "must be >= {fewest} ({TRAIN_PER_CLASS} samples each fill one step of {})",
                WORLD * BATCH_PER_RANK
            );
            return Err(PfcError::param("classes", self.classes, reason));
        }
        // The example holds every sample in memory: at most 2^31 values (8 GiB).
        let values = self
            .classes
            .saturating_mul(TRAIN_PER_CLASS + TEST_PER_CLASS + 1)
            .saturating_mul(self.dim);
        if values > 1 << 31 {
            let reason = "samples × dim over 2^31 values (8 GiB): fewer classes or dimensions";
            return Err(PfcError::param("classes", self.classes, reason));
        }
        // `step` refuses it too, but only after the data and the oracle.
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(PfcError::param("lr", self.lr, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// The data's generator (`SplitMix64`, shared by the examples).
type Rng = SplitMix64;

/// A bucket by the shares.
fn bucket(rng: &mut Rng) -> usize {
    let u = rng.uniform();
    let mut acc = 0.0;
    for (i, b) in BUCKETS.iter().enumerate() {
        acc += b.share;
        if u < acc {
            return i;
        }
    }
    BUCKETS.len() - 1
}

/// Samples (row-major, `dim` wide, un-normalized), their classes and quality buckets.
#[derive(Default)]
struct Split {
    x: Vec<f32>,
    y: Vec<i64>,
    bucket: Vec<u8>,
}

struct Task {
    /// The unit prototypes, `classes × dim`.
    prototypes: Vec<f32>,
    train: Split,
    test: Split,
    /// The generator's state after the data: each rank draws the same shuffles from it.
    shuffles: u64,
}

impl Task {
    fn new(args: &Args) -> Task {
        let d = args.dim;
        let mut rng = Rng::new(args.seed);
        let mut prototypes = Vec::with_capacity(args.classes * d);
        for _ in 0..args.classes {
            let p: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
            let n = p.iter().map(|v| v * v).sum::<f64>().sqrt();
            prototypes.extend(p.iter().map(|v| (v / n) as f32));
        }
        let sqrt_d = (d as f64).sqrt();
        let mut sample = |split: &mut Split, class: usize| {
            let b = bucket(&mut rng);
            let p = &prototypes[class * d..(class + 1) * d];
            let e: Vec<f64> = p
                .iter()
                .map(|&v| f64::from(v) + BUCKETS[b].noise * rng.normal() / sqrt_d)
                .collect();
            let n = e.iter().map(|v| v * v).sum::<f64>().sqrt();
            let norm = BUCKETS[b].norm * (1.0 + 0.1 * rng.normal());
            split.x.extend(e.iter().map(|v| (v / n * norm) as f32));
            split.y.push(class as i64);
            split.bucket.push(b as u8);
        };
        let (mut train, mut test) = (Split::default(), Split::default());
        for class in 0..args.classes {
            for _ in 0..TRAIN_PER_CLASS {
                sample(&mut train, class);
            }
        }
        for class in 0..args.classes {
            for _ in 0..TEST_PER_CLASS {
                sample(&mut test, class);
            }
        }
        Task {
            prototypes,
            train,
            test,
            shuffles: rng.state(),
        }
    }
}

/// Learning rate of step `t` of `total`: linear warm-up over [`WARMUP`] steps, then a linear
/// decay to 0.
fn lr_at(peak: f32, t: usize, total: usize) -> f32 {
    if t < WARMUP {
        peak * (t + 1) as f32 / WARMUP as f32
    } else {
        peak * (1.0 - (t - WARMUP) as f32 / total.saturating_sub(WARMUP).max(1) as f32).max(0.0)
    }
}

/// What one rank returns: the mean loss of the last epoch, the predicted class of its share of
/// the held-out samples, and its AdaFace statistics (μ, σ) at the end.
struct RankResult {
    loss: f32,
    predicted: Vec<i64>,
    statistics: (f64, f64),
}

/// One rank's training with `method`; then each rank predicts its half of the held-out samples.
fn train<C: Collective<CpuBackend>>(
    args: &Args,
    task: &Task,
    method: Method,
    comm: C,
) -> Result<RankResult, PfcError> {
    let (d, rank, n) = (args.dim, comm.rank(), BATCH_PER_RANK);
    let mut cfg = LayerConfig::new(args.classes as u64, d, n);
    cfg.sample_rate = 0.1;
    cfg.margin = method.margin();
    cfg.update = UpdateMode::Dense;
    cfg.seed = args.seed;
    let mut layer = PartialFc::new(cfg, CpuBackend, comm)?;
    let mut adaface = AdaFace::new();

    let steps = task.train.y.len() / (WORLD * n);
    let total = args.epochs * steps;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut rng = Rng::new(task.shuffles);
    let mut order: Vec<usize> = (0..task.train.y.len()).collect();
    let mut epoch_loss = 0.0;
    for epoch in 0..args.epochs {
        rng.shuffle(&mut order);
        epoch_loss = 0.0;
        for (step, batch) in order.chunks_exact(WORLD * n).enumerate() {
            x.clear();
            y.clear();
            for &i in &batch[rank * n..(rank + 1) * n] {
                x.extend_from_slice(&task.train.x[i * d..(i + 1) * d]);
                y.push(task.train.y[i]);
            }
            let out = match method {
                Method::Arcface | Method::Cosface => layer.forward_backward(&x, &y)?,
                Method::Adaface | Method::AdafaceExact => {
                    let margins = adaface.margins(&x, d)?;
                    let out = layer.forward_backward_with(&x, &y, margins.options())?;
                    adaface.update(&margins); // the pass ran: keep this batch's statistics
                    out
                }
                Method::ElasticArc => {
                    let m2 = elastic_margins(
                        MarginKind::Angular,
                        0.5,
                        0.05,
                        args.seed,
                        layer.steps(),
                        (rank * n) as u64,
                        n,
                    )?;
                    layer.forward_backward_with(&x, &y, PassOptions::new().angular_margins(&m2))?
                }
            };
            epoch_loss += out.loss / steps as f32;
            layer.step(lr_at(args.lr, epoch * steps + step, total))?;
        }
    }

    let rows = task.test.y.len();
    let mine = rank * rows / WORLD..(rank + 1) * rows / WORLD;
    let prediction = layer.predict_top_k_all(&task.test.x[mine.start * d..mine.end * d], 1)?;
    Ok(RankResult {
        loss: epoch_loss,
        predicted: prediction.classes,
        statistics: (adaface.batch_mean, adaface.batch_std),
    })
}

/// Top-1 accuracy in percent, overall then per bucket.
fn accuracy(test: &Split, predicted: impl Iterator<Item = i64>) -> [f64; 1 + BUCKETS.len()] {
    let (mut hits, mut rows) = ([0usize; 1 + BUCKETS.len()], [0usize; 1 + BUCKETS.len()]);
    for ((&label, &b), p) in test.y.iter().zip(&test.bucket).zip(predicted) {
        for slot in [0, 1 + b as usize] {
            rows[slot] += 1;
            hits[slot] += usize::from(p == label);
        }
    }
    std::array::from_fn(|i| 100.0 * hits[i] as f64 / rows[i].max(1) as f64)
}

/// The class of the nearest true prototype (by cosine) of each held-out sample.
fn oracle(task: &Task, d: usize) -> Vec<i64> {
    task.test
        .x
        .par_chunks(d)
        .map(|x| {
            let mut best = (f32::NEG_INFINITY, -1);
            for (c, p) in task.prototypes.chunks_exact(d).enumerate() {
                let s: f32 = x.iter().zip(p).map(|(a, b)| a * b).sum();
                if s > best.0 {
                    best = (s, c as i64);
                }
            }
            best.1
        })
        .collect()
}

fn row(name: &str, acc: &[f64], rest: &str) {
    let cells: Vec<String> = acc.iter().map(|a| format!("{a:.2}%")).collect();
    println!("| {name} | {} | {rest} |", cells.join(" | "));
}

fn run(args: &Args) -> Result<(), PfcError> {
    args.check()?;
    let started = Instant::now();
    let task = Task::new(args);
    let steps = task.train.y.len() / (WORLD * BATCH_PER_RANK);
    let mut counts = [0usize; BUCKETS.len()];
    task.test
        .bucket
        .iter()
        .for_each(|&b| counts[b as usize] += 1);
    let buckets: Vec<String> = BUCKETS
        .iter()
        .zip(counts)
        .map(|(b, n)| format!("{} {n} (σ {}, norm {})", b.name, b.noise, b.norm))
        .collect();
    println!(
        "{} classes in d = {}: {} training samples, {} held out: {}",
        args.classes,
        args.dim,
        task.train.y.len(),
        task.test.y.len(),
        buckets.join(", ")
    );
    println!(
        "{WORLD} ranks × {BATCH_PER_RANK} rows, r = 0.1, SGD (dense) peak lr {}, {} epochs of {steps} \
         steps, seed {}",
        args.lr, args.epochs, args.seed
    );
    println!();
    let names: Vec<&str> = BUCKETS.iter().map(|b| b.name).collect();
    println!(
        "| margin | top-1 | {} | last-epoch loss | AdaFace μ, σ (rank 0) | time |",
        names.join(" | ")
    );
    println!("|---|---|{}---|---|---|", "---|".repeat(BUCKETS.len()));
    let t = Instant::now();
    let oracle = oracle(&task, args.dim);
    row(
        "oracle (nearest prototype)",
        &accuracy(&task.test, oracle.into_iter()),
        &format!("– | – | {:.1} s", t.elapsed().as_secs_f64()),
    );

    for &method in &args.methods {
        let t = Instant::now();
        let ranks = ThreadGroup::run(WORLD, |comm| train(args, &task, method, comm))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let predicted = ranks.iter().flat_map(|r| r.predicted.iter().copied());
        let statistics = match method {
            Method::Adaface | Method::AdafaceExact => {
                let (mean, std) = ranks[0].statistics;
                format!("{mean:.2}, {std:.2}")
            }
            _ => "–".to_string(),
        };
        row(
            method.name(),
            &accuracy(&task.test, predicted),
            &format!(
                "{:.3} | {statistics} | {:.1} s",
                ranks[0].loss,
                t.elapsed().as_secs_f64()
            ),
        );
    }
    println!("\n{:.1} s in all", started.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
