//! Trains a Partial FC classifier on synthetic extreme multi-label data (several true classes
//! per row) with `partial_fc::multi_label::PairBatch`, and reports P@k and nDCG@k on held-out
//! rows, before and after training, against the oracle that scores with the true prototypes.
//!
//! ```text
//! cargo run --release --example multi_label
//! cargo run --release --example multi_label -- --interclass-filter 0.5 --margin-m2 0.5 --scale 64
//! ```
//!
//! Data: class `c` has a random unit prototype `p_c` in d dimensions; a row draws 3 to 8
//! distinct classes from a power law over the classes (class c with weight (c + 1)^−α, so a few
//! head classes are in many rows and most are rare) and its embedding is
//! `normalize(Σ_{c ∈ Y} p_c) + noise` (noise N(0, σ²/d) per coordinate). The classifier sees the
//! embeddings only; the oracle ranks the classes by cosine with their true prototypes, the
//! ceiling this classifier can approach. See docs/training.md for a measured run.

use clap::{Parser, ValueEnum};
use partial_fc::collective::SingleRank;
use partial_fc::multi_label::PairBatch;
use partial_fc::synthetic::SplitMix64;
use partial_fc::{
    AdamW, CpuBackend, LayerConfig, Margin, Optimizer, PartialFc, PfcError, RankingMetrics, Sgd,
};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OptimizerArg {
    /// SGD with momentum 0.9 and weight decay 5e-4.
    Sgd,
    /// AdamW (β = 0.9, 0.999), sparse ("lazy") update of the sampled rows.
    Adamw,
}

