//! Class-balanced row weights on a long-tailed task, and how they interact with the sampling.
//!
//! ```text
//! cargo run --release --example long_tail -- --weights inv-sqrt
//! cargo run --release --example long_tail -- --weights inv --sample-rate 1.0
//! cargo run --release --example long_tail -- --weights effective --update dense --world 2
//! ```
//!
//! Data: each class has a random unit prototype in d dimensions; a row is its class's prototype
//! plus noise N(0, σ²/d) per coordinate, normalized. A few head classes have many training rows
//! and most (the tail) have a couple; every class has the same number of held-out rows. The
//! layer alone is trained (the embeddings are fixed inputs) with a plain scaled softmax, and
//! the example reports top-1 accuracy on the held-out rows of the head and of the tail classes.
//!
//! Why: class-balanced weights (1/n, 1/√n, the "effective number" of Cui et al., 2019), passed
//! per row to `PartialFc::forward_backward_weighted`, make each class count alike in the loss.
//! With r < 1 they also meet the sampling: a head class is a positive of nearly every batch, so
//! it is always in the sample, as a negative of the heavily weighted tail rows, whose gradients
//! push it away far more than its own lightly weighted rows pull it back; a tail class is
//! sampled as a negative only now and then. With r = 1 every class is a negative of every row
//! and the weights trade head for tail accuracy as in a full softmax. docs/training.md
//! ("Per-row weights") has a measured table.

use clap::{Parser, ValueEnum};
use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::synthetic::SplitMix64;
use partial_fc::{
    Collective, CpuBackend, LayerConfig, Margin, PartialFc, PfcError, Prediction, UpdateMode,
};
use std::ops::Range;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WeightsArg {
    /// Every row weighs 1 (`forward_backward`).
    None,
    /// A row of a class with n training rows weighs 1/√n.
    InvSqrt,
    /// 1/n: each class weighs alike in the loss.
    Inv,
    /// The effective number of samples: (1 − β) / (1 − βⁿ).
    Effective,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum UpdateArg {
    /// Only the sampled class centers move (the paper's algorithm).
    Sparse,
    /// Every center moves (momentum and weight decay on those not sampled too).
    Dense,
}

/// Train a Partial FC layer on a long-tailed synthetic task with class-balanced row weights and
/// report the held-out top-1 accuracy of the head and of the tail classes.
#[derive(Parser, Debug)]
#[command(name = "long_tail")]
struct Args {
    /// Row weights by class frequency (normalized to average 1 over the training rows).
    #[arg(long, value_enum, default_value_t = WeightsArg::None)]
    weights: WeightsArg,
    /// β of --weights effective, in (0, 1).
    #[arg(long, default_value_t = 0.999)]
    beta: f64,
    /// Partial FC sample rate r.
    #[arg(long, default_value_t = 0.1)]
    sample_rate: f64,
    /// Which class centers the optimizer moves each step.
    #[arg(long, value_enum, default_value_t = UpdateArg::Sparse)]
    update: UpdateArg,
    /// Ranks (threads of a `ThreadGroup`) the classifier is sharded over; must divide --batch.
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// Head classes (the first classes).
    #[arg(long, default_value_t = 100)]
    head_classes: usize,
    /// Training rows of a head class.
    #[arg(long, default_value_t = 200)]
    head_rows: usize,
    /// Tail classes.
    #[arg(long, default_value_t = 1_900)]
    tail_classes: usize,
    /// Training rows of a tail class.
    #[arg(long, default_value_t = 2)]
    tail_rows: usize,
    /// Held-out rows of every class.
    #[arg(long, default_value_t = 10)]
    test_rows: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = 32)]
    dim: usize,
    /// Norm σ of the noise added to a prototype (before normalizing the row).
    #[arg(long, default_value_t = 1.0)]
    noise: f32,
    /// Passes over the training rows (the last partial batch of each is dropped).
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Rows per step, over all ranks.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Peak SGD learning rate (linear decay to 0 over the run).
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// Seed of the data and its order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// The data's generator (`SplitMix64`, shared by the examples).
type Rng = SplitMix64;

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

/// Rows of embeddings (row-major, `dim` wide) and their classes.
#[derive(Default)]
struct Split {
    x: Vec<f32>,
    y: Vec<i64>,
}

