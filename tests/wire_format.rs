//! The 16-bit wire format of the embedding all-gather on the CPU: a layer with an f16 or bf16 wire
//! computes exactly what an f32 layer computes on the rounded embeddings, for one rank and for k
//! ranks (and k f32 ranks equal one, tests/step_ranks.rs), and allocates exactly what the planner
//! predicts.

use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::cpu::wire::{from_wire, to_wire};
use partial_fc::plan::Dtype;
use partial_fc::{Collective, CpuBackend, LayerConfig, PartialFc};

const CLASSES: u64 = 2003;
const DIM: usize = 40;
const BATCH: usize = 26;

fn config(world: usize, wire: Dtype) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH.div_ceil(world));
    cfg.sample_rate = 0.2;
    cfg.wire = wire;
    cfg
}

fn data() -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(5, 0, BATCH, DIM, 3.0);
    let labels = (0..BATCH as i64)
        .map(|i| (i * 389 + 11) % CLASSES as i64)
        .collect();
    (x, labels)
}

/// Loss, concatenated embedding gradient and weights after one step, over `world` ranks.
fn run(world: usize, wire: Dtype, x: &[f32], labels: &[i64]) -> (f32, Vec<f32>, Vec<f32>) {
    let parts = ThreadGroup::run(world, |comm| {
        let rows = partial_fc::Shard::of(BATCH as u64, world, comm.rank());
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let mut layer = PartialFc::new(config(world, wire), CpuBackend, comm).unwrap();
        let out = layer
            .forward_backward(&x[r0 * DIM..r1 * DIM], &labels[r0..r1])
            .unwrap();
        layer.step(0.3).unwrap();
        (out.loss, out.grad_embeddings, layer.weight().unwrap())
    });
    let loss = parts[0].0;
    (
        loss,
        parts.iter().flat_map(|p| p.1.clone()).collect(),
        parts.iter().flat_map(|p| p.2.clone()).collect(),
    )
}

#[test]
fn a_16_bit_wire_equals_f32_on_rounded_embeddings() {
    let (x, labels) = data();
    for wire in [Dtype::F16, Dtype::Bf16] {
        let rounded: Vec<f32> = x
            .iter()
            .map(|&v| from_wire(to_wire(v, wire), wire))
            .collect();
        assert_ne!(
            rounded, x,
            "{wire:?} rounding must change something for the test to mean anything"
        );
        for world in [1, 2, 3] {
            let packed = run(world, wire, &x, &labels);
            let reference = run(world, Dtype::F32, &rounded, &labels);
            // Same arithmetic on the same values: bit for bit.
            assert_eq!(packed, reference, "{wire:?}, {world} ranks");
        }
    }
}

#[test]
fn the_packed_wire_allocates_what_the_planner_predicts() {
    for wire in [Dtype::F16, Dtype::Bf16] {
        let layer = PartialFc::zeroed(config(1, wire), CpuBackend, SingleRank).unwrap();
        assert_eq!(layer.memory_report(), layer.planned_memory());
        let part = |name: &str| {
            layer
                .memory_report()
                .into_iter()
                .find(|(c, _)| c.name() == name)
                .unwrap()
                .1
        };
        let (n, d) = (BATCH as u64, DIM as u64);
        // f32 gradient rows plus the packed send buffer (N rows of d + 4 words); the packed
        // receive buffer (N·k = N rows at one rank) is the gathered embeddings.
        assert_eq!(part("collective_staging"), n * d * 4 + n * (d + 4) * 2);
        assert_eq!(part("gathered_embeddings"), n * (d + 4) * 2);
        let f32_layer = PartialFc::zeroed(config(1, Dtype::F32), CpuBackend, SingleRank).unwrap();
        let f32_gathered = f32_layer
            .memory_report()
            .into_iter()
            .find(|(c, _)| c.name() == "gathered_embeddings")
            .unwrap()
            .1;
        // The f32 wire: d values and the label's two words per row.
        assert_eq!(f32_gathered, n * (d + 2) * 4);
        for comm in ThreadGroup::handles(3) {
            let layer = PartialFc::zeroed(config(3, wire), CpuBackend, comm).unwrap();
            assert_eq!(layer.memory_report(), layer.planned_memory());
        }
    }
}

#[test]
fn packing_with_an_f32_wire_is_a_typed_error() {
    use partial_fc::Backend;
    let mut packed = vec![0u16; 8];
    let err = CpuBackend
        .pack_embeddings(
            &vec![1.0f32; 4],
            &vec![0i64; 1],
            1,
            4,
            Dtype::F32,
            &mut packed,
        )
        .unwrap_err();
    assert!(matches!(err, partial_fc::PfcError::Param { .. }));
}

/// The f32 wire: rows packed with their labels' bits unpack to exactly the labels (negative,
/// padding and extreme ones included) and to the same bits as `normalize_rows`.
#[test]
fn the_f32_wire_round_trips_labels_and_normalizes_like_normalize_rows() {
    use partial_fc::cpu::wire::{pack_embeddings_f32, packed_row_len_f32};
    use partial_fc::Backend;
    let (rows, dim) = (7usize, 33usize);
    let x = partial_fc::init::normal_rows(5, 0, rows, dim, 3.0);
    let labels = [
        0i64,
        -1,
        1,
        i64::MAX,
        i64::MIN,
        0x7fc0_0000_ffff_ffff,
        12_345_678_901,
    ];
    let mut packed = vec![0f32; rows * packed_row_len_f32(dim)];
    pack_embeddings_f32(&x, &labels, rows, dim, &mut packed);
    let (mut got_labels, mut xh, mut norms) =
        (vec![0i64; rows], vec![0f32; rows * dim], vec![0f32; rows]);
    CpuBackend
        .unpack_normalize_f32(&packed, rows, dim, &mut got_labels, &mut xh, &mut norms)
        .unwrap();
    assert_eq!(got_labels, labels);
    let (mut want_xh, mut want_norms) = (vec![0f32; rows * dim], vec![0f32; rows]);
    CpuBackend
        .normalize_rows(&x, rows, dim, &mut want_xh, &mut want_norms)
        .unwrap();
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&xh), bits(&want_xh));
    assert_eq!(bits(&norms), bits(&want_norms));
    assert!(CpuBackend
        .unpack_normalize_f32(
            &packed[1..].to_vec(),
            rows,
            dim,
            &mut got_labels,
            &mut xh,
            &mut norms
        )
        .is_err());
}
