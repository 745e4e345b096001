//! `pfc plan`: the per-GPU memory of a Partial FC configuration, what fits, and the
//! upper bound on classes over cluster sizes; optionally a sweep over class counts and its SVG plot.
//!
//! Numbers and sizes are read as text and parsed by the library (`29M`, `32GiB`), so that a bad
//! value is one line naming its flag, exit status 2.

use crate::out_file::{refuse_unsafe_output, Existing};
use clap::ValueEnum;
use partial_fc::plan::sweep::{plot_svg, sweep, Regime, SweepPoint};
use partial_fc::plan::units::{format_bytes, format_count, parse_count, parse_size};
use partial_fc::plan::{Dtype, LogitsMode, Optimizer, Plan, PlanConfig};
use partial_fc::{GemmPrecision, PfcError, UpdateMode};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::text::plural;

/// Points of a sweep, log-spaced.
///
/// (Text arguments are `Box<str>` rather than `String` to keep `PlanArgs` small.)
const SWEEP_POINTS: usize = 48;

/// Arguments of `pfc plan`.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// Total number of classes C (e.g. 29M, 1.5B, 100000).
    #[arg(long, allow_hyphen_values = true, value_name = "COUNT")]
    classes: Box<str>,
    /// Number of GPUs k.
    #[arg(long, allow_hyphen_values = true, value_name = "K")]
    gpus: Box<str>,
    /// Memory of one GPU: e.g. 80GiB for a card sold as "H100 80GB", 11GiB for an
    /// "RTX 2080 Ti 11GB". Units K, M, G, T (with or without B) are powers of 1000, KiB, MiB,
    /// GiB, TiB powers of 1024: 80GB is 80·10⁹ bytes = 74.5 GiB, 7% less than that card holds
    /// (the output says so when a decimal unit is given).
    #[arg(long, allow_hyphen_values = true, value_name = "SIZE")]
    gpu_memory: Box<str>,
    /// Images per GPU per step, N: the layer's rows, so for multi-label data expanded one copy
    /// per label (`multi_label::PairBatch`) count (row, label) pairs, not rows.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value = "128"
    )]
    batch: Box<str>,
    /// Passes per step (gradient accumulation, `forward_backward_accumulate`): the step's
    /// --batch images per GPU go through in this many passes of batch / ACCUMULATE each, which
    /// is what the step's buffers are sized by. It needs the dense update (the passes draw
    /// different samples), which is planned. (arcface_torch's `batch_size` with `gradient_acc`
    /// is a pass's: give --batch batch_size × gradient_acc.)
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "ACCUMULATE",
        default_value = "1"
    )]
    accumulate: Box<str>,
    /// Embedding dimension d.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "D",
        default_value = "512"
    )]
    dim: Box<str>,
    /// Sample rate r in [0, 1] (1 = model parallel, 0 = positives only).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "R",
        default_value = "0.1"
    )]
    sample_rate: Box<str>,
    /// Memory reserved for everything outside the FC layer (backbone, activations, framework).
    /// The default 0 plans the FC layer alone (the verdict says so).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "SIZE",
        default_value = "0"
    )]
    reserved: Box<str>,
    /// Storage dtype of the weight shard (f16/bf16 are what-ifs: the layer keeps f32 master
    /// weights, so it cannot run them; the verdict says so).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    weight_dtype: DtypeArg,
    /// Optimizer state kept per weight: none, SGD momentum (one tensor) or AdamW (two moments).
    #[arg(long, value_enum, default_value_t = OptimizerArg::SgdMomentum)]
    optimizer: OptimizerArg,
    /// Storage dtype of the optimizer state (the layer's `StateDtype`).
    #[arg(long, value_enum, default_value_t = StateArg::F32)]
    state_dtype: StateArg,
    /// Sparse: only sampled rows get a gradient; dense: a full-shard gradient (published PyTorch).
    /// [default: sparse; dense with --accumulate above 1]
    #[arg(long, value_enum)]
    update: Option<UpdateArg>,
    /// Whether the N·k × S logits are materialized or fused away (fused is a what-if: the layer
    /// does not implement it yet, so it cannot run it; the verdict says so).
    #[arg(long, value_enum, default_value_t = LogitsArg::Materialized)]
    logits: LogitsArg,
    /// Dtype of the all-gathered embeddings on the wire.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    wire_dtype: DtypeArg,
    /// Dtype of the embedding gradient on the backward's reduce-scatter (f16/bf16 halve its
    /// bytes and add its 16-bit send and receive buffers).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    grad_wire_dtype: DtypeArg,
    /// Hard negatives (the layer's `NegativeSampler::Hard`): adds the shard's class scores and the
    /// buffers that score it a chunk of 4096 centers at a time.
    #[arg(long)]
    hard_negatives: bool,
    /// Operand precision of the step's GEMMs (bf16/f16 add the 16-bit operand copies).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    gemm_precision: DtypeArg,
    /// GPUs per node: also answer the fewest whole nodes on which the classes fit (not the
    /// fewest GPUs rounded up: memory is not monotone in the GPU count, so that multiple may
    /// not fit while a larger one does).
    #[arg(long, allow_hyphen_values = true, value_name = "G")]
    gpus_per_node: Option<Box<str>>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Exit status 1 when the configuration does not fit, or when it is a what-if the layer
    /// cannot run (--weight-dtype f16/bf16, --logits fused); the table or JSON is printed as
    /// usual. Without --check the status is 0 whatever the verdict; bad input is 2 either way.
    #[arg(long)]
    check: bool,
    /// Sweep class counts FROM..TO (e.g. 100K..100M): per-GPU memory for model parallel,
    /// Partial FC at r, and fused logits.
    #[arg(long, value_name = "FROM..TO")]
    sweep: Option<Box<str>>,
    /// Draw the sweep as an SVG (without --sweep: a range around the upper bound).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

