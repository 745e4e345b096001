//! AdamW on the class centers: the CPU kernels against the published algorithm (the update
//! `torch.optim.AdamW` documents, written here in f64), the sparse ("lazy") variant, bf16
//! moments, and the layer: its bias correction, checkpoints, resharding and validation.

mod common;

use common::Rng;
use partial_fc::backend::AdamWStep;
use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::{
    AdamW, Backend, Collective, CpuBackend, LayerConfig, PartialFc, PfcError, StateBuf, StateDtype,
    UpdateMode,
};

const ADAMW: AdamW = AdamW {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.1,
    state_dtype: StateDtype::F32,
};

/// Weights and moments in f64, moved by the published update.
struct Reference {
    w: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Reference {
    fn new(w: &[f32], m: &[f32], v: &[f32]) -> Reference {
        let wide = |x: &[f32]| x.iter().map(|&x| f64::from(x)).collect();
        Reference {
            w: wide(w),
            m: wide(m),
            v: wide(v),
        }
    }

    /// One AdamW update of the elements of `rows` (every row when `None`); `grad` holds a row
    /// per updated row, in order.
    fn step(&mut self, grad: &[f32], rows: Option<&[usize]>, dim: usize, lr: f64, t: u64) {
        let a = ADAMW;
        let (b1, b2) = (f64::from(a.beta1), f64::from(a.beta2));
        let bias1 = 1.0 - b1.powi(t as i32);
        let bias2 = 1.0 - b2.powi(t as i32);
        let all: Vec<usize> = (0..self.w.len() / dim).collect();
        for (i, &r) in rows.unwrap_or(&all).iter().enumerate() {
            for k in 0..dim {
                let (at, g) = (r * dim + k, f64::from(grad[i * dim + k]));
                self.w[at] *= 1.0 - lr * f64::from(a.weight_decay);
                self.m[at] += (1.0 - b1) * (g - self.m[at]);
                self.v[at] = b2 * self.v[at] + (1.0 - b2) * g * g;
                let denom = self.v[at].sqrt() / bias2.sqrt() + f64::from(a.eps);
                self.w[at] -= lr / bias1 * self.m[at] / denom;
            }
        }
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} against {w} (error {err:e})"
        );
    }
}

fn state(values: &[f32], dtype: StateDtype) -> StateBuf<CpuBackend> {
    let mut s = StateBuf::alloc(&CpuBackend, dtype, values.len()).unwrap();
    s.upload(&CpuBackend, values).unwrap();
    s
}

fn step(lr: f32, t: u64, adamw: AdamW) -> AdamWStep {
    AdamWStep {
        lr,
        adamw,
        t,
        seed: 7,
    }
}

#[test]
fn the_dense_kernel_follows_the_published_update_over_many_steps() {
    let (rows, dim) = (40usize, 8usize);
    let mut rng = Rng::new(3);
    let w0 = rng.normal_vec(rows * dim, 0.1);
    let mut reference = Reference::new(&w0, &vec![0.0; rows * dim], &vec![0.0; rows * dim]);
    let mut w = w0;
    let (mut m, mut v) = (
        state(&vec![0.0; rows * dim], StateDtype::F32),
        state(&vec![0.0; rows * dim], StateDtype::F32),
    );
    for t in 1..=30u64 {
        // Gradients of mixed scales, and rows without one (their moments only decay).
        let mut g = rng.normal_vec(rows * dim, 10f64.powi(-(t as i32 % 4)));
        g[..3 * dim].iter_mut().for_each(|x| *x = 0.0);
        CpuBackend
            .adamw_dense(&mut w, &mut m, &mut v, &g, rows * dim, step(0.01, t, ADAMW))
            .unwrap();
        reference.step(&g, None, dim, 0.01, t);
    }
    assert_close("weight", &w, &reference.w, 1e-5);
    assert_close(
        "exp_avg",
        &m.download(&CpuBackend, rows * dim).unwrap(),
        &reference.m,
        1e-5,
    );
    assert_close(
        "exp_avg_sq",
        &v.download(&CpuBackend, rows * dim).unwrap(),
        &reference.v,
        1e-5,
    );
}

