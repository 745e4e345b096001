//! The planner is the truth about this crate: the layer's real allocations equal the planner's
//! prediction, component by component, and equal what the public planner API (driven from a
//! `PlanConfig`) says for rank 0.

use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::plan::{Component, Dtype, Optimizer, PlanConfig};
use partial_fc::{
    CpuBackend, GemmPrecision, LayerConfig, PartialFc, PfcError, StateDtype, UpdateMode,
};

/// Bytes by component, as the layer and the planner report them.
type Report = Vec<(Component, u64)>;

struct Case {
    classes: u64,
    gpus: usize,
    batch: usize,
    dim: usize,
    rate: f64,
    update: UpdateMode,
    momentum: bool,
    /// AdamW (two moments) instead of SGD's momentum; only with `momentum`.
    adamw: bool,
    state: StateDtype,
    grad_wire: Dtype,
    hard: bool,
}

fn layer_config(c: &Case) -> LayerConfig {
    let mut cfg = LayerConfig::new(c.classes, c.dim, c.batch);
    cfg.sample_rate = c.rate;
    cfg.update = c.update;
    cfg.grad_wire = c.grad_wire;
    if c.hard {
        cfg.sampler = partial_fc::NegativeSampler::Hard { fraction: 0.5 };
    }
    if !c.momentum {
        cfg.optimizer = None;
    }
    if c.momentum && c.adamw {
        cfg.optimizer = Some(partial_fc::AdamW::default().into());
    }
    if let Some(o) = cfg.optimizer.as_mut() {
        o.set_state_dtype(c.state);
    }
    cfg
}

fn plan_config(c: &Case) -> PlanConfig {
    let mut p = PlanConfig::new(c.classes, c.gpus as u64, 1 << 40);
    p.batch_per_gpu = c.batch as u64;
    p.dim = c.dim as u64;
    p.sample_rate = c.rate;
    p.update = c.update;
    p.grad_wire_dtype = c.grad_wire;
    p.hard_negatives = c.hard;
    p.optimizer = match (c.momentum, c.adamw) {
        (false, _) => Optimizer::None,
        (true, false) => Optimizer::SgdMomentum,
        (true, true) => Optimizer::AdamW,
    };
    p.state_dtype = match c.state {
        StateDtype::F32 => Dtype::F32,
        StateDtype::Bf16 => Dtype::Bf16,
    };
    p
}

/// Rank 0's report from the layer, with the planner API's reserve entry (0) appended.
fn check(case: &Case, reports: Vec<(Report, Report)>) {
    for (rank, (report, planned)) in reports.iter().enumerate() {
        assert_eq!(report, planned, "rank {rank}: allocation != planner");
    }
    let mut rank0 = reports[0].0.clone();
    rank0.push((Component::Reserved, 0));
    let api = plan_config(case).rank0_components();
    assert_eq!(rank0, api, "layer rank 0 != PlanConfig::rank0_components");
    let total: u64 = rank0.iter().map(|(_, b)| b).sum();
    assert_eq!(Some(total), plan_config(case).rank0_total());
}

fn run(case: Case) {
    let cfg = layer_config(&case);
    let reports = if case.gpus == 1 {
        let layer = PartialFc::zeroed(cfg, CpuBackend, SingleRank).unwrap();
        vec![(layer.memory_report(), layer.planned_memory())]
    } else {
        ThreadGroup::handles(case.gpus)
            .into_iter()
            .map(|comm| {
                let layer = PartialFc::zeroed(cfg.clone(), CpuBackend, comm).unwrap();
                (layer.memory_report(), layer.planned_memory())
            })
            .collect()
    };
    check(&case, reports);
}

fn case(classes: u64, gpus: usize, rate: f64, update: UpdateMode, momentum: bool) -> Case {
    Case {
        classes,
        gpus,
        batch: 16,
        dim: 32,
        rate,
        update,
        momentum,
        adamw: false,
        state: StateDtype::F32,
        grad_wire: Dtype::F32,
        hard: false,
    }
}

/// Hard negatives add the class scores and the chunked scoring buffers (`pfc plan
/// --hard-negatives`); a shard smaller than the chunk and one larger.
#[test]
fn hard_negatives_scratch_is_planned() {
    for classes in [3000, 20_000] {
        let mut c = case(classes, 2, 0.1, UpdateMode::Sparse, true);
        c.hard = true;
        run(c);
    }
}

#[test]
fn world_of_one_sparse_small_r_with_momentum() {
    run(case(4000, 1, 0.1, UpdateMode::Sparse, true));
}

#[test]
fn world_of_one_dense_model_parallel_without_optimizer() {
    run(case(3001, 1, 1.0, UpdateMode::Dense, false));
}

#[test]
fn world_of_three_uneven_shards_sparse_small_r() {
    // 3001 = 1001 + 1000 + 1000: rank 0 holds the extra class
    run(case(3001, 3, 0.05, UpdateMode::Sparse, true));
}

#[test]
fn world_of_three_dense_model_parallel() {
    run(case(2999, 3, 1.0, UpdateMode::Dense, true));
}

#[test]
fn world_of_three_positives_floor_and_no_optimizer() {
    // r so small that the worst-case positives (min(shard, N·k) = 48) set the sample size
    run(Case {
        batch: 16,
        dim: 8,
        ..case(5000, 3, 0.001, UpdateMode::Sparse, false)
    });
}

#[test]
fn world_of_three_dense_small_r_wide_dim() {
    run(Case {
        dim: 64,
        batch: 8,
        ..case(2000, 3, 0.25, UpdateMode::Dense, true)
    });
}

