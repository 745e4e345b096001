//! `forward_backward_weighted`: a weight per row of the loss. Weights of 1 give the unweighted
//! pass bit for bit; weights of 2 double the loss and every gradient exactly (every step after
//! the softmax is linear, and doubling is exact in floating point); a weighted gradient is the
//! weighted sum of single-row gradients; ranks agree with one rank; bad weights and ranks that
//! disagree on weighting are refused on every rank; `PairBatch::row_weights` weighs rows alike.

use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::multi_label::PairBatch;
use partial_fc::{
    Collective, CpuBackend, LayerConfig, Margin, PartialFc, PfcError, Shard, UpdateMode,
};

const CLASSES: u64 = 300;
const DIM: usize = 16;
const ROWS: usize = 12;

fn config(world: usize, rate: f64) -> LayerConfig {
    let mut c = LayerConfig::new(CLASSES, DIM, ROWS.div_ceil(world));
    c.sample_rate = rate;
    c.update = UpdateMode::Dense;
    c
}

fn batch() -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(7, 0, ROWS, DIM, 1.0);
    let labels = (0..ROWS as i64)
        .map(|i| (i * 37 + 5) % CLASSES as i64)
        .collect();
    (x, labels)
}

#[test]
fn unit_weights_are_the_unweighted_pass_bit_for_bit() {
    let (x, labels) = batch();
    for world in [1, 3] {
        let run = |weighted: bool| {
            ThreadGroup::run(world, |comm| {
                let rank = comm.rank();
                let rows = Shard::of(ROWS as u64, world, rank);
                let (r0, r1) = (rows.start as usize, rows.end() as usize);
                let (x, labels) = (&x[r0 * DIM..r1 * DIM], &labels[r0..r1]);
                let mut layer = PartialFc::new(config(world, 0.5), CpuBackend, comm).unwrap();
                let out = if weighted {
                    let ones = vec![1.0; labels.len()];
                    layer.forward_backward_weighted(x, labels, &ones).unwrap()
                } else {
                    layer.forward_backward(x, labels).unwrap()
                };
                layer.step(0.1).unwrap();
                (out, layer.weight().unwrap())
            })
        };
        let (plain, weighted) = (run(false), run(true));
        for (rank, (a, b)) in plain.iter().zip(&weighted).enumerate() {
            assert_eq!(a.0, b.0, "world {world} rank {rank}");
            assert!(a.1 == b.1, "world {world} rank {rank}: weights after step");
        }
    }
}

#[test]
fn doubled_weights_double_the_loss_and_every_gradient_exactly() {
    let (x, labels) = batch();
    let mut a = PartialFc::new(config(1, 0.5), CpuBackend, SingleRank).unwrap();
    let mut b = PartialFc::new(config(1, 0.5), CpuBackend, SingleRank).unwrap();
    let plain = a.forward_backward(&x, &labels).unwrap();
    let twice = b
        .forward_backward_weighted(&x, &labels, &[2.0; ROWS])
        .unwrap();
    assert_eq!(twice.loss, 2.0 * plain.loss);
    let doubled: Vec<f32> = plain.grad_embeddings.iter().map(|g| 2.0 * g).collect();
    assert_eq!(twice.grad_embeddings, doubled);
    let dense: Vec<f32> = a
        .weight_grad_dense()
        .unwrap()
        .iter()
        .map(|g| 2.0 * g)
        .collect();
    assert_eq!(b.weight_grad_dense().unwrap(), dense);
}