#[test]
fn the_sparse_kernel_moves_the_sampled_rows_alone_as_the_published_update_would() {
    let (rows, dim) = (50usize, 5usize);
    let mut rng = Rng::new(8);
    let w0 = rng.normal_vec(rows * dim, 0.1);
    let m0: Vec<f32> = rng.normal_vec(rows * dim, 0.01);
    let v0: Vec<f32> = rng
        .normal_vec(rows * dim, 0.01)
        .iter()
        .map(|x| x * x)
        .collect();
    let mut reference = Reference::new(&w0, &m0, &v0);
    let (mut w, mut m, mut v) = (
        w0.clone(),
        state(&m0, StateDtype::F32),
        state(&v0, StateDtype::F32),
    );
    for t in 7..10u64 {
        let picked: Vec<usize> = (0..rows)
            .filter(|r| (r + t as usize).is_multiple_of(3))
            .collect();
        let index: Vec<i32> = picked.iter().map(|&r| r as i32).collect();
        let g = rng.normal_vec(picked.len() * dim, 1.0);
        CpuBackend
            .adamw_sparse(
                &mut w,
                &mut m,
                &mut v,
                &g,
                &index,
                picked.len(),
                dim,
                step(0.05, t, ADAMW),
            )
            .unwrap();
        reference.step(&g, Some(&picked), dim, 0.05, t);
    }
    assert_close("weight", &w, &reference.w, 1e-5);
    let stored_m = m.download(&CpuBackend, rows * dim).unwrap();
    assert_close("exp_avg", &stored_m, &reference.m, 1e-5);
    // One more step on the rows ≡ 0 (mod 3): every other row keeps its weight and moments to the
    // bit.
    let picked: Vec<i32> = (0..rows as i32).filter(|r| r % 3 == 0).collect();
    let (w_before, m_before) = (w.clone(), stored_m);
    CpuBackend
        .adamw_sparse(
            &mut w,
            &mut m,
            &mut v,
            &vec![1.0; picked.len() * dim],
            &picked,
            picked.len(),
            dim,
            step(0.05, 10, ADAMW),
        )
        .unwrap();
    let m_after = m.download(&CpuBackend, rows * dim).unwrap();
    for r in 0..rows {
        let row = r * dim..(r + 1) * dim;
        let moved = w[row.clone()] != w_before[row.clone()];
        assert_eq!(moved, r % 3 == 0, "row {r}: weight moved = {moved}");
        let moved = m_after[row.clone()] != m_before[row];
        assert_eq!(moved, r % 3 == 0, "row {r}: exp_avg moved = {moved}");
    }
}

