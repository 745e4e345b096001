//! NCCL and virtual ranks on a GPU, against the CPU reference: NCCL with world size 1; k ranks on
//! one device through the host-staged collective (the distributed softmax, all-gather and
//! reduce-scatter paths on the real kernels); and two NCCL ranks on one GPU where the installed
//! NCCL allows it. Every test prints why it is skipped where it cannot run.

/// Prints past the test harness's output capture (which only intercepts the print macros),
/// so a skipped test says so in a plain `cargo test` run.
macro_rules! skip {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use partial_fc::collective::{HostStaged, SingleRank, ThreadGroup};
use partial_fc::cuda::nccl::{nccl_available, nccl_version, new_unique_id, NcclCollective};
use partial_fc::cuda::CudaBackend;
use partial_fc::plan::Dtype;
use partial_fc::{Backend, Collective, CpuBackend, LayerConfig, Margin, PartialFc};
use std::time::Duration;

const CLASSES: u64 = 5003;
const DIM: usize = 64;
const BATCH: usize = 48;

mod cuda_device;
use cuda_device::gpu;

fn config(world: usize, rate: f64) -> LayerConfig {
    config_wire(world, rate, Dtype::F32)
}

fn config_wire(world: usize, rate: f64, wire: Dtype) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH.div_ceil(world));
    cfg.sample_rate = rate;
    cfg.margin = Margin::arcface();
    cfg.wire = wire;
    cfg
}

/// An f32 all-gather wire and the embedding gradient reduce-scattered in `grad_wire`.
fn config_grad_wire(world: usize, rate: f64, grad_wire: Dtype) -> LayerConfig {
    let mut cfg = config(world, rate);
    cfg.grad_wire = grad_wire;
    cfg
}

fn data() -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(21, 0, BATCH, DIM, 1.0);
    let labels = (0..BATCH as i64)
        .map(|i| (i * 131 + 7) % CLASSES as i64)
        .collect();
    (x, labels)
}

/// Two steps (forward, backward, SGD) of one rank: losses, last embedding gradient, weights.
type RankRun = (Vec<f32>, Vec<f32>, Vec<f32>);

fn two_steps<B: partial_fc::Backend, C: Collective<B>>(
    layer: &mut PartialFc<B, C>,
    world: usize,
    rank: usize,
) -> RankRun {
    let (x, labels) = data();
    let rows = partial_fc::Shard::of(BATCH as u64, world, rank);
    let (r0, r1) = (rows.start as usize, rows.end() as usize);
    let mut losses = Vec::new();
    let mut gx = Vec::new();
    for _ in 0..2 {
        let out = layer
            .forward_backward(&x[r0 * DIM..r1 * DIM], &labels[r0..r1])
            .unwrap();
        layer.step(0.2).unwrap();
        losses.push(out.loss);
        gx = out.grad_embeddings;
    }
    (losses, gx, layer.weight().unwrap())
}

fn concat(parts: Vec<RankRun>) -> RankRun {
    let losses = parts[0].0.clone();
    let gx = parts.iter().flat_map(|p| p.1.clone()).collect();
    let w = parts.iter().flat_map(|p| p.2.clone()).collect();
    (losses, gx, w)
}

fn cpu_run(world: usize, rate: f64) -> RankRun {
    cpu_run_wire(world, rate, Dtype::F32)
}

fn cpu_run_wire(world: usize, rate: f64, wire: Dtype) -> RankRun {
    concat(ThreadGroup::run(world, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config_wire(world, rate, wire), CpuBackend, comm).unwrap();
        two_steps(&mut layer, world, rank)
    }))
}

fn assert_close(what: &str, got: &RankRun, want: &RankRun) {
    let check = |name: &str, a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len(), "{what} {name}");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 + 1e-4 * y.abs().max(scale * 1e-2),
                "{what} {name}[{i}]: gpu {x} cpu {y}"
            );
        }
    };
    check("loss", &got.0, &want.0);
    check("grad_embeddings", &got.1, &want.1);
    check("weights", &got.2, &want.2);
    println!("{what}: matches the CPU (losses {:?})", got.0);
}

