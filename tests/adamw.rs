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
    AdamWStep { lr, adamw, t }
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

/// bf16 moments: the arithmetic is the f32 update's, only the stores round. From the same
/// (bf16-exact) state, the weights equal the f32 moments' bit for bit, and each stored moment
/// is the f32 moment rounded to nearest even.
#[test]
fn bf16_moments_store_the_rounded_f32_update() {
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
    assert_eq!(m16, bf(m32), "exp_avg is the f32 value rounded to bf16");
    assert_eq!(v16, bf(v32), "exp_avg_sq is the f32 value rounded to bf16");
    assert!(m16.iter().zip(&m0).filter(|(a, b)| a != b).count() > rows * dim / 2);
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

/// The layer's update is the published one applied to its own gradient, with `t` = the step
/// counter: every row in dense mode (PartialFC_V2 under AdamW), the sampled rows in sparse.
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
            let t = layer.steps();
            assert_eq!(t, s + 1);
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

/// A checkpoint carries both moments and the step counter, so a resumed run continues bit for
/// bit (the bias correction counts on from the saved step).
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
