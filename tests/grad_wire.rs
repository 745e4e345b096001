//! The embedding gradient reduce-scattered in a 16-bit dtype (`LayerConfig::grad_wire`) on the CPU.
//!
//! What the option promises, checked bit for bit with 1, 2 and 3 ranks in f16 and bf16: the
//! returned gradient is the f32 path's per-rank contributions, each rounded once to the 16-bit
//! type, summed in f32 in rank order and rounded once more; the loss, the class centers' gradient
//! and the weights after `step` are the f32 path's exactly; `HostStaged` and a single rank give
//! the same bits as `ThreadGroup`; and the layer allocates what the planner predicts.

use partial_fc::collective::{HostStaged, SingleRank, ThreadGroup};
use partial_fc::cpu::wire::{from_wire, to_wire};
use partial_fc::plan::{Component, Dtype};
use partial_fc::{Backend, Collective, CpuBackend, LayerConfig, PartialFc, PfcError, Shard};
use std::sync::Mutex;

mod common;

use common::hooked::{Hook, Hooked, Op};

const CLASSES: u64 = 2003;
const DIM: usize = 40;
/// Does not split evenly over 3 ranks (9 + 9 + 8): the last rank's batch is padded.
const BATCH: usize = 26;

fn config(world: usize, grad_wire: Dtype) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH.div_ceil(world));
    cfg.sample_rate = 0.2;
    cfg.grad_wire = grad_wire;
    cfg
}

fn data() -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(9, 0, BATCH, DIM, 2.0);
    let labels = (0..BATCH as i64)
        .map(|i| (i * 577 + 5) % CLASSES as i64)
        .collect();
    (x, labels)
}

/// Keeps a copy of what this rank contributes to each f32 reduce-scatter: the embedding
/// gradient before it is summed over ranks.
#[derive(Default)]
struct Recording {
    sent: Mutex<Vec<Vec<f32>>>,
}

impl<C> Hook<C> for Recording {
    fn before(&self, op: &Op<'_>, _: &C) -> partial_fc::Result<()> {
        if let Op::ReduceScatterF32 { send } = op {
            self.sent.lock().unwrap().push(send.to_vec());
        }
        Ok(())
    }
}

/// What one rank computes in one step: loss, its rows' embedding gradient, its shard's dense
/// weight gradient, its shard's weights after `step`.
#[derive(Debug, Clone, PartialEq)]
struct RankOut {
    loss: f32,
    grad_x: Vec<f32>,
    grad_w: Vec<f32>,
    weight: Vec<f32>,
}

fn one_rank<C: Collective<CpuBackend>>(
    world: usize,
    grad_wire: Dtype,
    comm: C,
) -> (RankOut, PartialFc<CpuBackend, C>) {
    let (x, labels) = data();
    let rows = Shard::of(BATCH as u64, world, comm.rank());
    let (r0, r1) = (rows.start as usize, rows.end() as usize);
    let mut layer = PartialFc::new(config(world, grad_wire), CpuBackend, comm).unwrap();
    let out = layer
        .forward_backward(&x[r0 * DIM..r1 * DIM], &labels[r0..r1])
        .unwrap();
    let grad_w = layer.weight_grad_dense().unwrap();
    layer.step(0.3).unwrap();
    let weight = layer.weight().unwrap();
    let out = RankOut {
        loss: out.loss,
        grad_x: out.grad_embeddings,
        grad_w,
        weight,
    };
    (out, layer)
}

/// The f32 path over `world` ranks: each rank's result and its contribution to the gradient's
/// reduce-scatter (N·k × d values).
fn f32_path(world: usize) -> Vec<(RankOut, Vec<f32>)> {
    ThreadGroup::run(world, |comm| {
        let recording = Hooked::new(comm, Recording::default());
        let (out, layer) = one_rank(world, Dtype::F32, recording);
        let mut sent = layer.collective().hook.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1, "one reduce-scatter per step");
        (out, sent.remove(0))
    })
}

/// What the 16-bit reduce-scatter must return to `rank`, from the f32 path's contributions:
/// each rounded once, summed in f32 in rank order (from rank 0's value), the sum rounded once.
fn expected_grad(contributions: &[Vec<f32>], rank: usize, rows: usize, dtype: Dtype) -> Vec<f32> {
    let n = BATCH.div_ceil(contributions.len());
    let round = |v: f32| from_wire(to_wire(v, dtype), dtype);
    (0..rows * DIM)
        .map(|j| {
            let at = rank * n * DIM + j;
            let mut sum = round(contributions[0][at]);
            for c in &contributions[1..] {
                sum += round(c[at]);
            }
            round(sum)
        })
        .collect()
}

/// Bit-for-bit equality, naming the first element that differs.
#[track_caller]
fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}[{i}]: {:e} != {:e}", got[i], want[i]);
    }
}