#[test]
fn nccl_world_size_one_matches_cpu() {
    let Some(g) = gpu() else { return };
    if let Err(e) = nccl_available() {
        skip!("skipped: {e}");
        return;
    }
    println!("NCCL version {}", nccl_version().unwrap());
    let comm = NcclCollective::new(
        &g,
        0,
        1,
        new_unique_id().unwrap(),
        Some(Duration::from_secs(60)),
    )
    .unwrap();
    let mut layer = PartialFc::new(config(1, 0.1), g, comm).unwrap();
    let got = two_steps(&mut layer, 1, 0);
    assert_close("NCCL, 1 rank", &got, &cpu_run(1, 0.1));
    // The collective also agrees with the single-rank one on the GPU.
    let mut single = PartialFc::new(config(1, 0.1), gpu().unwrap(), SingleRank).unwrap();
    assert_close(
        "GPU SingleRank",
        &two_steps(&mut single, 1, 0),
        &cpu_run(1, 0.1),
    );
}

#[test]
fn virtual_ranks_on_one_gpu_match_cpu() {
    if gpu().is_none() {
        return;
    }
    for world in [2, 3, 4] {
        // r = 1: every rank's sample is its whole shard, so k GPU ranks must equal k CPU ranks
        // and one CPU rank alike.
        let got = concat(ThreadGroup::run(world, |comm| {
            let rank = comm.rank();
            let g = CudaBackend::new(0).unwrap();
            let mut layer = PartialFc::new(config(world, 1.0), g, HostStaged::new(comm)).unwrap();
            two_steps(&mut layer, world, rank)
        }));
        assert_close(
            &format!("{world} virtual ranks, r = 1"),
            &got,
            &cpu_run(world, 1.0),
        );
        assert_close(
            &format!("{world} virtual ranks vs 1 CPU rank"),
            &got,
            &cpu_run(1, 1.0),
        );
        // r = 0.1: the same sample on both backends, rank by rank.
        let got = concat(ThreadGroup::run(world, |comm| {
            let rank = comm.rank();
            let g = CudaBackend::new(0).unwrap();
            let mut layer = PartialFc::new(config(world, 0.1), g, HostStaged::new(comm)).unwrap();
            two_steps(&mut layer, world, rank)
        }));
        assert_close(
            &format!("{world} virtual ranks, r = 0.1"),
            &got,
            &cpu_run(world, 0.1),
        );
    }
}

/// Runs `world` NCCL ranks as threads on device 0, each with the layer `config(world)`; `None`
/// (with the reason printed) where the installed NCCL cannot put several ranks on one GPU.
fn nccl_ranks(world: usize, config: impl Fn(usize) -> LayerConfig + Sync) -> Option<RankRun> {
    nccl_ranks_with(world, config, Some(Duration::from_secs(60)))
}

/// [`nccl_ranks`] with the communicators' timeout: `None` makes them blocking ones (a
/// communicator with a timeout is non-blocking from NCCL 2.14 on, and the emulator's is 2.30).
fn nccl_ranks_with(
    world: usize,
    config: impl Fn(usize) -> LayerConfig + Sync,
    timeout: Option<Duration>,
) -> Option<RankRun> {
    if !several_ranks_fit_on_one_gpu() {
        return None;
    }
    let id = new_unique_id().unwrap();
    let config = &config;
    let got = std::thread::scope(|s| {
        let joins: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let g = CudaBackend::new(0).unwrap();
                    let comm = NcclCollective::new(&g, rank, world, id, timeout)?;
                    assert_eq!(comm.is_nonblocking(), timeout.is_some());
                    let mut layer = PartialFc::new(config(world), g, comm)?;
                    Ok::<_, partial_fc::PfcError>(two_steps(&mut layer, world, rank))
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap())
            .collect::<Result<Vec<_>, _>>()
    });
    match got {
        Ok(parts) => Some(concat(parts)),
        Err(e) => {
            // The emulator's NCCL exists to test this wrapper: nothing may be refused there.
            assert!(
                !cuda_device::on_emulator(),
                "{world} emulated NCCL ranks: {e}"
            );
            skip!(
                "skipped: NCCL {} refused {world} ranks on one GPU: {e}",
                nccl_version().unwrap_or(0)
            );
            None
        }
    }
}