/// bf16 moments: the arithmetic is the f32 update's, only the stores round, stochastically.
/// From the same (bf16-exact) state, the weights equal the f32 moments' bit for bit, and each
/// stored moment is one of the two bf16 values around the f32 one.
#[test]
fn bf16_moments_store_the_f32_update_rounded_to_a_neighbour() {
    let (rows, dim) = (30usize, 7usize);
    let mut rng = Rng::new(21);
    let bf = |x: Vec<f32>| -> Vec<f32> {
        x.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let w0 = rng.normal_vec(rows * dim, 0.1);
    let m0 = bf(rng.normal_vec(rows * dim, 0.01));
    let v0 = bf(rng
        .normal_vec(rows * dim, 0.01)
        .iter()
        .map(|x| x * x)
        .collect());
    let g = rng.normal_vec(rows * dim, 0.3);
    let run = |dtype| {
        let (mut w, mut m, mut v) = (w0.clone(), state(&m0, dtype), state(&v0, dtype));
        let s = step(
            0.02,
            4,
            AdamW {
                state_dtype: dtype,
                ..ADAMW
            },
        );
        CpuBackend
            .adamw_dense(&mut w, &mut m, &mut v, &g, rows * dim, s)
            .unwrap();
        let down = |s: &StateBuf<CpuBackend>| s.download(&CpuBackend, rows * dim).unwrap();
        (w, down(&m), down(&v))
    };
    let (w32, m32, v32) = run(StateDtype::F32);
    let (w16, m16, v16) = run(StateDtype::Bf16);
    assert_eq!(w16, w32, "the weights move by the unrounded moments");
    for (name, got, exact) in [("exp_avg", &m16, &m32), ("exp_avg_sq", &v16, &v32)] {
        let mut rounded_up = 0;
        for (i, (&b, &x)) in got.iter().zip(exact.iter()).enumerate() {
            // The bf16 values around x: its truncation toward zero, and the next one out.
            let toward_zero = f32::from_bits(x.to_bits() & 0xffff_0000);
            let away = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000);
            assert!(
                b == toward_zero || (b == away && x != toward_zero),
                "{name}[{i}]: {b} is not a bf16 neighbour of {x}"
            );
            rounded_up += usize::from(b == away);
        }
        // Unbiased: some values round each way.
        assert!(
            rounded_up > 10 && rounded_up < got.len() - 10,
            "{name}: {rounded_up} of {} rounded away from zero",
            got.len()
        );
    }
}

/// Many updates with bf16 moments track the f32 ones: with β₂ = 0.999 each update changes
/// `exp_avg_sq` by 0.1 %, under half a bf16 step, so rounding to nearest would store the old
/// value forever (a review found it stuck at a quarter of g² after 3000 steps of g = 1, and not
/// decaying when the gradient fell). Stochastic rounding is unbiased: the mean over many
/// weights follows f32, and each one stays near it.
#[test]
fn bf16_second_moment_tracks_the_f32_one_over_thousands_of_steps() {
    let n = 2048;
    let run = |dtype: StateDtype, steps: u64, g: &dyn Fn(u64) -> f32| {
        let mut w = vec![0f32; n];
        let (mut m, mut v) = (state(&vec![0.0; n], dtype), state(&vec![0.0; n], dtype));
        let adamw = AdamW {
            weight_decay: 0.0,
            state_dtype: dtype,
            ..ADAMW
        };
        for t in 1..=steps {
            let grad = vec![g(t); n];
            CpuBackend
                .adamw_dense(&mut w, &mut m, &mut v, &grad, n, step(1e-3, t, adamw))
                .unwrap();
        }
        (v.download(&CpuBackend, n).unwrap(), w)
    };
    let mean = |x: &[f32]| x.iter().map(|&x| f64::from(x)).sum::<f64>() / x.len() as f64;
    let constant = |_: u64| 1.0f32;
    let falling = |t: u64| if t <= 1000 { 1.0f32 } else { 0.1 };
    for (what, steps, g) in [
        (
            "3000 steps of g = 1",
            3000u64,
            &constant as &dyn Fn(u64) -> f32,
        ),
        ("g 1 → 0.1 at t = 1000, 6000 steps", 6000, &falling),
    ] {
        let (v32, w32) = run(StateDtype::F32, steps, g);
        let (v16, w16) = run(StateDtype::Bf16, steps, g);
        let (a, b) = (mean(&v16), f64::from(v32[0]));
        assert!(
            (a - b).abs() <= 0.01 * b,
            "{what}: mean exp_avg_sq {a} against f32 {b}"
        );
        let worst = v16
            .iter()
            .map(|&x| (f64::from(x) - b).abs() / b)
            .fold(0.0, f64::max);
        assert!(
            worst < 0.3,
            "{what}: an exp_avg_sq {worst:.3} away from f32 (relative)"
        );
        let (a, b) = (mean(&w16), f64::from(w32[0]));
        assert!(
            (a - b).abs() <= 0.01 * b.abs(),
            "{what}: mean weight {a} against f32 {b}"
        );
    }
}