/// With r = 1 every pass samples the same classes, so passes differ only in their weights: the
/// weighted gradients are the weighted sums of the gradients of each row alone.
#[test]
fn a_weighted_gradient_is_the_weighted_sum_of_single_row_gradients() {
    let (x, labels) = batch();
    let weights: Vec<f32> = (0..ROWS).map(|i| [0.25, 1.5, 0.0, 3.0][i % 4]).collect();
    let mut layer = PartialFc::new(config(1, 1.0), CpuBackend, SingleRank).unwrap();
    let got = layer
        .forward_backward_weighted(&x, &labels, &weights)
        .unwrap();
    let got_dense = layer.weight_grad_dense().unwrap();
    let (mut loss, mut grad, mut dense) = (
        0.0f64,
        vec![0.0f64; ROWS * DIM],
        vec![0.0f64; got_dense.len()],
    );
    for j in 0..ROWS {
        let mut one_hot = vec![0.0; ROWS];
        one_hot[j] = 1.0;
        let part = layer
            .forward_backward_weighted(&x, &labels, &one_hot)
            .unwrap();
        loss += f64::from(weights[j]) * f64::from(part.loss);
        for (g, p) in grad.iter_mut().zip(&part.grad_embeddings) {
            *g += f64::from(weights[j]) * f64::from(*p);
        }
        for (g, p) in dense.iter_mut().zip(layer.weight_grad_dense().unwrap()) {
            *g += f64::from(weights[j]) * f64::from(p);
        }
    }
    let close = |a: f32, b: f64, scale: f64| (f64::from(a) - b).abs() <= 1e-5 * scale;
    assert!(close(got.loss, loss, loss.abs()), "{} vs {loss}", got.loss);
    let scale = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    for (i, (a, b)) in got.grad_embeddings.iter().zip(&grad).enumerate() {
        assert!(close(*a, *b, scale), "embedding gradient {i}: {a} vs {b}");
    }
    let scale = dense.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    for (i, (a, b)) in got_dense.iter().zip(&dense).enumerate() {
        assert!(close(*a, *b, scale), "class gradient {i}: {a} vs {b}");
    }
    // A row of weight 0 has no embedding gradient.
    assert!(got.grad_embeddings[2 * DIM..3 * DIM]
        .iter()
        .all(|&g| g == 0.0));
}

#[test]
fn ranks_give_what_one_rank_gives() {
    let (x, labels) = batch();
    let weights: Vec<f32> = (0..ROWS).map(|i| 0.5 + i as f32 / 4.0).collect();
    // Uneven rows: rank 1 passes fewer than batch_per_rank (4); 11 rows in all.
    let cuts = [0, 4, 7, 11];
    let (x, labels, weights) = (&x[..11 * DIM], &labels[..11], &weights[..11]);
    let mut one = PartialFc::new(config(1, 1.0), CpuBackend, SingleRank).unwrap();
    let want = one.forward_backward_weighted(x, labels, weights).unwrap();
    let parts = ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let (r0, r1) = (cuts[rank], cuts[rank + 1]);
        let mut layer = PartialFc::new(config(3, 1.0), CpuBackend, comm).unwrap();
        layer
            .forward_backward_weighted(&x[r0 * DIM..r1 * DIM], &labels[r0..r1], &weights[r0..r1])
            .unwrap()
    });
    let grads: Vec<f32> = parts
        .iter()
        .flat_map(|p| p.grad_embeddings.clone())
        .collect();
    for p in &parts {
        assert!(
            (p.loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
            "{} vs {}",
            p.loss,
            want.loss
        );
    }
    let scale = want
        .grad_embeddings
        .iter()
        .fold(0.0f32, |m, g| m.max(g.abs()));
    for (a, b) in grads.iter().zip(&want.grad_embeddings) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
}