/// Several NCCL ranks on one GPU (NCCL 2.30+, or the emulator's NCCL), f32 and bf16 embedding
/// wires, against the same number of CPU ranks.
#[test]
fn nccl_ranks_on_one_gpu() {
    if gpu().is_none() {
        return;
    }
    for world in [2, 3] {
        let Some(got) = nccl_ranks(world, |w| config(w, 0.1)) else {
            return;
        };
        assert_close(
            &format!("{world} NCCL ranks on one GPU"),
            &got,
            &cpu_run(world, 0.1),
        );
        // Blocking communicators (no timeout): the calls that make the connections wait inside
        // NCCL for every peer, instead of returning to be polled.
        let Some(got) = nccl_ranks_with(world, |w| config(w, 0.1), None) else {
            return;
        };
        assert_close(
            &format!("{world} blocking NCCL ranks on one GPU"),
            &got,
            &cpu_run(world, 0.1),
        );
        let Some(got) = nccl_ranks(world, |w| config_wire(w, 0.1, Dtype::Bf16)) else {
            return;
        };
        assert_close(
            &format!("{world} NCCL ranks on one GPU, bf16 wire"),
            &got,
            &cpu_run_wire(world, 0.1, Dtype::Bf16),
        );
    }
}

/// True where several NCCL ranks can share device 0 (NCCL 2.30+, or the emulator's NCCL), with
/// NCCL told so; otherwise false, after printing why the test is skipped.
fn several_ranks_fit_on_one_gpu() -> bool {
    if gpu().is_none() {
        return false;
    }
    if let Err(e) = nccl_available() {
        skip!("skipped: {e}");
        return false;
    }
    let version = nccl_version().unwrap();
    if version < 23000 {
        skip!("skipped: NCCL {version} cannot run several ranks on one GPU (2.30+ with NCCL_MULTI_RANK_GPU_ENABLE=1)");
        return false;
    }
    // Set before any NCCL communicator of these ranks exists.
    std::env::set_var("NCCL_MULTI_RANK_GPU_ENABLE", "1");
    true
}

/// Rank 0 of two makes `call` while rank 1 has joined but stays silent: the call must end with
/// a timeout error (not hang), and the next call be refused because the communicator was
/// aborted. The call is rank 0's first, whose set-up (connections, waiting for the peer's) is
/// bounded by the longer of its two timeouts (3 s, the init bound; a running collective by its
/// 300 ms). Rank 1 then makes as many calls as went through on rank 0 (none,
/// if the timeout works), so that a broken timeout fails the test instead of hanging it.
fn silent_peer_times_out(
    what: &str,
    call: impl Fn(&CudaBackend, &NcclCollective) -> partial_fc::Result<()> + Sync,
) {
    let id = new_unique_id().unwrap();
    let (gave_up, wait) = std::sync::mpsc::channel::<usize>();
    let call = &call;
    std::thread::scope(|s| {
        s.spawn(move || {
            let g = CudaBackend::new(0).unwrap();
            let comm = NcclCollective::new(&g, 1, 2, id, Some(Duration::from_secs(60))).unwrap();
            for _ in 0..wait.recv().unwrap_or(0) {
                let _ = call(&g, &comm);
            }
        });
        let g = CudaBackend::new(0).unwrap();
        let timeout = Duration::from_millis(300);
        let init = Some(Duration::from_secs(3));
        let comm = NcclCollective::with_init_timeout(&g, 0, 2, id, init, Some(timeout)).unwrap();
        // A blocking communicator would wait inside NCCL's first collective for the silent
        // peer's connections, where no timeout reaches (the emulator models NCCL's lazy
        // connections); a non-blocking one returns to be polled.
        assert!(
            comm.is_nonblocking(),
            "NCCL {} with a timeout: non-blocking",
            nccl_version().unwrap()
        );
        let start = std::time::Instant::now();
        let first = call(&g, &comm);
        let waited = start.elapsed();
        let second = call(&g, &comm);
        let went_through = [&first, &second].iter().filter(|r| r.is_ok()).count();
        gave_up.send(went_through).unwrap();
        match first {
            Err(partial_fc::PfcError::Collective(msg)) => {
                assert!(msg.contains("no progress"), "{what}: {msg}")
            }
            other => panic!("{what}: expected a timeout, got {other:?}"),
        }
        assert!(
            waited >= timeout && waited < Duration::from_secs(30),
            "{what}: gave up after {waited:?}"
        );
        match second {
            Err(partial_fc::PfcError::Collective(msg)) => {
                assert!(msg.contains("aborted"), "{what}: {msg}")
            }
            other => panic!("{what}: an aborted communicator must refuse, got {other:?}"),
        }
        println!("{what} without its peer: timed out after {waited:?}, communicator aborted");
    });
}