#[test]
fn moments_of_two_dtypes_are_refused() {
    let n = 16;
    let (mut m, mut v) = (
        state(&vec![0.0; n], StateDtype::F32),
        state(&vec![0.0; n], StateDtype::Bf16),
    );
    let err = CpuBackend
        .adamw_dense(
            &mut vec![0.0; n],
            &mut m,
            &mut v,
            &vec![0.0; n],
            n,
            step(0.1, 1, ADAMW),
        )
        .unwrap_err();
    assert!(
        matches!(err, PfcError::Shape(ref s) if s.contains("same storage dtype")),
        "{err}"
    );
}

const CLASSES: u64 = 400;
const DIM: usize = 12;
const BATCH: usize = 16;

fn config(update: UpdateMode) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH);
    cfg.sample_rate = 0.1;
    cfg.update = update;
    cfg.optimizer = Some(ADAMW.into());
    cfg
}

fn batch(step: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng::new(500 + step);
    let x = rng.normal_vec(BATCH * DIM, 1.0);
    let labels = (0..BATCH).map(|_| rng.below(CLASSES) as i64).collect();
    (x, labels)
}

/// The layer's update is the published one applied to its own gradient, with `t` = the update
/// count: every row in dense mode (PartialFC_V2 under AdamW), the sampled rows in sparse.
#[test]
fn the_layer_applies_the_published_update_to_its_gradient() {
    for update in [UpdateMode::Dense, UpdateMode::Sparse] {
        let mut layer = PartialFc::new(config(update), CpuBackend, SingleRank).unwrap();
        let len = CLASSES as usize * DIM;
        let mut reference =
            Reference::new(&layer.weight().unwrap(), &vec![0.0; len], &vec![0.0; len]);
        for s in 0..5 {
            let (x, labels) = batch(s);
            layer.forward_backward(&x, &labels).unwrap();
            let grad = layer.weight_grad_dense().unwrap();
            let t = layer.optimizer_steps() + 1;
            assert_eq!((t, layer.steps()), (s + 1, s + 1));
            match update {
                UpdateMode::Dense => reference.step(&grad, None, DIM, 0.01, t),
                UpdateMode::Sparse => {
                    let rows: Vec<usize> = layer
                        .sampled_classes()
                        .unwrap()
                        .iter()
                        .map(|&c| c as usize)
                        .collect();
                    let picked: Vec<f32> = rows
                        .iter()
                        .flat_map(|&r| grad[r * DIM..(r + 1) * DIM].to_vec())
                        .collect();
                    reference.step(&picked, Some(&rows), DIM, 0.01, t);
                }
            }
            layer.step(0.01).unwrap();
            // The reference follows the layer's weights, so errors do not compound.
            assert_close(
                &format!("{update:?} weight after step {t}"),
                &layer.weight().unwrap(),
                &reference.w,
                2e-6,
            );
            assert_close(
                &format!("{update:?} exp_avg after step {t}"),
                &layer.optimizer_state("exp_avg").unwrap(),
                &reference.m,
                2e-6,
            );
            assert_close(
                &format!("{update:?} exp_avg_sq after step {t}"),
                &layer.optimizer_state("exp_avg_sq").unwrap(),
                &reference.v,
                2e-6,
            );
        }
        if update == UpdateMode::Dense {
            // Some rows were never sampled; the comparison above covers their decay.
            let never = (0..CLASSES as usize)
                .filter(|&r| {
                    reference.m[r * DIM..(r + 1) * DIM]
                        .iter()
                        .all(|&m| m == 0.0)
                })
                .count();
            assert!(
                never > 0,
                "every row was sampled: the test would miss the decay"
            );
        }
        assert_eq!(layer.momentum().unwrap(), None, "AdamW has no SGD momentum");
    }
}

