//! Partial FC over several GPUs and nodes: one process per GPU, NCCL between them.
//!
//! Launched by torchrun-style environment variables (RANK, WORLD_SIZE, LOCAL_RANK or
//! LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), set by your own launcher or by this example's:
//!
//! ```text
//! cargo run --release --features cuda --example multi_gpu -- --launch 8          # 8 GPUs, this node
//! RANK=3 WORLD_SIZE=16 LOCAL_RANK=3 MASTER_ADDR=node0 MASTER_PORT=29500 \
//!     target/release/examples/multi_gpu                                           # one rank of 16
//! ```
//!
//! Options (`--help`): `--classes C` (1M; `29M` and the like are read as `pfc plan` reads them),
//! `--steps` (5), `--batch N` per rank (128), `--sample-rate r` (0.1), and the memory/bandwidth
//! options `--precision f32|bf16|f16`, `--momentum-dtype f32|bf16`, `--wire-dtype f32|bf16|f16`,
//! `--grad-wire-dtype f32|bf16|f16` (all f32 by default). An unknown option or a bad value is an
//! error (exit 2) before any GPU is touched.
//!
//! Rank 0 creates the NCCL id and serves it over TCP on MASTER_PORT (every interface, unless
//! MASTER_ADDR is a loopback address) to the ranks with the job's run id (`PFC_RUN_ID`, else
//! torchrun's `TORCHELASTIC_RUN_ID`; `--launch` makes a fresh one unless `PFC_RUN_ID` is set);
//! each rank opens GPU LOCAL_RANK (without it,
//! RANK % LOCAL_WORLD_SIZE), builds its shard of the classifier, and trains a few steps on synthetic
//! embeddings, printing the (identical) loss on rank 0. The launcher also makes NCCL findable when
//! only `libnccl.so.2` is installed (see `partial_fc::cuda::nccl::link_nccl`).

#[cfg(feature = "cuda")]
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multi_gpu: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!(
        "multi_gpu needs the CUDA backend: cargo run --release --features cuda --example multi_gpu"
    );
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
/// The example's options (`--help` lists them).
#[derive(clap::Parser, Debug)]
#[command(about = "Partial FC over several GPUs: one process per GPU, NCCL between them")]
struct Args {
    /// Start this many ranks on this node (GPUs 0..K) with the torchrun variables set, and wait.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u16).range(1..))]
    launch: Option<u16>,
    /// Total classes C (e.g. 1M, 29M, 100000).
    #[arg(long, default_value = "1M", value_parser = parse_classes)]
    classes: u64,
    /// Training steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Embeddings per rank per step, N.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Sample rate r in [0, 1].
    #[arg(long, default_value_t = 0.1)]
    sample_rate: f64,
    /// GEMM operand precision.
    #[arg(long, value_enum, default_value_t = Wide::F32)]
    precision: Wide,
    /// Optimizer of the class centers (SGD at lr 0.1, or AdamW at lr 0.001).
    #[arg(long, value_enum, default_value_t = OptimizerArg::Sgd)]
    optimizer: OptimizerArg,
    /// Dtype of the optimizer state (f16 is refused: it would flush small values).
    #[arg(long, value_enum, default_value_t = Wide::F32)]
    momentum_dtype: Wide,
    /// Dtype of the all-gathered embeddings on the wire.
    #[arg(long, value_enum, default_value_t = Wide::F32)]
    wire_dtype: Wide,
    /// Dtype of the embedding gradient on the reduce-scatter.
    #[arg(long, value_enum, default_value_t = Wide::F32)]
    grad_wire_dtype: Wide,
}

#[cfg(feature = "cuda")]
/// f32 or one of the 16-bit types, as the options spell them.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Wide {
    F32,
    Bf16,
    F16,
}

#[cfg(feature = "cuda")]
/// The optimizer of the class centers.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum OptimizerArg {
    Sgd,
    Adamw,
}

#[cfg(feature = "cuda")]
fn parse_classes(text: &str) -> Result<u64, String> {
    partial_fc::plan::units::parse_count("classes", text).map_err(|e| e.to_string())
}

