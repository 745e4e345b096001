//! The bfloat16 momentum (`Sgd::state_dtype = StateDtype::Bf16`): stored in bf16, computed in
//! f32, within its derived distance of the f32 optimizer, and carried through checkpoints.

mod common;

use common::Rng;
use partial_fc::collective::SingleRank;
use partial_fc::cpu::optimizer;
use partial_fc::{CpuBackend, LayerConfig, PartialFc, StateDtype, UpdateMode};

const CLASSES: u64 = 600;
const DIM: usize = 16;
const BATCH: usize = 24;

fn config(state: StateDtype, update: UpdateMode) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH);
    cfg.sample_rate = 0.2;
    cfg.update = update;
    cfg.optimizer.as_mut().unwrap().set_state_dtype(state);
    cfg
}

fn batch(step: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng::new(100 + step);
    let x = rng.normal_vec(BATCH * DIM, 1.0);
    let labels = (0..BATCH).map(|_| rng.below(CLASSES) as i64).collect();
    (x, labels)
}

fn train(layer: &mut PartialFc<CpuBackend, SingleRank>, steps: u64) {
    for step in 0..steps {
        let (x, labels) = batch(step);
        layer.forward_backward(&x, &labels).unwrap();
        layer.step(0.1).unwrap();
    }
}