#[test]
fn adamw_lowers_the_loss() {
    let mut cfg = config(UpdateMode::Sparse);
    cfg.num_classes = 8;
    cfg.sample_rate = 1.0;
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let (x, labels) = {
        let mut rng = Rng::new(77);
        let x = rng.normal_vec(BATCH * DIM, 1.0);
        let labels: Vec<i64> = (0..BATCH as i64).map(|i| i % 8).collect();
        (x, labels)
    };
    let first = layer.forward_backward(&x, &labels).unwrap().loss;
    layer.step(0.05).unwrap();
    let mut last = first;
    for _ in 0..40 {
        last = layer.forward_backward(&x, &labels).unwrap().loss;
        layer.step(0.05).unwrap();
    }
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

/// A checkpoint carries both moments and both counters, so a resumed run continues bit for bit
/// (the bias correction counts on from the saved update count).
#[test]
fn a_resumed_run_continues_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rank0.safetensors");
    for dtype in [StateDtype::F32, StateDtype::Bf16] {
        let mut cfg = config(UpdateMode::Sparse);
        cfg.optimizer.as_mut().unwrap().set_state_dtype(dtype);
        let mut layer = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
        let run = |layer: &mut PartialFc<CpuBackend, SingleRank>, steps: std::ops::Range<u64>| {
            for s in steps {
                let (x, labels) = batch(s);
                layer.forward_backward(&x, &labels).unwrap();
                layer.step(0.01).unwrap();
            }
        };
        run(&mut layer, 0..3);
        layer.save(&path).unwrap();
        let mut resumed = PartialFc::zeroed(cfg, CpuBackend, SingleRank).unwrap();
        resumed.load(&path).unwrap();
        for name in ["exp_avg", "exp_avg_sq"] {
            let saved = layer.optimizer_state(name).unwrap();
            assert!(saved.iter().any(|&v| v != 0.0), "{name} moved");
            assert_eq!(resumed.optimizer_state(name).unwrap(), saved, "{name}");
        }
        run(&mut layer, 3..5);
        run(&mut resumed, 3..5);
        assert_eq!(
            resumed.weight().unwrap(),
            layer.weight().unwrap(),
            "{dtype}"
        );
    }
}

#[test]
fn a_checkpoint_of_another_optimizer_is_refused_and_weights_alone_load() {
    let dir = tempfile::tempdir().unwrap();
    let (sgd_path, adamw_path) = (dir.path().join("sgd"), dir.path().join("adamw"));
    let mut sgd_cfg = config(UpdateMode::Sparse);
    sgd_cfg.optimizer = Some(partial_fc::Sgd::default().into());
    let sgd = PartialFc::new(sgd_cfg.clone(), CpuBackend, SingleRank).unwrap();
    sgd.save(&sgd_path).unwrap();
    let adamw = PartialFc::new(config(UpdateMode::Sparse), CpuBackend, SingleRank).unwrap();
    adamw.save(&adamw_path).unwrap();

    let mut target = PartialFc::zeroed(config(UpdateMode::Sparse), CpuBackend, SingleRank).unwrap();
    let err = target.load(&sgd_path).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, PfcError::Checkpoint { .. })
            && text.contains("exp_avg")
            && text.contains("momentum"),
        "{text}"
    );
    assert_eq!(target.weight().unwrap(), vec![0.0; CLASSES as usize * DIM]);
    let err = target.load_resharded(&[&sgd_path]).unwrap_err();
    assert!(err.to_string().contains("exp_avg"), "{err}");

    let mut sgd_target = PartialFc::zeroed(sgd_cfg, CpuBackend, SingleRank).unwrap();
    let err = sgd_target.load(&adamw_path).unwrap_err();
    assert!(err.to_string().contains("exp_avg"), "{err}");

    let mut bare_cfg = config(UpdateMode::Sparse);
    bare_cfg.optimizer = None;
    let mut bare = PartialFc::zeroed(bare_cfg, CpuBackend, SingleRank).unwrap();
    bare.load(&adamw_path).unwrap();
    assert_eq!(bare.weight().unwrap(), adamw.weight().unwrap());
}