/// A rank whose peer never makes the collective gets an error after its timeout, with the
/// communicator aborted, instead of hanging (NCCL 2.30+ with two ranks on one GPU, or the
/// emulator's NCCL, whose collectives stay pending on the stream until every rank has called).
#[test]
fn a_missing_peer_times_out_and_aborts() {
    if !several_ranks_fit_on_one_gpu() {
        return;
    }
    silent_peer_times_out("all_reduce", |g, comm| {
        let mut buf = g.alloc::<f32>(8)?;
        comm.all_reduce_f32(g, &mut buf, 8, partial_fc::ReduceOp::Sum)
    });
}

/// Creating the communicator is bounded too: a rank whose peer never starts gets an error
/// instead of waiting in its creation forever, and its half-made communicator is aborted. The
/// peer that starts afterwards finds no one to join and gets the same error, within its own
/// bound.
#[test]
fn an_init_without_its_peer_times_out() {
    if !several_ranks_fit_on_one_gpu() {
        return;
    }
    let id = new_unique_id().unwrap();
    let g = CudaBackend::new(0).unwrap();
    let timeout = Duration::from_millis(300);
    let start = std::time::Instant::now();
    let result = NcclCollective::with_init_timeout(&g, 0, 2, id, Some(timeout), None);
    let waited = start.elapsed();
    let gave_up = |result: partial_fc::Result<NcclCollective>, waited: Duration| {
        match result {
            Err(partial_fc::PfcError::Collective(msg)) => {
                assert!(msg.contains("did not complete"), "{msg}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(
            waited >= timeout && waited < Duration::from_secs(30),
            "gave up after {waited:?}"
        );
    };
    gave_up(result, waited);
    let start = std::time::Instant::now();
    let late = NcclCollective::with_init_timeout(&g, 1, 2, id, Some(timeout), None);
    gave_up(late, start.elapsed());
    println!("init without its peer: timed out after {waited:?}");
}

/// Dropping a non-blocking communicator finalizes it under a bound: one with a collective its
/// peer never joined is aborted when the finalize has not finished within the limit, instead of
/// the drop waiting on that peer (as `ncclCommDestroy` of a blocking communicator can). The
/// peer's next call then has no partner and fails.
#[test]
fn a_drop_with_a_collective_its_peer_never_joined_is_bounded() {
    if !several_ranks_fit_on_one_gpu() {
        return;
    }
    let id = new_unique_id().unwrap();
    let limit = Duration::from_secs(3);
    let sum = partial_fc::ReduceOp::Sum;
    let (dropped, wait_for_drop) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let peer = s.spawn(move || {
            let g = CudaBackend::new(0).unwrap();
            // A collective timeout, so that its last call fails through it where the abort
            // does not reach it (NCCL's abort is local; the emulator's reaches every rank).
            let long = Some(Duration::from_secs(60));
            let short = Some(Duration::from_millis(500));
            let comm = NcclCollective::with_init_timeout(&g, 1, 2, id, long, short).unwrap();
            let mut buf = g.alloc::<f32>(8).unwrap();
            comm.all_reduce_f32(&g, &mut buf, 8, sum).unwrap();
            wait_for_drop.recv().unwrap();
            comm.all_reduce_f32(&g, &mut buf, 8, sum)
        });
        let g = CudaBackend::new(0).unwrap();
        let comm = NcclCollective::with_init_timeout(&g, 0, 2, id, Some(limit), None).unwrap();
        assert!(comm.is_nonblocking());
        let mut buf = g.alloc::<f32>(8).unwrap();
        comm.all_reduce_f32(&g, &mut buf, 8, sum).unwrap();
        // No collective timeout: this one is enqueued and not waited for; the peer never joins.
        comm.all_reduce_f32(&g, &mut buf, 8, sum).unwrap();
        let start = std::time::Instant::now();
        drop(comm);
        let waited = start.elapsed();
        dropped.send(()).unwrap();
        assert!(
            waited >= limit && waited < Duration::from_secs(30),
            "the drop took {waited:?}: the finalize is bounded by {limit:?}"
        );
        let peer = peer.join().unwrap();
        match peer {
            Err(partial_fc::PfcError::Collective(_)) => {}
            other => panic!("the peer's next call has no partner and must fail: {other:?}"),
        }
        println!("drop with an unjoined collective: aborted after {waited:?}");
    });
}