#[cfg(feature = "cuda")]
impl Args {
    /// The options again as arguments, without `--launch`: what each launched rank gets.
    fn for_a_rank(&self) -> Vec<String> {
        let name = |w: Wide| format!("{w:?}").to_lowercase();
        [
            ("--classes", self.classes.to_string()),
            ("--steps", self.steps.to_string()),
            ("--batch", self.batch.to_string()),
            ("--sample-rate", self.sample_rate.to_string()),
            ("--precision", name(self.precision)),
            (
                "--optimizer",
                format!("{:?}", self.optimizer).to_lowercase(),
            ),
            ("--momentum-dtype", name(self.momentum_dtype)),
            ("--wire-dtype", name(self.wire_dtype)),
            ("--grad-wire-dtype", name(self.grad_wire_dtype)),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
    }
}

#[cfg(feature = "cuda")]
fn run() -> Result<(), String> {
    use clap::Parser;
    use partial_fc::plan::Dtype;
    use partial_fc::rendezvous::{LaunchEnv, Rendezvous};
    let args = Args::parse();
    if let Some(k) = args.launch {
        return launch(usize::from(k), &args.for_a_rank());
    }
    let env = LaunchEnv::from_env().map_err(|e| e.to_string())?;
    let (classes, steps, batch) = (args.classes, args.steps, args.batch as usize);
    let dtype = |w: Wide| match w {
        Wide::F32 => Dtype::F32,
        Wide::Bf16 => Dtype::Bf16,
        Wide::F16 => Dtype::F16,
    };
    let dim = 512usize;

    let gpu = partial_fc::cuda::CudaBackend::new(env.local_rank).map_err(|e| e.to_string())?;
    let rendezvous = Rendezvous::Tcp {
        addr: format!("{}:{}", env.master_addr, env.master_port),
        timeout: std::time::Duration::from_secs(120),
        run_id: Some(env.run_id.clone()),
    };
    let id = rendezvous
        .exchange(
            env.rank,
            env.world_size,
            partial_fc::cuda::nccl::new_unique_id,
        )
        .map_err(|e| e.to_string())?;
    let comm = partial_fc::cuda::nccl::NcclCollective::new(
        &gpu,
        env.rank,
        env.world_size,
        id,
        Some(std::time::Duration::from_secs(300)),
    )
    .map_err(|e| e.to_string())?;
    let mut cfg = partial_fc::LayerConfig::new(classes, dim, batch);
    cfg.sample_rate = args.sample_rate;
    // The memory and bandwidth options (docs/cuda.md, docs/distributed.md).
    cfg.wire = dtype(args.wire_dtype);
    cfg.grad_wire = dtype(args.grad_wire_dtype);
    cfg.precision = match args.precision {
        Wide::F32 => partial_fc::GemmPrecision::F32,
        Wide::Bf16 => partial_fc::GemmPrecision::Bf16,
        Wide::F16 => partial_fc::GemmPrecision::F16,
    };
    let lr = match args.optimizer {
        OptimizerArg::Sgd => 0.1,
        OptimizerArg::Adamw => {
            cfg.optimizer = Some(partial_fc::AdamW::default().into());
            1e-3
        }
    };
    if let Some(optimizer) = cfg.optimizer.as_mut() {
        optimizer.set_state_dtype(match args.momentum_dtype {
            Wide::F32 => partial_fc::StateDtype::F32,
            Wide::Bf16 => partial_fc::StateDtype::Bf16,
            Wide::F16 => {
                return Err("--momentum-dtype: f32 or bf16 (f16 would flush small momenta)".into())
            }
        });
    }
    // Which kind of communicator NCCL gave (a timeout asks for a non-blocking one from 2.14 on;
    // NCCL_COMM_BLOCKING overrides it): the log of a run says which path ran.
    let nccl = format!(
        "NCCL {}, {} communicator",
        partial_fc::cuda::nccl::nccl_version().map_err(|e| e.to_string())?,
        if comm.is_nonblocking() {
            "non-blocking"
        } else {
            "blocking"
        }
    );
    let mut layer = partial_fc::PartialFc::new(cfg, gpu, comm).map_err(|e| e.to_string())?;
    let bytes: u64 = layer.memory_report().iter().map(|(_, b)| b).sum();
    let shard = layer.shard();
    println!(
        "rank {} of {} on GPU {} ({}): classes [{}, {}), layer buffers {:.1} MiB; {nccl}",
        env.rank,
        env.world_size,
        env.local_rank,
        layer.backend().device_name(),
        shard.start,
        shard.end(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    for step in 0..steps {
        // Synthetic embeddings and labels, different per rank and step.
        let seed = (step * env.world_size + env.rank) as u64;
        let x = partial_fc::init::normal_rows(seed, 0, batch, dim, 1.0);
        let labels: Vec<i64> = (0..batch as u64)
            .map(|i| ((seed * 7919 + i * 104_729) % classes) as i64)
            .collect();
        let t = std::time::Instant::now();
        let out = layer
            .forward_backward(&x, &labels)
            .map_err(|e| e.to_string())?;
        layer.step(lr).map_err(|e| e.to_string())?;
        if env.rank == 0 {
            println!(
                "step {step}: loss {:.4}  {:.2} ms",
                out.loss,
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}

/// Starts `k` copies of this program on this node with the torchrun variables set, and waits.
#[cfg(feature = "cuda")]
fn launch(k: usize, rest: &[String]) -> Result<(), String> {
    use partial_fc::cuda::nccl::{find_nccl_so2, link_nccl, nccl_available};
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    // Kept until the children have exited.
    let mut link_dir = None;
    if nccl_available().is_err() {
        // cudarc opens libnccl.so; a runtime install ships libnccl.so.2. Link it where the
        // children will look (a process cannot change its own search path, its children can),
        // in a fresh folder of this launch's own: a shared fixed path could hold anyone's link.
        if let Some(so2) = find_nccl_so2() {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            link_nccl(&so2, dir.path()).map_err(|e| e.to_string())?;
            ld = if ld.is_empty() {
                dir.path().display().to_string()
            } else {
                format!("{}:{ld}", dir.path().display())
            };
            link_dir = Some(dir);
        }
    }
    let port = std::env::var("MASTER_PORT").unwrap_or_else(|_| "29500".into());
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    // The job's token for the TCP rendezvous: the caller's PFC_RUN_ID, else one of this launch's
    // own, so that two launches on one MASTER_PORT cannot take each other's NCCL id.
    let run_id = match std::env::var("PFC_RUN_ID") {
        Ok(id) if !id.is_empty() => id,
        _ => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("multi-gpu-{}-{nanos:x}", std::process::id())
        }
    };
    partial_fc::rendezvous::RunId::new(run_id.as_str()).map_err(|e| e.to_string())?;
    let children: Vec<_> = (0..k)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args(rest)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", k.to_string())
                .env("MASTER_ADDR", &addr)
                .env("MASTER_PORT", &port)
                .env("PFC_RUN_ID", &run_id)
                .env("LD_LIBRARY_PATH", &ld)
                .spawn()
                .map_err(|e| format!("starting rank {rank}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            failed.push(rank);
        }
    }
    drop(link_dir);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("ranks {failed:?} failed"))
    }
}