#[test]
fn world_of_three_bf16_momentum_sparse_and_dense() {
    for update in [UpdateMode::Sparse, UpdateMode::Dense] {
        run(Case {
            state: StateDtype::Bf16,
            ..case(3001, 3, 0.05, update, true)
        });
    }
}

/// AdamW keeps two moments, each of the shard's size, in either dtype: the layer allocates what
/// the planner's `--optimizer adamw` plans.
#[test]
fn adamw_moments_are_planned_in_both_dtypes_sparse_and_dense() {
    for update in [UpdateMode::Sparse, UpdateMode::Dense] {
        for state in [StateDtype::F32, StateDtype::Bf16] {
            let c = Case {
                adamw: true,
                state,
                ..case(3001, 3, 0.05, update, true)
            };
            let layer = PartialFc::zeroed(layer_config(&c), CpuBackend, SingleRank).unwrap();
            let bytes = layer
                .memory_report()
                .into_iter()
                .find(|(c, _)| *c == Component::OptimizerState)
                .unwrap()
                .1;
            let per_value = if state == StateDtype::F32 { 4 } else { 2 };
            assert_eq!(bytes, 2 * 3001 * 32 * per_value, "{update:?} {state}");
            run(c);
        }
    }
}

/// A bf16 momentum takes 2 bytes per weight of the shard, half of f32's, and nothing else moves.
#[test]
fn bf16_momentum_halves_the_optimizer_state_and_nothing_else() {
    let f32_case = case(3001, 3, 0.05, UpdateMode::Sparse, true);
    let bf16_case = Case {
        state: StateDtype::Bf16,
        ..case(3001, 3, 0.05, UpdateMode::Sparse, true)
    };
    let (full, half) = (
        plan_config(&f32_case).rank0_components(),
        plan_config(&bf16_case).rank0_components(),
    );
    for ((c, a), (c2, b)) in full.iter().zip(&half) {
        assert_eq!(c, c2);
        if *c == Component::OptimizerState {
            assert_eq!(*a, 1001 * 32 * 4, "f32 state of rank 0's 1001 × 32 shard");
            assert_eq!(*b, 1001 * 32 * 2, "bf16 state");
        } else {
            assert_eq!(a, b, "{c:?} must not change");
        }
    }
    let layer = PartialFc::zeroed(layer_config(&bf16_case), CpuBackend, SingleRank).unwrap();
    let state = layer
        .memory_report()
        .into_iter()
        .find(|(c, _)| *c == Component::OptimizerState)
        .unwrap();
    assert_eq!(state.1, 3001 * 32 * 2, "one rank holds all 3001 classes");
}

#[test]
fn bf16_gradient_wire_world_of_one_and_three() {
    // The 16-bit send and receive buffers of the gradient's reduce-scatter, in the layer, the
    // planner and the PlanConfig API alike.
    run(Case {
        grad_wire: Dtype::Bf16,
        ..case(4000, 1, 0.1, UpdateMode::Sparse, true)
    });
    run(Case {
        grad_wire: Dtype::Bf16,
        ..case(3001, 3, 0.05, UpdateMode::Dense, true)
    });
}

/// The CPU backend multiplies in f32 only: a 16-bit layer is a typed error naming `precision`,
/// never a layer whose report would disagree with the planner. (The CUDA layer's equality in
/// bf16/f16 is asserted in tests/cuda_kernels.rs.)
#[test]
fn cpu_rejects_16_bit_gemms_with_a_typed_error() {
    for precision in [GemmPrecision::Bf16, GemmPrecision::F16] {
        let mut cfg = layer_config(&case(4000, 1, 0.1, UpdateMode::Sparse, true));
        cfg.precision = precision;
        match PartialFc::zeroed(cfg, CpuBackend, SingleRank) {
            Err(PfcError::Param { name, .. }) => assert_eq!(name, "precision"),
            Err(other) => panic!("{precision}: wrong error {other}"),
            Ok(_) => panic!("{precision}: the CPU layer accepted 16-bit GEMMs"),
        }
    }
}

/// f32 GEMMs hold no operand copies; 16-bit ones hold the 2-byte copies of x̂ (M·d) and ŵ (S·d)
/// and keep the logits in 2 bytes (M·S), and the planner API agrees.
#[test]
fn gemm_operands_are_zero_in_f32_and_x_hat_and_w_hat_in_16_bit() {
    let gemm = |c: &PlanConfig| {
        c.rank0_components()
            .into_iter()
            .find(|(comp, _)| *comp == Component::GemmOperands)
            .map(|(_, b)| b)
    };
    // 3 ranks, 3001 classes: rank 0 holds 1001, S = floor(0.05 · 1001) = 50 raised to
    // min(1001, M = 48) → 50, padded to ld = 56 rows/columns (a multiple of 8); d = 32.
    let base = plan_config(&case(3001, 3, 0.05, UpdateMode::Sparse, true));
    assert_eq!(gemm(&base), Some(0));
    let (m, s, ld, d) = (48u64, 50u64, 56u64, 32u64);
    let want = 2 * (m * d + ld * d);
    let logits_saved = 2 * m * ld;
    for precision in [GemmPrecision::Bf16, GemmPrecision::F16] {
        let c = PlanConfig {
            gemm_precision: precision,
            ..base
        };
        assert_eq!(c.rank0_shape().sampled_capacity(), s);
        assert_eq!(c.rank0_shape().sampled_stride(), ld);
        assert_eq!(gemm(&c), Some(want), "{precision}");
        assert_eq!(
            c.rank0_total(),
            base.rank0_total().map(|t| t + want - logits_saved),
            "{precision}: total"
        );
    }
}