/// The barrier too: it used to wait for its all-reduce with a plain stream synchronize, with no
/// timeout and no abort, so a rank whose peer never arrived waited forever.
#[test]
fn a_barrier_without_its_peer_times_out() {
    if !several_ranks_fit_on_one_gpu() {
        return;
    }
    silent_peer_times_out("barrier", |_, comm| comm.barrier());
}

#[test]
fn wire_kernels_match_cpu() {
    let Some(g) = gpu() else { return };
    let (rows, dim) = (37usize, 100usize);
    let x = partial_fc::init::normal_rows(3, 0, rows, dim, 2.0);
    let labels: Vec<i64> = (0..rows as i64)
        .map(|i| if i % 5 == 0 { -1 } else { i * 1_000_000_007 })
        .collect();
    let len = rows * (dim + 4);
    for wire in [Dtype::F16, Dtype::Bf16] {
        let mut want = vec![0u16; len];
        CpuBackend
            .pack_embeddings(&x, &labels, rows, dim, wire, &mut want)
            .unwrap();
        let (mut gx, mut gl, mut gp) = (
            g.alloc(rows * dim).unwrap(),
            g.alloc(rows).unwrap(),
            g.alloc(len).unwrap(),
        );
        g.upload(&x, &mut gx).unwrap();
        g.upload(&labels, &mut gl).unwrap();
        g.pack_embeddings(&gx, &gl, rows, dim, wire, &mut gp)
            .unwrap();
        assert_eq!(g.download(&gp, len).unwrap(), want, "{wire:?}: packed bits");

        let (mut l, mut xh, mut n) = (vec![0i64; rows], vec![0f32; rows * dim], vec![0f32; rows]);
        CpuBackend
            .unpack_normalize(&want, rows, dim, wire, &mut l, &mut xh, &mut n)
            .unwrap();
        let (mut gl2, mut gxh, mut gn) = (
            g.alloc(rows).unwrap(),
            g.alloc(rows * dim).unwrap(),
            g.alloc(rows).unwrap(),
        );
        g.unpack_normalize(&gp, rows, dim, wire, &mut gl2, &mut gxh, &mut gn)
            .unwrap();
        assert_eq!(g.download(&gl2, rows).unwrap(), labels, "{wire:?}: labels");
        for (a, b) in g.download(&gxh, rows * dim).unwrap().iter().zip(&xh) {
            assert!((a - b).abs() <= 1e-6, "{wire:?}: x_hat {a} vs {b}");
        }
        for (a, b) in g.download(&gn, rows).unwrap().iter().zip(&n) {
            assert!((a - b).abs() <= 1e-5 * b, "{wire:?}: norm {a} vs {b}");
        }
        println!("{wire:?} wire: pack bit-identical, unpack+normalize within 1e-6");
    }

    // The f32 wire (rows packed on the host): the GPU unpack gives the labels back exactly and
    // the same normalized rows and norms as normalize_rows on the device, bit for bit (the same
    // device function computes both).
    let row = partial_fc::cpu::wire::packed_row_len_f32(dim);
    let mut host = vec![0f32; rows * row];
    partial_fc::cpu::wire::pack_embeddings_f32(&x, &labels, rows, dim, &mut host);
    let mut gp = g.alloc(rows * row).unwrap();
    g.upload(&host, &mut gp).unwrap();
    let (mut gl, mut gxh, mut gn) = (
        g.alloc(rows).unwrap(),
        g.alloc(rows * dim).unwrap(),
        g.alloc(rows).unwrap(),
    );
    g.unpack_normalize_f32(&gp, rows, dim, &mut gl, &mut gxh, &mut gn)
        .unwrap();
    let mut gx = g.alloc(rows * dim).unwrap();
    g.upload(&x, &mut gx).unwrap();
    let (mut wxh, mut wn) = (g.alloc(rows * dim).unwrap(), g.alloc(rows).unwrap());
    g.normalize_rows(&gx, rows, dim, &mut wxh, &mut wn).unwrap();
    assert_eq!(g.download(&gl, rows).unwrap(), labels, "f32 wire: labels");
    let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(g.download(&gxh, rows * dim).unwrap()),
        bits(g.download(&wxh, rows * dim).unwrap()),
        "f32 wire: x_hat"
    );
    assert_eq!(
        bits(g.download(&gn, rows).unwrap()),
        bits(g.download(&wn, rows).unwrap()),
        "f32 wire: norms"
    );
    // And against its CPU twin (src/cpu/normalize.rs), within the reductions' rounding.
    let (mut cl, mut cxh, mut cn) = (vec![0i64; rows], vec![0f32; rows * dim], vec![0f32; rows]);
    CpuBackend
        .unpack_normalize_f32(&host, rows, dim, &mut cl, &mut cxh, &mut cn)
        .unwrap();
    assert_eq!(cl, labels, "f32 wire: CPU labels");
    for (a, b) in g.download(&gxh, rows * dim).unwrap().iter().zip(&cxh) {
        assert!((a - b).abs() <= 1e-6, "f32 wire: x_hat gpu {a} cpu {b}");
    }
    for (a, b) in g.download(&gn, rows).unwrap().iter().zip(&cn) {
        assert!((a - b).abs() <= 1e-5 * b, "f32 wire: norm gpu {a} cpu {b}");
    }
    println!("f32 wire: unpack+normalize bit-identical to normalize_rows, within 1e-6 of the CPU");
}