/// Three ranks' AdamW files resume on two ranks, moments included, and `reshard` rewrites them.
#[test]
fn resharding_carries_both_moments() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let path = |r: usize| root.join(format!("rank{r}.safetensors"));
    let cfg = config(UpdateMode::Dense);
    let old: Vec<Vec<f32>> = ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(cfg.clone(), CpuBackend, comm).unwrap();
        let (x, labels) = batch(rank as u64);
        layer.forward_backward(&x, &labels).unwrap();
        layer.step(0.01).unwrap();
        layer.save(&path(rank)).unwrap();
        layer.optimizer_state("exp_avg_sq").unwrap()
    });
    let paths: Vec<_> = (0..3).map(path).collect();
    let set = partial_fc::checkpoint::CheckpointSet::open(&paths).unwrap();
    assert_eq!(set.state_names(), ["exp_avg", "exp_avg_sq"]);
    assert!(!set.has_momentum());
    assert_eq!(set.total_values(), 3 * CLASSES * DIM as u64);
    let new: Vec<(Vec<f32>, u64)> = ThreadGroup::run(2, |comm| {
        let mut layer = PartialFc::zeroed(cfg.clone(), CpuBackend, comm).unwrap();
        layer.load_resharded(&paths).unwrap();
        assert_eq!(layer.optimizer_steps(), 1, "the update count is restored");
        (layer.optimizer_state("exp_avg_sq").unwrap(), layer.steps())
    });
    assert_eq!(
        old.concat(),
        new.iter().flat_map(|(v, _)| v.clone()).collect::<Vec<_>>()
    );
    assert!(new.iter().all(|(_, step)| *step == 1));
    let out = root.join("two");
    std::fs::create_dir(&out).unwrap();
    set.write_shard(2, 1, &out.join("rank1.safetensors"), &|_| {})
        .unwrap();
    let rewritten =
        partial_fc::checkpoint::CheckpointSet::open(&[out.join("rank1.safetensors")]).unwrap();
    assert_eq!(rewritten.state_names(), ["exp_avg", "exp_avg_sq"]);
}

#[test]
fn bad_hyper_parameters_are_refused_by_name() {
    for (adamw, name) in [
        (
            AdamW {
                beta1: 1.0,
                ..ADAMW
            },
            "beta1",
        ),
        (
            AdamW {
                beta2: f32::NAN,
                ..ADAMW
            },
            "beta2",
        ),
        (
            AdamW {
                beta2: -0.1,
                ..ADAMW
            },
            "beta2",
        ),
        (AdamW { eps: 0.0, ..ADAMW }, "eps"),
        (
            AdamW {
                eps: f32::INFINITY,
                ..ADAMW
            },
            "eps",
        ),
        (
            AdamW {
                weight_decay: -1.0,
                ..ADAMW
            },
            "weight_decay",
        ),
    ] {
        let mut cfg = config(UpdateMode::Sparse);
        cfg.optimizer = Some(adamw.into());
        match PartialFc::new(cfg, CpuBackend, SingleRank) {
            Err(PfcError::Param { name: got, .. }) => assert_eq!(got, name),
            Err(other) => panic!("{name}: {other}"),
            Ok(_) => panic!("{name}: accepted {adamw:?}"),
        }
    }
}

#[test]
fn optimizer_state_names_and_lengths_are_checked() {
    let mut layer = PartialFc::new(config(UpdateMode::Sparse), CpuBackend, SingleRank).unwrap();
    assert_eq!(layer.state_names(), ["exp_avg", "exp_avg_sq"]);
    let len = CLASSES as usize * DIM;
    assert!(matches!(
        layer.optimizer_state("momentum"),
        Err(PfcError::Shape(s)) if s.contains("exp_avg")
    ));
    assert!(matches!(
        layer.set_momentum(&vec![0.0; len]),
        Err(PfcError::Shape(_))
    ));
    assert!(matches!(
        layer.set_optimizer_state("exp_avg", &[0.0; 3]),
        Err(PfcError::Shape(_))
    ));
    let mut bad = vec![0.5; len];
    bad[len - 1] = f32::NAN;
    assert!(matches!(
        layer.set_optimizer_state("exp_avg_sq", &bad),
        Err(PfcError::Param { .. })
    ));
    assert_eq!(layer.optimizer_state("exp_avg_sq").unwrap(), vec![0.0; len]);
    layer
        .set_optimizer_state("exp_avg_sq", &vec![0.25; len])
        .unwrap();
    assert_eq!(
        layer.optimizer_state("exp_avg_sq").unwrap(),
        vec![0.25; len]
    );
}