/// Everything a rank needs: the data, the weights of the classes, the order of the batches.
struct Task {
    train: Split,
    test: Split,
    /// Weight of a row of each class; `None` trains unweighted.
    class_weights: Option<Vec<f32>>,
    /// The generator's state after the data: each rank draws the same shuffles from it.
    shuffles: u64,
}

impl Task {
    fn new(args: &Args) -> Task {
        let (d, classes) = (args.dim, args.classes());
        let mut rng = Rng::new(args.seed);
        let prototypes: Vec<Vec<f32>> = (0..classes)
            .map(|_| {
                let mut p: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
                normalize(&mut p);
                p
            })
            .collect();
        let sqrt_d = (d as f32).sqrt();
        let mut sample = |split: &mut Split, class: usize, rows: usize| {
            for _ in 0..rows {
                let start = split.x.len();
                let noisy = prototypes[class]
                    .iter()
                    .map(|p| p + args.noise * rng.normal() as f32 / sqrt_d);
                split.x.extend(noisy);
                normalize(&mut split.x[start..]);
                split.y.push(class as i64);
            }
        };
        let (mut train, mut test) = (Split::default(), Split::default());
        for class in 0..classes {
            sample(&mut train, class, args.train_rows(class));
        }
        for class in 0..classes {
            sample(&mut test, class, args.test_rows);
        }

        let raw = |n: usize| match args.weights {
            WeightsArg::None => 1.0,
            WeightsArg::InvSqrt => 1.0 / (n as f64).sqrt(),
            WeightsArg::Inv => 1.0 / n as f64,
            WeightsArg::Effective => (1.0 - args.beta) / (1.0 - args.beta.powi(n as i32)),
        };
        // Normalized so that the mean weight over the training rows is 1.
        let rows = (0..classes).map(|c| args.train_rows(c));
        let mean = rows.clone().map(|n| n as f64 * raw(n)).sum::<f64>() / train.y.len() as f64;
        let class_weights = (args.weights != WeightsArg::None)
            .then(|| rows.map(|n| (raw(n) / mean) as f32).collect());
        Task {
            train,
            test,
            class_weights,
            shuffles: rng.state(),
        }
    }
}

impl Args {
    fn classes(&self) -> usize {
        self.head_classes.saturating_add(self.tail_classes)
    }

    fn train_rows(&self, class: usize) -> usize {
        if class < self.head_classes {
            self.head_rows
        } else {
            self.tail_rows
        }
    }

    fn check(&self) -> Result<(), PfcError> {
        let positive = [
            ("head-rows", self.head_rows),
            ("tail-rows", self.tail_rows),
            ("test-rows", self.test_rows),
            ("dim", self.dim),
            ("world", self.world),
            ("classes (head + tail)", self.classes()),
        ];
        if let Some((name, v)) = positive.into_iter().find(|&(_, v)| v == 0) {
            return Err(PfcError::param(name, v, "must be >= 1"));
        }
        if self.world > self.classes() {
            let reason = format!("must be at most the {} classes", self.classes());
            return Err(PfcError::param("world", self.world, reason));
        }
        if self.batch == 0 || !self.batch.is_multiple_of(self.world) {
            let reason = format!("must be a positive multiple of --world ({})", self.world);
            return Err(PfcError::param("batch", self.batch, reason));
        }
        let rows = (self.head_classes.saturating_mul(self.head_rows))
            .saturating_add(self.tail_classes.saturating_mul(self.tail_rows));
        if rows < self.batch {
            let reason = format!("must be at most the {rows} training rows");
            return Err(PfcError::param("batch", self.batch, reason));
        }
        // The example holds every row in memory: at most 2^31 values (8 GiB).
        let values = rows
            .saturating_add(self.classes().saturating_mul(self.test_rows))
            .saturating_mul(self.dim);
        if values > 1 << 31 {
            let reason = "rows × dim over 2^31 values (8 GiB): fewer classes, rows or dimensions";
            return Err(PfcError::param("data", values, reason));
        }
        if !(self.beta > 0.0 && self.beta < 1.0) {
            return Err(PfcError::param("beta", self.beta, "must be in (0, 1)"));
        }
        // The learning rate is the layer's to check (`step` refuses a negative or NaN one).
        if !self.noise.is_finite() {
            return Err(PfcError::param("noise", self.noise, "must be finite"));
        }
        Ok(())
    }
}