#[test]
fn wire_formats_on_gpu_ranks_match_cpu() {
    if gpu().is_none() {
        return;
    }
    for wire in [Dtype::F16, Dtype::Bf16] {
        let world = 3;
        let got = concat(ThreadGroup::run(world, |comm| {
            let rank = comm.rank();
            let g = CudaBackend::new(0).unwrap();
            let mut layer =
                PartialFc::new(config_wire(world, 0.1, wire), g, HostStaged::new(comm)).unwrap();
            two_steps(&mut layer, world, rank)
        }));
        assert_close(
            &format!("{world} virtual ranks, {wire:?} wire"),
            &got,
            &cpu_run_wire(world, 0.1, wire),
        );
    }
    if nccl_available().is_ok() {
        let g = gpu().unwrap();
        let comm = NcclCollective::new(
            &g,
            0,
            1,
            new_unique_id().unwrap(),
            Some(Duration::from_secs(60)),
        )
        .unwrap();
        let mut layer = PartialFc::new(config_wire(1, 0.1, Dtype::Bf16), g, comm).unwrap();
        assert_close(
            "NCCL, 1 rank, Bf16 wire",
            &two_steps(&mut layer, 1, 0),
            &cpu_run_wire(1, 0.1, Dtype::Bf16),
        );
    }
}

/// The embedding gradient reduce-scattered in bf16 (`LayerConfig::grad_wire`) on the GPU: NCCL
/// with world size 1 (ncclBfloat16) and 3 virtual ranks through the host-staged collective,
/// against the CPU with the same option. The loss and weights are held to the f32 tolerance of
/// `assert_close`. The gradient is rounded to bf16 after the GPU's and the CPU's f32 arithmetic
/// have differed by ~1e-6, so an element near a rounding boundary may land one bf16 step
/// (≤ 2⁻⁷ of its magnitude) apart: with one rank the bound is that step; with three, each
/// rank's contribution may be a step apart before the sum, so the bound is three steps of the
/// gradient's largest magnitude (loose, but a wrong block or dtype is far outside). That the
/// gradient really went through bf16 is checked exactly: every value is a widened bf16 (its low
/// 16 bits zero), which a missing cast would not give.
#[test]
fn bf16_gradient_wire_matches_cpu() {
    let Some(g) = gpu() else { return };
    let check = |what: &str, got: &RankRun, want: &RankRun, ranks: usize| {
        let strip = |r: &RankRun| (r.0.clone(), Vec::new(), r.2.clone());
        assert_close(what, &strip(got), &strip(want));
        let scale = want.1.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = 2f32.powi(-7);
        assert_eq!(got.1.len(), want.1.len(), "{what}: gradient length");
        assert!(
            got.1.iter().all(|v| v.to_bits() & 0xffff == 0),
            "{what}: a gradient value is not a bf16 (the cast was skipped)"
        );
        for (i, (x, y)) in got.1.iter().zip(&want.1).enumerate() {
            let bound = if ranks == 1 {
                step * x.abs().max(y.abs())
            } else {
                3.0 * step * scale
            };
            assert!(
                (x - y).abs() <= 1e-6 + 1e-6 * scale + bound,
                "{what} grad_embeddings[{i}]: gpu {x} cpu {y}"
            );
        }
        assert_ne!(
            want.1,
            cpu_run_grad_wire(ranks, Dtype::F32).1,
            "{what}: bf16 rounding must change the CPU's gradient for the test to mean anything"
        );
        println!("{what}: matches the CPU");
    };

    let world = 3;
    let got = concat(ThreadGroup::run(world, |comm| {
        let rank = comm.rank();
        let g = CudaBackend::new(0).unwrap();
        let mut layer = PartialFc::new(
            config_grad_wire(world, 0.1, Dtype::Bf16),
            g,
            HostStaged::new(comm),
        )
        .unwrap();
        assert_eq!(layer.memory_report(), layer.planned_memory());
        two_steps(&mut layer, world, rank)
    }));
    check(
        "3 virtual ranks, bf16 gradient wire",
        &got,
        &cpu_run_grad_wire(world, Dtype::Bf16),
        world,
    );

    if let Err(e) = nccl_available() {
        skip!("skipped (NCCL part): {e}");
        return;
    }
    let comm = NcclCollective::new(
        &g,
        0,
        1,
        new_unique_id().unwrap(),
        Some(Duration::from_secs(60)),
    )
    .unwrap();
    let mut layer = PartialFc::new(config_grad_wire(1, 0.1, Dtype::Bf16), g, comm).unwrap();
    assert_eq!(layer.memory_report(), layer.planned_memory());
    check(
        "NCCL, 1 rank, bf16 gradient wire",
        &two_steps(&mut layer, 1, 0),
        &cpu_run_grad_wire(1, Dtype::Bf16),
        1,
    );
    // The 16-bit reduce-scatter through NCCL itself, with several ranks.
    if let Some(got) = nccl_ranks(world, |w| config_grad_wire(w, 0.1, Dtype::Bf16)) {
        check(
            "3 NCCL ranks on one GPU, bf16 gradient wire",
            &got,
            &cpu_run_grad_wire(world, Dtype::Bf16),
            world,
        );
    }
}