const UPDATE: f32 = 1e-3;

/// A layer sampling every class, dense AdamW: the update count is the only thing a pass
/// without a step could change.
fn full_layer() -> PartialFc<CpuBackend, SingleRank> {
    let mut cfg = config(UpdateMode::Dense);
    cfg.sample_rate = 1.0;
    PartialFc::new(cfg, CpuBackend, SingleRank).unwrap()
}

/// As in PyTorch, t counts updates, not passes: a pass whose gradient is never applied (a
/// validation loss) leaves the next update as it would have been. (A review found t taken from
/// the pass counter: one extra pass made the next update 0.744 × lr.)
#[test]
fn a_pass_without_a_step_does_not_change_the_next_update() {
    let (x, labels) = batch(1);
    let (x_eval, labels_eval) = batch(2);
    let mut a = full_layer();
    a.forward_backward(&x, &labels).unwrap();
    a.step(UPDATE).unwrap();
    let mut b = full_layer();
    b.forward_backward(&x_eval, &labels_eval).unwrap();
    b.forward_backward(&x, &labels).unwrap();
    b.step(UPDATE).unwrap();
    assert_eq!((a.steps(), b.steps()), (1, 2));
    assert_eq!((a.optimizer_steps(), b.optimizer_steps()), (1, 1));
    assert_eq!(a.weight().unwrap(), b.weight().unwrap());
}

/// AdamW's first update from zero moments moves no weight by more than lr: |lr·m̂/(√v̂ + ε)| ≤
/// lr. A run resumed from weights alone with `set_steps` (to keep the sampler's sequence) starts
/// from zero moments; with t taken from the pass counter its first update was 3.2 × lr.
#[test]
fn the_first_update_after_set_steps_is_bounded_by_lr() {
    let (x, labels) = batch(3);
    let mut cfg = full_layer().config().clone();
    cfg.optimizer = Some(
        AdamW {
            weight_decay: 0.0,
            ..ADAMW
        }
        .into(),
    );
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    layer.set_steps(100_000);
    let before = layer.weight().unwrap();
    layer.forward_backward(&x, &labels).unwrap();
    layer.step(UPDATE).unwrap();
    let worst = before
        .iter()
        .zip(&layer.weight().unwrap())
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(worst <= UPDATE * 1.0001, "moved {:.2} × lr", worst / UPDATE);
    assert!(worst > 0.5 * UPDATE, "the update did run");
    // set_optimizer_steps: the count a user restores with hand-made moments.
    layer.set_optimizer_steps(41);
    layer.forward_backward(&x, &labels).unwrap();
    layer.step(UPDATE).unwrap();
    assert_eq!(layer.optimizer_steps(), 42);
}