/// One rank's training; rank 0 then predicts every held-out row (the others pass none) and
/// returns the last loss and the prediction.
fn train<C: Collective<CpuBackend>>(
    args: &Args,
    task: &Task,
    comm: C,
) -> Result<(f32, Prediction), PfcError> {
    let (d, rank) = (args.dim, comm.rank());
    let per_rank = args.batch / args.world;
    let mut cfg = LayerConfig::new(args.classes() as u64, d, per_rank);
    cfg.sample_rate = args.sample_rate;
    cfg.margin = Margin::combined(30.0, 1.0, 0.0, 0.0); // plain softmax, s = 30
    cfg.update = match args.update {
        UpdateArg::Sparse => UpdateMode::Sparse,
        UpdateArg::Dense => UpdateMode::Dense,
    };
    let mut layer = PartialFc::new(cfg, CpuBackend, comm)?;

    let steps = task.train.y.len() / args.batch;
    let total = args.epochs as f32 * steps as f32;
    let (mut x, mut y, mut w) = (Vec::new(), Vec::new(), Vec::new());
    let mut rng = Rng::new(task.shuffles);
    let mut order: Vec<usize> = (0..task.train.y.len()).collect();
    let mut loss = f32::NAN;
    for epoch in 0..args.epochs {
        rng.shuffle(&mut order);
        for (step, batch) in order.chunks_exact(args.batch).enumerate() {
            let mine = &batch[rank * per_rank..(rank + 1) * per_rank];
            x.clear();
            y.clear();
            for &i in mine {
                x.extend_from_slice(&task.train.x[i * d..(i + 1) * d]);
                y.push(task.train.y[i]);
            }
            let out = match &task.class_weights {
                None => layer.forward_backward(&x, &y)?,
                Some(cw) => {
                    w.clear();
                    w.extend(y.iter().map(|&c| cw[c as usize]));
                    layer.forward_backward_weighted(&x, &y, &w)?
                }
            };
            loss = out.loss;
            layer.step(args.lr * (1.0 - (epoch * steps + step) as f32 / total))?;
        }
    }
    let test_x = if rank == 0 { &task.test.x[..] } else { &[] };
    Ok((loss, layer.predict_top_k_all(test_x, 1)?))
}

/// Top-1 accuracy over a range of held-out rows.
fn top1(p: &Prediction, labels: &[i64], rows: Range<usize>) -> Result<f64, PfcError> {
    let part = Prediction {
        k: p.k,
        classes: p.classes[rows.start * p.k..rows.end * p.k].to_vec(),
        scores: p.scores[rows.start * p.k..rows.end * p.k].to_vec(),
    };
    Ok(part.top_accuracy(&labels[rows])?[0])
}

fn run(args: &Args) -> Result<(), PfcError> {
    args.check()?;
    let task = Task::new(args);
    let weight = |c: usize| task.class_weights.as_ref().map_or(1.0, |w| w[c]);
    println!(
        "{} classes in d = {}: {} head of {} rows, {} tail of {}; {} training rows, {} held out",
        args.classes(),
        args.dim,
        args.head_classes,
        args.head_rows,
        args.tail_classes,
        args.tail_rows,
        task.train.y.len(),
        task.test.y.len()
    );
    println!(
        "weights {:?} (a head row {:.4}, a tail row {:.4}); r = {}, {:?} update, {} rank(s)",
        args.weights,
        weight(0),
        weight(args.classes() - 1),
        args.sample_rate,
        args.update,
        args.world
    );

    let started = Instant::now();
    let (loss, prediction) = if args.world == 1 {
        train(args, &task, SingleRank)?
    } else {
        // Every rank returns; rank 0's prediction holds every held-out row.
        ThreadGroup::run(args.world, |comm| train(args, &task, comm))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .swap_remove(0)
    };
    let seconds = started.elapsed().as_secs_f64();

    let head = args.head_classes * args.test_rows;
    let labels = &task.test.y;
    println!(
        "top-1 head {:.3}  tail {:.3}  (last loss {loss:.4}, {seconds:.1} s)",
        top1(&prediction, labels, 0..head)?,
        top1(&prediction, labels, head..labels.len())?
    );
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