fn cpu_run_grad_wire(world: usize, grad_wire: Dtype) -> RankRun {
    concat(ThreadGroup::run(world, |comm| {
        let rank = comm.rank();
        let mut layer =
            PartialFc::new(config_grad_wire(world, 0.1, grad_wire), CpuBackend, comm).unwrap();
        two_steps(&mut layer, world, rank)
    }))
}

/// A rank that refuses its own part (here a receive buffer too short) aborts its communicator:
/// it gets its own `Shape` error, and any later call is refused as aborted, instead of leaving
/// the communicator live for a next call that would pair with its peer's pending collective (a
/// concurrency review found the refusal left it usable). The peer, waiting in the collective,
/// fails through its timeout.
#[test]
fn a_rank_that_refuses_its_part_aborts_its_communicator() {
    if !several_ranks_fit_on_one_gpu() {
        return;
    }
    let id = new_unique_id().unwrap();
    std::thread::scope(|s| {
        let peer = s.spawn(move || {
            let g = CudaBackend::new(0).unwrap();
            // Its first collective's set-up is bounded by the longer timeout: keep both short.
            let (init, timeout) = (Duration::from_secs(3), Duration::from_millis(500));
            let comm =
                NcclCollective::with_init_timeout(&g, 1, 2, id, Some(init), Some(timeout)).unwrap();
            let mut buf = g.alloc::<f32>(8).unwrap();
            comm.all_reduce_f32(&g, &mut buf, 8, partial_fc::ReduceOp::Sum)
        });
        let g = CudaBackend::new(0).unwrap();
        let comm = NcclCollective::new(&g, 0, 2, id, Some(Duration::from_secs(60))).unwrap();
        let mut short = g.alloc::<f32>(4).unwrap();
        let own = comm.all_reduce_f32(&g, &mut short, 8, partial_fc::ReduceOp::Sum);
        assert!(
            matches!(own, Err(partial_fc::PfcError::Shape(_))),
            "its own error: {own:?}"
        );
        let mut buf = g.alloc::<f32>(8).unwrap();
        match comm.all_reduce_f32(&g, &mut buf, 8, partial_fc::ReduceOp::Sum) {
            Err(partial_fc::PfcError::Collective(msg)) => assert!(msg.contains("aborted"), "{msg}"),
            other => panic!("the communicator must be aborted, got {other:?}"),
        }
        let peer = peer.join().unwrap();
        assert!(peer.is_err(), "the peer must fail, not complete: {peer:?}");
    });
}