/// The layer stores its optimizer state in f32 or bf16 (f16 would flush small momenta to zero).
#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerArg {
    None,
    SgdMomentum,
    Adamw,
}

#[derive(Clone, Copy, ValueEnum)]
enum UpdateArg {
    Sparse,
    Dense,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogitsArg {
    Materialized,
    Fused,
}

impl DtypeArg {
    fn dtype(self) -> Dtype {
        match self {
            DtypeArg::F32 => Dtype::F32,
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::Bf16 => Dtype::Bf16,
        }
    }

    fn gemm_precision(self) -> GemmPrecision {
        match self {
            DtypeArg::F32 => GemmPrecision::F32,
            DtypeArg::F16 => GemmPrecision::F16,
            DtypeArg::Bf16 => GemmPrecision::Bf16,
        }
    }
}

/// The flag a library parameter name comes from.
fn flag_of(name: &str) -> String {
    match name {
        "batch" | "batch_per_gpu" => "--batch".into(),
        "sweep points" => "--sweep".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// One line naming the flag for a typed error of the library.
fn message(err: PfcError) -> String {
    match err {
        PfcError::Param {
            name,
            value,
            reason,
        } => format!("{}: invalid value '{value}': {reason}", flag_of(name)),
        other => other.to_string(),
    }
}

/// The configuration to plan, and the passes per step (`--accumulate`) it was sized for.
fn config_of(args: &PlanArgs) -> Result<(PlanConfig, u64), PfcError> {
    let sample_rate: f64 = args.sample_rate.trim().parse().map_err(|_| {
        PfcError::param(
            "sample_rate",
            &args.sample_rate,
            "not a number (expected e.g. 0.1)",
        )
    })?;
    let (batch, passes) = (parse_count("batch", &args.batch)?, accumulate_of(args)?);
    if batch % passes != 0 {
        return Err(PfcError::param(
            "accumulate",
            passes,
            format!("--batch {batch} must be a multiple of it (whole passes)"),
        ));
    }
    let config = PlanConfig {
        classes: parse_count("classes", &args.classes)?,
        gpus: parse_count("gpus", &args.gpus)?,
        batch_per_gpu: batch / passes,
        dim: parse_count("dim", &args.dim)?,
        sample_rate,
        gpu_memory: parse_gpu_memory(&args.gpu_memory)?,
        reserved: parse_reserved(&args.reserved)?,
        weight_dtype: args.weight_dtype.dtype(),
        optimizer: match args.optimizer {
            OptimizerArg::None => Optimizer::None,
            OptimizerArg::SgdMomentum => Optimizer::SgdMomentum,
            OptimizerArg::Adamw => Optimizer::AdamW,
        },
        state_dtype: match args.state_dtype {
            StateArg::F32 => Dtype::F32,
            StateArg::Bf16 => Dtype::Bf16,
        },
        update: match args.update {
            // The passes' sum is a dense gradient (see `--accumulate`).
            Some(UpdateArg::Sparse) if passes > 1 => {
                return Err(PfcError::param(
                    "update",
                    "sparse",
                    format!(
                        "--accumulate {passes} needs the dense update (the passes draw different \
                         samples)"
                    ),
                ))
            }
            None | Some(UpdateArg::Sparse) if passes == 1 => UpdateMode::Sparse,
            _ => UpdateMode::Dense,
        },
        logits: match args.logits {
            LogitsArg::Materialized => LogitsMode::Materialized,
            LogitsArg::Fused => LogitsMode::Fused,
        },
        wire_dtype: args.wire_dtype.dtype(),
        grad_wire_dtype: args.grad_wire_dtype.dtype(),
        hard_negatives: args.hard_negatives,
        gemm_precision: args.gemm_precision.gemm_precision(),
    };
    config.validate()?;
    Ok((config, passes))
}

/// `--reserved`: a size, where a bare number other than 0 under 1 MiB is refused as a forgotten
/// unit (as `--gpu-memory`'s).
fn parse_reserved(text: &str) -> Result<u64, PfcError> {
    let bytes = parse_size("reserved", text)?;
    if bytes == 0 {
        return Ok(0);
    }
    refuse_forgotten_unit("reserved", text, bytes, "no reserve")
}

/// A size typed as a bare number under 1 MiB is refused as a forgotten unit: `20` is 20 bytes,
/// which no one means for a GPU or a reserve (`what` says which, e.g. "no GPU").
fn refuse_forgotten_unit(
    name: &'static str,
    text: &str,
    bytes: u64,
    what: &str,
) -> Result<u64, PfcError> {
    let unitless = text
        .trim()
        .chars()
        .all(|c| c.is_ascii_digit() || c == '_' || c == '.');
    if unitless && bytes < 1 << 20 {
        return Err(PfcError::param(
            name,
            text,
            format!(
                "{bytes} bytes is {what}: a number without a unit is bytes (did you mean {}GiB?)",
                text.trim()
            ),
        ));
    }
    Ok(bytes)
}

/// `--accumulate`: passes per step, at least 1.
fn accumulate_of(args: &PlanArgs) -> Result<u64, PfcError> {
    match parse_count("accumulate", &args.accumulate)? {
        0 => Err(PfcError::param("accumulate", 0, "must be at least 1")),
        passes => Ok(passes),
    }
}

/// `--gpu-memory`: a size, where a bare number under 1 MiB is refused as a forgotten unit
/// (`--gpu-memory 32` is 32 bytes, which no one means).
fn parse_gpu_memory(text: &str) -> Result<u64, PfcError> {
    let bytes = parse_size("gpu_memory", text)?;
    refuse_forgotten_unit("gpu_memory", text, bytes, "no GPU")
}

/// The class range of the sweep: the user's, or from the GPU count up to twice the largest of
/// the target and the upper bound.
fn sweep_range(args: &PlanArgs, plan: &Plan) -> Result<Option<(u64, u64)>, PfcError> {
    if let Some(text) = &args.sweep {
        let (from, to) = text.split_once("..").ok_or_else(|| {
            PfcError::param("sweep", text, "expected a range FROM..TO, e.g. 100K..100M")
        })?;
        return Ok(Some((
            parse_count("sweep", from)?,
            parse_count("sweep", to)?,
        )));
    }
    if args.plot.is_none() {
        return Ok(None);
    }
    let top = plan
        .upper_bound
        .map_or(plan.max_classes, |u| u.classes)
        .max(plan.config.classes)
        .saturating_mul(2);
    let from = (top / 1000).max(plan.config.gpus).max(1);
    Ok(Some((from, top.max(from + 1))))
}

/// Runs `pfc plan`: success, or with `--check` exit status 1 when the configuration does not
/// fit.
pub fn run(args: PlanArgs) -> Result<ExitCode, String> {
    if let Some(path) = &args.plot {
        // A plot is rewritten run after run, but never over a checkpoint shard, a folder or a
        // device: checked before any work.
        refuse_unsafe_output("--plot", path, &[], Existing::Replace)?;
    }
    let (config, passes) = config_of(&args).map_err(message)?;
    let per_node = match &args.gpus_per_node {
        None => None,
        Some(text) => match parse_count("gpus_per_node", text).map_err(message)? {
            0 => {
                return Err(message(PfcError::param(
                    "gpus_per_node",
                    0,
                    "must be at least 1",
                )))
            }
            g => Some(g),
        },
    };
    // (fewest nodes, GPUs a node)
    let nodes = per_node.map(|g| (config.min_nodes_for(config.classes, g), g));
    let plan = Plan::new(config).map_err(message)?;
    let what_ifs = what_ifs(&config);
    let unit_note = decimal_unit_note(&args.gpu_memory, config.gpu_memory);
    let points = match sweep_range(&args, &plan).map_err(message)? {
        Some((from, to)) => Some(sweep(&config, from, to, SWEEP_POINTS).map_err(message)?),
        None => None,
    };
    if let (Some(path), Some(points)) = (&args.plot, &points) {
        plot_svg(path, &config, points).map_err(message)?;
    }
    if args.json {
        let mut json = plan.to_json();
        json["what_ifs"] = what_ifs.iter().map(|w| w.flag).collect();
        // `batch_per_gpu` above is a pass's; the step's is that times the passes.
        json["accumulate"] = passes.into();
        if let Some((n, g)) = nodes {
            json["gpus_per_node"] = g.into();
            json["min_nodes"] = n.into();
        }
        if let Some(points) = &points {
            json["sweep"] = sweep_json(points);
        }
        println!("{json}");
        // stdout stays one JSON object; the note is for the person who typed the unit
        if let Some(note) = &unit_note {
            eprintln!("{note}");
        }
    } else {
        print_table(&plan, unit_note.as_deref(), passes);
        if let Some(points) = &points {
            print_sweep(&config, points);
        }
        if let Some((n, g)) = nodes {
            let node_size = plural(g, "GPU", "GPUs");
            match n {
                Some(n) => println!(
                    "fewest nodes of {node_size} for {}: {} ({})",
                    given_classes(plan.config.classes),
                    n,
                    plural(n * g, "GPU", "GPUs")
                ),
                None => println!(
                    "fewest nodes of {node_size} for {}: none (no whole number of nodes fits)",
                    given_classes(plan.config.classes)
                ),
            }
        }
        println!("{}", verdict(&plan));
        for note in verdict_notes(&plan, &what_ifs) {
            println!("{note}");
        }
    }
    if let Some(path) = &args.plot {
        if !args.json {
            println!("plot written to {}", path.display());
        }
    }
    Ok(if args.check && (!plan.fits || !what_ifs.is_empty()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// An option value the planner sizes but the layer cannot run.
struct WhatIf {
    /// The option as typed, e.g. `--logits fused`.
    flag: &'static str,
    /// Why the layer cannot run it.
    why: &'static str,
}

/// The what-ifs of `config`, in the order of `--help`.
fn what_ifs(config: &PlanConfig) -> Vec<WhatIf> {
    let mut found = Vec::new();
    match config.weight_dtype {
        Dtype::F32 => {}
        Dtype::F16 => found.push(WhatIf {
            flag: "--weight-dtype f16",
            why: "it keeps f32 master weights",
        }),
        Dtype::Bf16 => found.push(WhatIf {
            flag: "--weight-dtype bf16",
            why: "it keeps f32 master weights",
        }),
    }
    if config.logits == LogitsMode::Fused {
        found.push(WhatIf {
            flag: "--logits fused",
            why: "not implemented yet",
        });
    }
    found
}

/// The lines under the verdict: that `--reserved 0` counts the FC layer alone (when it fits:
/// otherwise more reserve changes nothing), and which options the layer cannot run.
fn verdict_notes(plan: &Plan, what_ifs: &[WhatIf]) -> Vec<String> {
    let mut notes = Vec::new();
    if plan.fits && plan.config.reserved == 0 {
        notes.push(
            "note: the FC layer alone (--reserved 0): add the backbone, its activations and the \
             framework with --reserved SIZE"
                .to_string(),
        );
    }
    if !what_ifs.is_empty() {
        let each: Vec<String> = what_ifs
            .iter()
            .map(|w| format!("{} ({})", w.flag, w.why))
            .collect();
        notes.push(format!(
            "note: a what-if: the layer cannot run {}",
            each.join(" or ")
        ));
    }
    notes
}

/// When `--gpu-memory` was given in a decimal unit (`80GB`, `11G`): the size in GiB, and the
/// binary spelling of the same number, which is what a card sold as "80GB" holds.
fn decimal_unit_note(text: &str, bytes: u64) -> Option<String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = (t[..split].trim(), t[split..].trim());
    let (letter, power, binary) = match unit.to_ascii_lowercase().as_str() {
        "k" | "kb" => ('K', "10³", "KiB"),
        "m" | "mb" => ('M', "10⁶", "MiB"),
        "g" | "gb" => ('G', "10⁹", "GiB"),
        "t" | "tb" => ('T', "10¹²", "TiB"),
        "p" | "pb" => ('P', "10¹⁵", "PiB"),
        "e" | "eb" => ('E', "10¹⁸", "EiB"),
        _ => return None, // bytes, or already binary
    };
    Some(format!(
        "note: --gpu-memory {t} is {number}·{power} bytes = {}; a GPU sold as \"{number}{letter}B\" \
         holds {number} {binary}: write {number}{binary}",
        format_bytes(bytes)
    ))
}

/// `count` classes as the user could have typed them: `29M classes`, or every digit when a
/// suffix would cut some (`100001 classes`).
fn given_classes(count: u64) -> String {
    let short = format_count(count);
    let shown = if parse_count("classes", &short).ok() == Some(count) {
        short
    } else {
        count.to_string()
    };
    format!("{shown} {}", if count == 1 { "class" } else { "classes" })
}

/// A count that the planner found, to four digits, and the exact count in parentheses when
/// digits were cut: `29M` and nothing, `55.81M` and ` (55812928)`.
fn found_count(count: u64) -> (String, String) {
    let short = format_count(count);
    if parse_count("classes", &short).ok() == Some(count) {
        (short, String::new())
    } else {
        (short, format!(" ({count})"))
    }
}

fn print_table(plan: &Plan, unit_note: Option<&str>, passes: u64) {
    let c = &plan.config;
    let batch = if passes > 1 {
        format!(
            "{} images/GPU in {passes} passes of {} (gradient accumulation: dense update)",
            c.batch_per_gpu * passes,
            c.batch_per_gpu
        )
    } else {
        format!("{} images/GPU", c.batch_per_gpu)
    };
    println!(
        "{} on {} of {}, {batch}, d = {}, r = {}",
        given_classes(c.classes),
        plural(c.gpus, "GPU", "GPUs"),
        format_bytes(c.gpu_memory),
        c.dim,
        c.sample_rate
    );
    if let Some(note) = unit_note {
        println!("{note}");
    }
    let name = |d: Dtype| match d {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
    };
    let state = match c.optimizer {
        Optimizer::None => "no optimizer state".to_string(),
        Optimizer::SgdMomentum => format!("SGD momentum in {}", name(c.state_dtype)),
        Optimizer::AdamW => format!("AdamW moments in {}", name(c.state_dtype)),
    };
    let logits = if c.gemm_precision == GemmPrecision::F32 {
        ""
    } else {
        " (16-bit logits)"
    };
    let update = match c.update {
        UpdateMode::Sparse => "sparse",
        UpdateMode::Dense => "dense",
    };
    println!(
        "weights {}, {state}, {} GEMMs{logits}, {} wire, {} gradient wire, {update} update",
        name(c.weight_dtype),
        c.gemm_precision,
        name(c.wire_dtype),
        name(c.grad_wire_dtype),
    );
    println!(
        "rank 0 holds {} and samples up to {} per {}",
        plural(plan.shard_classes, "class", "classes"),
        plan.sampled_classes,
        if passes > 1 { "pass" } else { "step" }
    );
    println!();
    println!("{:<24} {:>12} {:>8}", "component", "bytes", "device");
    let share = |b: u64| 100.0 * b as f64 / c.gpu_memory as f64;
    for (component, bytes) in &plan.components {
        if *bytes > 0 {
            println!(
                "{:<24} {:>12} {:>7.2}%",
                component.name(),
                format_bytes(*bytes),
                share(*bytes)
            );
        }
    }
    println!(
        "{:<24} {:>12} {:>7.2}%",
        "total",
        format_bytes(plan.total_bytes),
        share(plan.total_bytes)
    );
    println!();
    let (largest, exact) = found_count(plan.max_classes);
    println!(
        "largest class count on {}: {largest}{exact}",
        plural(c.gpus, "GPU", "GPUs")
    );
    match plan.upper_bound {
        Some(u) if u.classes == 0 => {
            println!(
                "upper bound over cluster sizes: none (not one class fits on any number of GPUs)"
            )
        }
        Some(u) => {
            let (bound, exact) = found_count(u.classes);
            println!(
                "upper bound over cluster sizes: {bound} {}{exact}, first reached at {}",
                if u.classes == 1 { "class" } else { "classes" },
                plural(u.gpus, "GPU", "GPUs")
            )
        }
        None => println!("upper bound over cluster sizes: none below 2^32 GPUs"),
    }
    match plan.min_gpus {
        Some(k) => println!("fewest GPUs for {}: {k}", given_classes(c.classes)),
        None => println!(
            "fewest GPUs for {}: none (above the upper bound)",
            given_classes(c.classes)
        ),
    }
    match plan.max_sample_rate {
        // floored, so that the rate shown fits (rounding 0.12345 up to 0.1235 would not)
        Some(r) => println!(
            "largest sample rate that fits: {:.4}",
            (r * 1e4).floor() / 1e4
        ),
        None => println!("largest sample rate that fits: none (not even positives only)"),
    }
}

fn verdict(plan: &Plan) -> String {
    let c = &plan.config;
    let used = format!(
        "{} of {} per GPU ({:.1}%)",
        format_bytes(plan.total_bytes),
        format_bytes(c.gpu_memory),
        100.0 * plan.total_bytes as f64 / c.gpu_memory as f64
    );
    if plan.fits {
        format!("verdict: FITS, {used}")
    } else {
        // The rounded figures may read 100.0%: say by how much it misses.
        let over = plan.total_bytes.saturating_sub(c.gpu_memory);
        format!("verdict: DOES NOT FIT, {used}, {} over", format_bytes(over))
    }
}

fn print_sweep(config: &PlanConfig, points: &[SweepPoint]) {
    println!();
    let labels = Regime::ALL.map(|r| r.label(config.sample_rate));
    println!(
        "{:>12} {:>28} {:>28} {:>36}",
        "classes", labels[0], labels[1], labels[2]
    );
    let cell = |b: Option<u64>| b.map_or_else(|| "-".to_string(), format_bytes);
    for p in points {
        println!(
            "{:>12} {:>28} {:>28} {:>36}",
            format_count(p.classes),
            cell(p.bytes[0]),
            cell(p.bytes[1]),
            cell(p.bytes[2])
        );
    }
    if points.iter().any(|p| p.bytes.iter().any(Option::is_none)) {
        println!("(-: no plan: fewer classes than GPUs, or more per GPU than the planner's limit)");
    }
    println!();
}

fn sweep_json(points: &[SweepPoint]) -> serde_json::Value {
    points
        .iter()
        .map(|p| {
            serde_json::json!({
                "classes": p.classes,
                "model_parallel_bytes": p.bytes[0],
                "partial_fc_bytes": p.bytes[1],
                "fused_bytes": p.bytes[2],
            })
        })
        .collect()
}