#[test]
fn bad_weights_and_mixed_calls_are_refused_on_every_rank() {
    let (x, labels) = batch();
    let mut one = PartialFc::new(config(1, 0.5), CpuBackend, SingleRank).unwrap();
    match one.forward_backward_weighted(&x, &labels, &[1.0; ROWS - 1]) {
        Err(PfcError::Shape(msg)) => assert!(msg.contains("one weight per row"), "{msg}"),
        other => panic!("{other:?}"),
    }
    for bad in [-1.0, f32::NAN, f32::INFINITY, 1e30, 1.5e6] {
        let mut w = vec![1.0; ROWS];
        w[4] = bad;
        match one.forward_backward_weighted(&x, &labels, &w) {
            Err(PfcError::Param { name, value, .. }) => {
                assert_eq!(name, "weights");
                assert!(value.contains("at row 4"), "{value}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    // Nothing changed: the next pass runs.
    one.forward_backward_weighted(&x, &labels, &[1.0; ROWS])
        .unwrap();
    // One rank's bad weight stops both; one rank weighted and one not: refused by name.
    let half = ROWS / 2;
    for case in 0..2 {
        let errors = ThreadGroup::run(2, |comm| {
            let rank = comm.rank();
            let (r0, r1) = (rank * half, (rank + 1) * half);
            let mut layer = PartialFc::new(config(2, 0.5), CpuBackend, comm).unwrap();
            let (x, labels) = (&x[r0 * DIM..r1 * DIM], &labels[r0..r1]);
            let mut w = vec![1.0; half];
            let e = match (case, rank) {
                (0, 1) => {
                    w[0] = -2.0;
                    layer.forward_backward_weighted(x, labels, &w)
                }
                (0, _) => layer.forward_backward_weighted(x, labels, &w),
                (_, 0) => layer.forward_backward(x, labels),
                _ => layer.forward_backward_weighted(x, labels, &w),
            }
            .unwrap_err();
            // The group still works.
            layer.forward_backward(x, labels).unwrap();
            e.to_string()
        });
        if case == 0 {
            assert!(
                errors[0].contains("rank 1 rejected its input"),
                "{errors:?}"
            );
            assert!(errors[1].contains("weights"), "{errors:?}");
        } else {
            assert!(
                errors[0].contains(
                    "rank 1 called forward_backward_weighted while rank 0 called forward_backward"
                ),
                "{errors:?}"
            );
        }
    }
}

/// `PairBatch::row_weights`: 1/labels of each copy's row, so every row weighs 1 in all; with
/// one label per row it is the unweighted pass.
#[test]
fn pair_batch_row_weights_weigh_every_row_alike() {
    let dim = DIM;
    let (x, _) = batch();
    let sets: Vec<Vec<i64>> = (0..ROWS as i64)
        .map(|i| {
            (0..1 + i % 3)
                .map(|j| (i * 11 + j * 101) % CLASSES as i64)
                .collect()
        })
        .collect();
    let pairs = PairBatch::new(&x, dim, &sets).unwrap();
    let w = pairs.row_weights();
    assert_eq!(w.len(), pairs.len());
    for row in 0..ROWS {
        let copies = pairs.copies_of(row).unwrap();
        let sum: f32 = w[copies.clone()].iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "row {row}: {sum}");
    }
    let mut cfg = config(1, 1.0);
    cfg.batch_per_rank = pairs.len();
    cfg.margin = Margin::combined(30.0, 1.0, 0.0, 0.0);
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let out = pairs.forward_backward_per_row(&mut layer).unwrap();
    assert_eq!(out.grad_embeddings.len(), ROWS * dim);
    assert!(out.loss.is_finite() && out.loss > 0.0);
    let single: Vec<Vec<i64>> = sets.iter().map(|s| vec![s[0]]).collect();
    let one_each = PairBatch::new(&x, dim, &single).unwrap();
    assert!(one_each.row_weights().iter().all(|&w| w == 1.0));
    let mut a = PartialFc::new(config(1, 1.0), CpuBackend, SingleRank).unwrap();
    let mut b = PartialFc::new(config(1, 1.0), CpuBackend, SingleRank).unwrap();
    assert_eq!(
        one_each.forward_backward(&mut a).unwrap(),
        one_each.forward_backward_per_row(&mut b).unwrap()
    );
}

/// The accumulating form: unit weights accumulate what `forward_backward_accumulate` does, bit
/// for bit; weights of 2 a doubled sum; a weighted and an unweighted accumulating call on two
/// ranks are refused by name.
#[test]
fn weighted_accumulation_sums_weighted_passes() {
    let (x, labels) = batch();
    let run = |w: Option<f32>| {
        let mut layer = PartialFc::new(config(1, 0.5), CpuBackend, SingleRank).unwrap();
        for pass in 0..2 {
            let rows = pass * 6..(pass + 1) * 6;
            let (x, labels) = (&x[rows.start * DIM..rows.end * DIM], &labels[rows]);
            match w {
                None => layer.forward_backward_accumulate(x, labels).unwrap(),
                Some(w) => layer
                    .forward_backward_accumulate_weighted(x, labels, &[w; 6])
                    .unwrap(),
            };
        }
        assert_eq!(layer.pending_passes(), 2);
        layer.weight_grad_dense().unwrap()
    };
    let plain = run(None);
    assert!(plain.iter().any(|&g| g != 0.0));
    assert_eq!(run(Some(1.0)), plain);
    let doubled: Vec<f32> = plain.iter().map(|g| 2.0 * g).collect();
    assert_eq!(run(Some(2.0)), doubled);
    let errors = ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(2, 0.5), CpuBackend, comm).unwrap();
        let (x, labels) = (
            &x[rank * 6 * DIM..(rank + 1) * 6 * DIM],
            &labels[rank * 6..(rank + 1) * 6],
        );
        let e = if rank == 0 {
            layer.forward_backward_accumulate(x, labels).unwrap_err()
        } else {
            layer
                .forward_backward_accumulate_weighted(x, labels, &[1.0; 6])
                .unwrap_err()
        };
        e.to_string()
    });
    assert!(
        errors[0].contains("forward_backward_accumulate_weighted"),
        "{errors:?}"
    );
}