fn l2(v: impl Iterator<Item = f32>) -> f64 {
    v.map(|x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

#[test]
fn the_stored_momentum_is_bf16() {
    let mut layer = PartialFc::new(
        config(StateDtype::Bf16, UpdateMode::Sparse),
        CpuBackend,
        SingleRank,
    )
    .unwrap();
    train(&mut layer, 3);
    let m = layer.momentum().unwrap().unwrap();
    assert_eq!(m.len(), CLASSES as usize * DIM);
    assert!(
        m.iter().all(|v| v.to_bits() & 0xffff == 0),
        "a value is not a bf16"
    );
    let moved = m.iter().filter(|v| **v != 0.0).count();
    assert!(moved > 10 * DIM, "only {moved} momentum values moved");
}

/// Each store rounds v to nearest bf16, an error of at most u = 2⁻⁸ of |v|; through the momentum
/// recursion the accumulated error of v stays below u / (1 − μ) ≈ 3.9% of the size of the
/// updates (μ = 0.9), so each step's displacement of the weights, and hence their total
/// displacement from the start, differs from f32's by at most that fraction of it (to first
/// order: slightly different weights feed slightly different gradients back). Checked for sparse
/// and dense updates; measured ~0.4%.
#[test]
fn bf16_momentum_tracks_the_f32_optimizer_within_the_derived_bound() {
    for update in [UpdateMode::Sparse, UpdateMode::Dense] {
        let mut f32_layer =
            PartialFc::new(config(StateDtype::F32, update), CpuBackend, SingleRank).unwrap();
        let mut bf16_layer =
            PartialFc::new(config(StateDtype::Bf16, update), CpuBackend, SingleRank).unwrap();
        let start = f32_layer.weight().unwrap();
        assert_eq!(start, bf16_layer.weight().unwrap());
        train(&mut f32_layer, 30);
        train(&mut bf16_layer, 30);
        let (wf, wb) = (f32_layer.weight().unwrap(), bf16_layer.weight().unwrap());
        let moved = l2(wf.iter().zip(&start).map(|(a, b)| a - b));
        let apart = l2(wf.iter().zip(&wb).map(|(a, b)| a - b));
        assert!(moved > 0.1, "{update:?}: weights barely moved ({moved})");
        assert!(apart > 0.0, "{update:?}: bf16 storage changed nothing");
        let bound = 2f64.powi(-8) / (1.0 - 0.9);
        assert!(
            apart <= bound * moved,
            "{update:?}: bf16 weights {apart} from f32 after moving {moved}"
        );
    }
}

/// The reference kernel against its formula: the stored momentum is the f32 update rounded to
/// nearest (even) bf16 — exactly, so truncation or another rounding would fail — and within half
/// a bf16 step of the f64 value; the weight moves by the unrounded value.
#[test]
fn the_reference_update_is_the_f32_formula_with_a_rounded_store() {
    let mut rng = Rng::new(7);
    let n = 4096;
    let w0 = rng.normal_vec(n, 0.05);
    let g = rng.normal_vec(n, 1e-3);
    let v0: Vec<u16> = rng
        .normal_vec(n, 1e-3)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let (lr, mu, wd) = (0.1f32, 0.9f32, 5e-4f32);
    let (mut w, mut v) = (w0.clone(), v0.clone());
    optimizer::sgd_momentum_dense(&mut w, &mut v, &g, lr, mu, wd);
    for i in 0..n {
        let old = f64::from(half::bf16::from_bits(v0[i]).to_f32());
        let exact = f64::from(mu) * old + f64::from(g[i]) + f64::from(wd) * f64::from(w0[i]);
        // The kernel's own f32 arithmetic, in its order, then round to nearest even.
        let next = mu * half::bf16::from_bits(v0[i]).to_f32() + (g[i] + wd * w0[i]);
        assert_eq!(
            v[i],
            half::bf16::from_f32(next).to_bits(),
            "v[{i}] not rounded to nearest"
        );
        let stored = f64::from(half::bf16::from_bits(v[i]).to_f32());
        let half_step = exact.abs() * 2f64.powi(-8) * (1.0 + 2f64.powi(-20));
        assert!(
            (stored - exact).abs() <= half_step,
            "v[{i}]: {stored} vs {exact}"
        );
        let want_w = f64::from(w0[i]) - f64::from(lr) * exact;
        assert!(
            (f64::from(w[i]) - want_w).abs() <= 1e-7 * (1.0 + want_w.abs()),
            "w[{i}]: {} vs {want_w} (moved by the rounded momentum?)",
            w[i]
        );
    }
}

#[test]
fn set_momentum_rounds_to_bf16_and_reads_back_exactly() {
    let mut layer = PartialFc::zeroed(
        config(StateDtype::Bf16, UpdateMode::Sparse),
        CpuBackend,
        SingleRank,
    )
    .unwrap();
    let values: Vec<f32> = (0..CLASSES as usize * DIM)
        .map(|i| (i as f32 + 0.3) * 1e-4)
        .collect();
    layer.set_momentum(&values).unwrap();
    let back = layer.momentum().unwrap().unwrap();
    for (b, v) in back.iter().zip(&values) {
        assert_eq!(*b, half::bf16::from_f32(*v).to_f32());
    }
    assert!(layer.set_momentum(&values[1..]).is_err());
}

/// A checkpoint stores the momentum as f32 values (exact for bf16), so it loads into a layer of
/// either state dtype: widened exactly into f32, rounded to nearest into bf16.
#[test]
fn checkpoints_move_between_state_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |s| config(s, UpdateMode::Sparse);
    let mut bf16_layer = PartialFc::new(cfg(StateDtype::Bf16), CpuBackend, SingleRank).unwrap();
    train(&mut bf16_layer, 3);
    let bf16_path = dir.path().join("bf16.safetensors");
    bf16_layer.save(&bf16_path).unwrap();
    let saved = bf16_layer.momentum().unwrap().unwrap();

    let mut again = PartialFc::zeroed(cfg(StateDtype::Bf16), CpuBackend, SingleRank).unwrap();
    again.load(&bf16_path).unwrap();
    assert_eq!(again.momentum().unwrap().unwrap(), saved);
    assert_eq!(again.weight().unwrap(), bf16_layer.weight().unwrap());

    let mut wide = PartialFc::zeroed(cfg(StateDtype::F32), CpuBackend, SingleRank).unwrap();
    wide.load(&bf16_path).unwrap();
    assert_eq!(wide.momentum().unwrap().unwrap(), saved);

    let mut f32_layer = PartialFc::new(cfg(StateDtype::F32), CpuBackend, SingleRank).unwrap();
    train(&mut f32_layer, 3);
    let f32_path = dir.path().join("f32.safetensors");
    f32_layer.save(&f32_path).unwrap();
    let mut narrow = PartialFc::zeroed(cfg(StateDtype::Bf16), CpuBackend, SingleRank).unwrap();
    narrow.load(&f32_path).unwrap();
    let rounded: Vec<f32> = f32_layer
        .momentum()
        .unwrap()
        .unwrap()
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(narrow.momentum().unwrap().unwrap(), rounded);
}

/// The CPU optimizer methods answer bad buffers and an unsorted or out-of-range sample with a
/// typed error (as the CUDA ones do), not a panic.
#[test]
fn bad_optimizer_input_is_a_typed_error() {
    use partial_fc::{Backend, StateBuf};
    let cpu = CpuBackend;
    let (rows, dim) = (6usize, 4usize);
    let mut w = vec![0.5f32; rows * dim];
    let grad = vec![0.1f32; 3 * dim];
    let mut v: StateBuf<CpuBackend> = StateBuf::alloc(&cpu, StateDtype::Bf16, rows * dim).unwrap();
    let sparse = |w: &mut Vec<f32>, v: &mut StateBuf<CpuBackend>, index: Vec<i32>, count| {
        cpu.sgd_momentum_sparse(w, v, &grad, &index, count, dim, 0.1, 0.9, 0.0)
    };
    assert!(sparse(&mut w, &mut v, vec![0, 2, 5], 3).is_ok());
    for (index, count, what) in [
        (vec![2, 0, 5], 3, "unsorted"),
        (vec![0, 2, 2], 3, "repeated"),
        (vec![0, 2, 6], 3, "out of the shard"),
        (vec![0, 2], 3, "count beyond the index"),
    ] {
        let before = w.clone();
        assert!(sparse(&mut w, &mut v, index, count).is_err(), "{what}");
        assert_eq!(w, before, "{what}: the weights changed");
    }
    let mut short: StateBuf<CpuBackend> =
        StateBuf::alloc(&cpu, StateDtype::F32, rows * dim - 1).unwrap();
    assert!(
        sparse(&mut w, &mut short, vec![0], 1).is_err(),
        "short momentum"
    );
    let dense_grad = vec![0.1f32; rows * dim];
    assert!(cpu
        .sgd_momentum_dense(&mut w, &mut short, &dense_grad, rows * dim, 0.1, 0.9, 0.0)
        .is_err());
}