/// A negative second moment would put NaN into the weights (√ of it) at the next update: it is
/// refused from `set_optimizer_state` and from checkpoint files, and nothing changes.
#[test]
fn a_negative_second_moment_is_refused() {
    let mut layer = full_layer();
    let len = layer.weight().unwrap().len();
    let mut bad = vec![0.25; len];
    bad[len - 3] = -1e-9;
    let err = layer.set_optimizer_state("exp_avg_sq", &bad).unwrap_err();
    assert!(
        matches!(
            &err,
            PfcError::Param {
                name: "exp_avg_sq",
                ..
            }
        ) && err.to_string().contains(">= 0"),
        "{err}"
    );
    assert_eq!(layer.optimizer_state("exp_avg_sq").unwrap(), vec![0.0; len]);
    // A negative first moment is fine (it is an average of gradients).
    layer
        .set_optimizer_state("exp_avg", &vec![-0.5; len])
        .unwrap();

    // The same value in a file: no layer can hold it, so patch the bytes of a saved one (the
    // second moment is the last tensor written).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rank0.safetensors");
    layer
        .set_optimizer_state("exp_avg_sq", &vec![0.25; len])
        .unwrap();
    layer.save(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let pattern = 0.25f32.to_le_bytes();
    let last = bytes
        .windows(4)
        .rposition(|w| w == pattern)
        .expect("the second moment's values are in the file");
    bytes[last..last + 4].copy_from_slice(&(-0.25f32).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let mut fresh = full_layer();
    let err = fresh.load(&path).unwrap_err();
    assert!(err.to_string().contains("exp_avg_sq holds -0.25"), "{err}");
    assert_eq!(fresh.optimizer_state("exp_avg_sq").unwrap(), vec![0.0; len]);
    let err = fresh.load_resharded(&[&path]).unwrap_err();
    assert!(err.to_string().contains("exp_avg_sq holds -0.25"), "{err}");
}

#[test]
fn a_decay_factor_of_zero_or_below_is_refused() {
    let mut layer = full_layer();
    let (x, labels) = batch(5);
    layer.forward_backward(&x, &labels).unwrap();
    // λ = 0.1: lr = 10 would multiply every weight by 0.
    let err = layer.step(10.0).unwrap_err();
    assert!(matches!(err, PfcError::Param { name: "lr", .. }), "{err}");
    layer.step(1.0).unwrap();
}

/// The file at `path` as builds before the `optimizer_steps` key wrote it (they took AdamW's t
/// from `step`): the same tensors and metadata, without that key.
fn without_update_count(path: &std::path::Path, out: &std::path::Path) {
    use partial_fc::tensor_file::{write_atomic, OutTensor, TensorFile};
    let f = TensorFile::read(path).unwrap();
    let mut meta = f.metadata().clone();
    assert!(meta.remove("optimizer_steps").is_some());
    let shape = f.shape("weight").unwrap().to_vec();
    let n = shape[0] * shape[1];
    let data: Vec<(&str, Vec<f32>)> = ["weight", "exp_avg", "exp_avg_sq"]
        .into_iter()
        .map(|k| (k, f.f32_block(k, 0, n).unwrap()))
        .collect();
    let tensors: Vec<OutTensor> = data
        .iter()
        .map(|(k, v)| OutTensor::F32(k, shape.clone(), v))
        .collect();
    write_atomic(out, &tensors, meta).unwrap();
}

/// A file without the update count resumes with t = its step counter, as the build that wrote
/// it counted (a review found t restarted at 0: the next update moved the weights 0.62 × as far
/// as the saved run's), through `load` and `load_resharded` alike.
#[test]
fn a_file_without_the_update_count_resumes_with_its_step_counter() {
    let dir = tempfile::tempdir().unwrap();
    let (new_file, old_file) = (dir.path().join("new"), dir.path().join("old"));
    let mut layer = full_layer();
    for s in 0..30 {
        let (x, labels) = batch(s);
        layer.forward_backward(&x, &labels).unwrap();
        layer.step(UPDATE).unwrap();
    }
    layer.save(&new_file).unwrap();
    without_update_count(&new_file, &old_file);
    let mut by_load = full_layer();
    by_load.load(&old_file).unwrap();
    let mut by_set = full_layer();
    by_set.load_resharded(&[&old_file]).unwrap();
    let (x, labels) = batch(30);
    for l in [&mut layer, &mut by_load, &mut by_set] {
        assert_eq!(l.optimizer_steps(), 30);
        l.forward_backward(&x, &labels).unwrap();
        l.step(UPDATE).unwrap();
    }
    assert_eq!(by_load.weight().unwrap(), layer.weight().unwrap());
    assert_eq!(by_set.weight().unwrap(), layer.weight().unwrap());
}