#[test]
fn the_16_bit_gradient_is_the_rounded_sum_of_rounded_contributions() {
    for world in [1, 2, 3] {
        let reference = f32_path(world);
        let contributions: Vec<Vec<f32>> = reference.iter().map(|r| r.1.clone()).collect();
        for dtype in [Dtype::F16, Dtype::Bf16] {
            let got = ThreadGroup::run(world, |comm| one_rank(world, dtype, comm).0);
            for (rank, (g, (want, _))) in got.iter().zip(&reference).enumerate() {
                let what = format!("{dtype:?}, {world} ranks, rank {rank}");
                // Only the returned embedding gradient may change ...
                assert_bits(&[g.loss], &[want.loss], &format!("{what}: loss"));
                assert_bits(&g.grad_w, &want.grad_w, &format!("{what}: grad_w"));
                assert_bits(&g.weight, &want.weight, &format!("{what}: weights"));
                // ... and it changes exactly as specified.
                let rows = want.grad_x.len() / DIM;
                let expected = expected_grad(&contributions, rank, rows, dtype);
                assert_bits(&g.grad_x, &expected, &format!("{what}: grad_embeddings"));
                assert_ne!(
                    g.grad_x, want.grad_x,
                    "{what}: rounding must change something for the test to mean anything"
                );
                let scale = want.grad_x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let tol = if dtype == Dtype::Bf16 { 2e-2 } else { 2e-3 };
                for (a, b) in g.grad_x.iter().zip(&want.grad_x) {
                    assert!((a - b).abs() <= tol * scale, "{what}: {a} vs f32 {b}");
                }
            }
        }
    }
}

#[test]
fn host_staged_and_one_rank_give_the_thread_groups_bits() {
    for dtype in [Dtype::F16, Dtype::Bf16] {
        for world in [1, 2, 3] {
            let threads = ThreadGroup::run(world, |comm| one_rank(world, dtype, comm).0);
            let staged = ThreadGroup::run(world, |comm| {
                one_rank(world, dtype, HostStaged::new(comm)).0
            });
            assert_eq!(threads, staged, "{dtype:?}, {world} ranks: HostStaged");
            if world == 1 {
                let single = one_rank(1, dtype, SingleRank).0;
                assert_eq!(threads[0], single, "{dtype:?}: SingleRank");
            }
        }
    }
}

#[test]
fn a_16_bit_gradient_wire_allocates_what_the_planner_predicts() {
    for dtype in [Dtype::F16, Dtype::Bf16] {
        for world in [1, 3] {
            let n = BATCH.div_ceil(world) as u64;
            let (m, d) = (n * world as u64, DIM as u64);
            let reports: Vec<_> = ThreadGroup::handles(world)
                .into_iter()
                .map(|comm| {
                    let layer = PartialFc::zeroed(config(world, dtype), CpuBackend, comm).unwrap();
                    (layer.memory_report(), layer.planned_memory())
                })
                .collect();
            for (report, planned) in reports {
                assert_eq!(report, planned, "{dtype:?}, {world} ranks");
                let staging = report
                    .iter()
                    .find(|(c, _)| *c == Component::CollectiveStaging)
                    .unwrap()
                    .1;
                // f32 gradient rows, the all-gather's send buffer (N packed f32 rows of d + 2
                // words), plus the 16-bit send (N·k × d) and receive (N × d) buffers.
                assert_eq!(staging, n * d * 4 + n * (d + 2) * 4 + (m * d + n * d) * 2);
            }
        }
    }
}

#[test]
fn a_16_bit_reduce_scatter_refuses_f32_and_short_buffers() {
    let param = |r: partial_fc::Result<()>| matches!(r, Err(PfcError::Param { .. }));
    let (send, mut recv) = (vec![0u16; 8], vec![0u16; 4]);
    assert!(param(SingleRank.reduce_scatter_16(
        &CpuBackend,
        &send,
        4,
        &mut recv,
        Dtype::F32
    )));
    let results = ThreadGroup::run(2, |comm| {
        let (send, mut recv) = (vec![0u16; 8], vec![0u16; 4]);
        let thread = comm.reduce_scatter_16(&CpuBackend, &send, 4, &mut recv, Dtype::F32);
        let staged = HostStaged::new(comm);
        let host = Collective::<CpuBackend>::reduce_scatter_16(
            &staged,
            &CpuBackend,
            &send,
            4,
            &mut recv,
            Dtype::F32,
        );
        // A send buffer shorter than world · count is a shape error, not a slice panic.
        let short = Collective::<CpuBackend>::reduce_scatter_16(
            &staged,
            &CpuBackend,
            &send,
            5,
            &mut recv,
            Dtype::Bf16,
        );
        (param(thread), param(host), short)
    });
    for (thread, host, short) in results {
        assert!(thread && host);
        assert!(matches!(short, Err(PfcError::Shape(_))), "{short:?}");
    }
    // The casts refuse f32 and buffers shorter than the length asked for.
    let mut wide = vec![0f32; 4];
    let mut narrow = vec![0u16; 4];
    assert!(param(CpuBackend.cast_to_wire(
        &wide,
        4,
        Dtype::F32,
        &mut narrow
    )));
    assert!(param(CpuBackend.cast_from_wire(
        &narrow,
        4,
        Dtype::F32,
        &mut wide
    )));
    assert!(matches!(
        CpuBackend.cast_to_wire(&wide, 5, Dtype::Bf16, &mut narrow),
        Err(PfcError::Shape(_))
    ));
    assert!(matches!(
        CpuBackend.cast_from_wire(&narrow, 5, Dtype::F16, &mut wide),
        Err(PfcError::Shape(_))
    ));
}

#[test]
fn every_grad_wire_dtype_is_a_valid_configuration() {
    // f32 is today's path, f16 and bf16 the 16-bit ones: no combination is refused.
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        for world in [1, 3] {
            config(world, dtype).validate(world).unwrap();
        }
    }
}