/// Train Partial FC on synthetic multi-label data (one copy of a row per label) and report
/// held-out P@k and nDCG@k.
#[derive(Parser, Debug)]
#[command(name = "multi_label")]
struct Args {
    /// Classes (labels).
    #[arg(long, default_value_t = 20_000)]
    classes: u64,
    /// Embedding dimension.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Training rows.
    #[arg(long, default_value_t = 50_000)]
    train_rows: usize,
    /// Held-out rows.
    #[arg(long, default_value_t = 2_000)]
    test_rows: usize,
    /// Fewest labels of a row.
    #[arg(long, default_value_t = 3)]
    min_labels: usize,
    /// Most labels of a row.
    #[arg(long, default_value_t = 8)]
    max_labels: usize,
    /// Exponent α of the power law over classes (class c drawn with weight (c + 1)^−α).
    #[arg(long, default_value_t = 0.6)]
    alpha: f64,
    /// Norm σ of the noise added to a row's normalized sum of prototypes.
    #[arg(long, default_value_t = 0.5)]
    noise: f64,
    /// Passes over the training rows.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Rows per step (each becomes one copy per label: up to rows × max-labels copies).
    #[arg(long, default_value_t = 128)]
    batch_rows: usize,
    /// Partial FC sample rate r.
    #[arg(long, default_value_t = 0.1)]
    sample_rate: f64,
    /// Logit scale s.
    #[arg(long, default_value_t = 30.0)]
    scale: f64,
    /// Additive angular margin m2 (ArcFace's is 0.5; 0 is a plain scaled softmax).
    #[arg(long, default_value_t = 0.0)]
    margin_m2: f64,
    /// Inter-class filter: non-target cosines above this are zeroed (`Margin::interclass_filter`;
    /// 0.3 to 0.5 help here, docs/training.md).
    #[arg(long)]
    interclass_filter: Option<f64>,
    /// Weigh each row alike (PAL-N: each copy by 1/labels of its row, `PairBatch::row_weights`
    /// through `forward_backward_weighted`) instead of each (row, label) pair alike (PAL).
    #[arg(long)]
    per_row: bool,
    /// Optimizer of the class centers.
    #[arg(long, value_enum, default_value_t = OptimizerArg::Adamw)]
    optimizer: OptimizerArg,
    /// Peak learning rate (linear decay to 0 over the run; 0.1 to 0.2 suit --optimizer sgd).
    #[arg(long, default_value_t = 0.005)]
    lr: f32,
    /// Seed of the data, the initialization and the sampling.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The data's generator (`SplitMix64`, shared by the examples).
type Rng = SplitMix64;

/// Standard normal by Box–Muller with u1 = 1 − uniform (this example's draw since its numbers
/// were measured; `SplitMix64::normal` holds u1 above 1e−300 instead).
fn normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.uniform();
    let u2 = rng.uniform();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Rows of embeddings and their label sets, padded with −1 to `width`.
struct Split {
    x: Vec<f32>,
    labels: Vec<i64>,
    width: usize,
}

impl Split {
    fn rows(&self) -> usize {
        self.labels.len() / self.width
    }
}

/// The synthetic task: prototypes and the power law's cumulative weights.
struct Task {
    dim: usize,
    prototypes: Vec<f32>,
    cdf: Vec<f64>,
}

impl Task {
    fn new(args: &Args) -> Task {
        let (classes, dim) = (args.classes as usize, args.dim);
        let mut prototypes =
            partial_fc::init::normal_rows(args.seed ^ 0xDA7A, 0, classes, dim, 1.0);
        for p in prototypes.chunks_mut(dim) {
            let n = p.iter().map(|v| v * v).sum::<f32>().sqrt();
            p.iter_mut().for_each(|v| *v /= n);
        }
        let mut total = 0.0;
        let cdf = (0..classes)
            .map(|c| {
                total += ((c + 1) as f64).powf(-args.alpha);
                total
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|s| s / total)
            .collect();
        Task {
            dim,
            prototypes,
            cdf,
        }
    }

    fn draw_class(&self, rng: &mut Rng) -> i64 {
        let u = rng.uniform();
        self.cdf
            .partition_point(|&s| s <= u)
            .min(self.cdf.len() - 1) as i64
    }

    fn split(&self, args: &Args, rows: usize, stream: u64) -> Split {
        let mut rng = Rng::new(args.seed.wrapping_mul(0x1000_0000_01B3) ^ stream);
        let (d, width) = (self.dim, args.max_labels);
        let mut x = Vec::with_capacity(rows * d);
        let mut labels = Vec::with_capacity(rows * width);
        let sigma = args.noise / (d as f64).sqrt();
        for _ in 0..rows {
            let n = args.min_labels + rng.below(args.max_labels - args.min_labels + 1);
            let mut set: Vec<i64> = Vec::with_capacity(width);
            while set.len() < n {
                let c = self.draw_class(&mut rng);
                if !set.contains(&c) {
                    set.push(c);
                }
            }
            let mut sum = vec![0.0f32; d];
            for &c in &set {
                let p = &self.prototypes[c as usize * d..(c as usize + 1) * d];
                sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
            }
            let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt();
            x.extend(
                sum.iter()
                    .map(|v| v / norm + (sigma * normal(&mut rng)) as f32),
            );
            set.resize(width, -1);
            labels.extend(set);
        }
        Split { x, labels, width }
    }
}

fn print_metrics(name: &str, m: &RankingMetrics) {
    println!(
        "{name:<12} P@1 {:.4}  P@3 {:.4}  P@5 {:.4}   nDCG@1 {:.4}  nDCG@3 {:.4}  nDCG@5 {:.4}",
        m.precision[0], m.precision[2], m.precision[4], m.ndcg[0], m.ndcg[2], m.ndcg[4]
    );
}

fn evaluate<C: partial_fc::Collective<CpuBackend>>(
    layer: &mut PartialFc<CpuBackend, C>,
    test: &Split,
) -> Result<RankingMetrics, PfcError> {
    layer
        .predict_top_k_all(&test.x, 5)?
        .ranking_metrics(test.labels.chunks(test.width))
}

fn run(args: &Args) -> Result<(), PfcError> {
    if args.min_labels == 0 || args.min_labels > args.max_labels {
        return Err(PfcError::param(
            "min_labels",
            args.min_labels,
            format!("must be in 1 ..= max-labels ({})", args.max_labels),
        ));
    }
    if (args.max_labels as u64) > args.classes || args.classes < 5 {
        return Err(PfcError::param(
            "classes",
            args.classes,
            "must be >= 5 and >= max-labels",
        ));
    }
    if args.dim == 0 || args.batch_rows == 0 || args.test_rows == 0 || args.train_rows == 0 {
        return Err(PfcError::param(
            "dim, batch-rows, train-rows, test-rows",
            0,
            "must be >= 1",
        ));
    }
    let started = Instant::now();
    let task = Task::new(args);
    let train = task.split(args, args.train_rows, 1);
    let test = task.split(args, args.test_rows, 2);
    let pairs = train.labels.iter().filter(|&&c| c >= 0).count();
    println!(
        "{} classes, d = {}, {} training rows ({pairs} pairs, {:.2} labels per row), {} held-out rows; data in {:.1} s",
        args.classes,
        args.dim,
        train.rows(),
        pairs as f64 / train.rows() as f64,
        test.rows(),
        started.elapsed().as_secs_f64()
    );

    let mut cfg = LayerConfig::new(args.classes, args.dim, args.batch_rows * args.max_labels);
    cfg.sample_rate = args.sample_rate;
    cfg.seed = args.seed;
    cfg.margin = Margin {
        interclass_filter: args.interclass_filter,
        ..Margin::combined(args.scale, 1.0, args.margin_m2, 0.0)
    };
    cfg.optimizer = Some(match args.optimizer {
        OptimizerArg::Sgd => Optimizer::Sgd(Sgd::default()),
        OptimizerArg::Adamw => Optimizer::AdamW(AdamW::default()),
    });
    println!(
        "margin s = {}, m2 = {}, filter {:?}; r = {}, {:?} lr {}, {} rows per step",
        args.scale,
        args.margin_m2,
        args.interclass_filter,
        args.sample_rate,
        args.optimizer,
        args.lr,
        args.batch_rows
    );
    let mut layer = PartialFc::new(cfg.clone(), CpuBackend, SingleRank)?;

    // The ceiling: the same ranking with the true prototypes as class centers.
    let mut oracle_cfg = cfg;
    oracle_cfg.optimizer = None;
    let mut oracle = PartialFc::new(oracle_cfg, CpuBackend, SingleRank)?;
    oracle.set_weight(&task.prototypes)?;
    let oracle_metrics = evaluate(&mut oracle, &test)?;
    drop(oracle);
    let before = evaluate(&mut layer, &test)?;

    let d = args.dim;
    let steps_per_epoch = train.rows().div_ceil(args.batch_rows);
    let total_steps = steps_per_epoch * args.epochs;
    let mut order: Vec<usize> = (0..train.rows()).collect();
    let mut rng = Rng::new(args.seed ^ 0x5417);
    let (mut step, train_start) = (0usize, Instant::now());
    let (mut x, mut sets) = (Vec::new(), Vec::new());
    for epoch in 0..args.epochs {
        // Fisher–Yates shuffle of the rows.
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let (mut loss_sum, mut loss_count) = (0.0f64, 0usize);
        for batch in order.chunks(args.batch_rows) {
            x.clear();
            sets.clear();
            for &r in batch {
                x.extend_from_slice(&train.x[r * d..(r + 1) * d]);
                sets.extend_from_slice(&train.labels[r * train.width..(r + 1) * train.width]);
            }
            let batch = PairBatch::new(&x, d, sets.chunks(train.width))?;
            // Every row has a label here; a batch of rows without any would be empty: skip it.
            if batch.is_empty() {
                continue;
            }
            // Its grad_embeddings (rows × d, summed over each row's copies) is what an encoder
            // under the classifier would backpropagate; the embeddings here are fixed inputs.
            let out = if args.per_row {
                batch.forward_backward_per_row(&mut layer)?
            } else {
                batch.forward_backward(&mut layer)?
            };
            let lr = args.lr * (1.0 - step as f32 / total_steps as f32);
            layer.step(lr)?;
            loss_sum += f64::from(out.loss);
            loss_count += 1;
            step += 1;
        }
        println!(
            "epoch {}: mean loss {:.4} ({} steps, {:.1} s)",
            epoch + 1,
            loss_sum / loss_count.max(1) as f64,
            loss_count,
            train_start.elapsed().as_secs_f64()
        );
    }
    let after = evaluate(&mut layer, &test)?;
    println!("held-out ranking ({} rows):", test.rows());
    print_metrics("untrained", &before);
    print_metrics("trained", &after);
    print_metrics("oracle", &oracle_metrics);
    println!("chance P@1 (most frequent class): {:.4}", chance_p1(&test));
    println!(
        "total {:.1} s (training {:.1} s)",
        started.elapsed().as_secs_f64(),
        train_start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// P@1 of always predicting the held-out rows' most frequent class: what a classifier that
/// learned the label frequencies alone would score.
fn chance_p1(test: &Split) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for &c in test.labels.iter().filter(|&&c| c >= 0) {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    counts.values().copied().max().unwrap_or(0) as f64 / test.rows() as f64
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
