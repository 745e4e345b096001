//! `multi_label::PairBatch`: the expansion into (row, label) pairs and the gradient's fold back
//! to the rows on hand-computed cases, padding and repeats, typed errors on bad shapes, the
//! folded gradient against central differences of an independent f64 loss (tests/common), and a
//! short multi-label training run of the example's kind that must rise clearly above chance.

mod common;

use common::{assert_close_rows, ref_loss, to_f64, RefMargin, Rng};
use partial_fc::collective::SingleRank;
use partial_fc::multi_label::PairBatch;
use partial_fc::{AdamW, CpuBackend, LayerConfig, Margin, Optimizer, PartialFc, PfcError};

#[test]
fn expansion_and_fold_by_hand() {
    // Three rows of dimension 2; row 1 has no label, row 2 lists class 2 twice and pads with -1.
    let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let sets: Vec<Vec<i64>> = vec![vec![5, 1], vec![], vec![2, -1, 2, 0]];
    let p = PairBatch::new(&x, 2, &sets).unwrap();
    assert_eq!((p.rows(), p.dim(), p.len()), (3, 2, 4));
    assert!(!p.is_empty());
    // Copies of a row in ascending class order, rows in order.
    assert_eq!(p.labels(), &[1, 5, 0, 2]);
    assert_eq!(p.source_rows(), &[0, 0, 2, 2]);
    assert_eq!(p.embeddings(), &[1.0, 2.0, 1.0, 2.0, 5.0, 6.0, 5.0, 6.0]);
    assert_eq!(p.copies_of(0), Some(0..2));
    assert_eq!(p.copies_of(1), Some(2..2));
    assert_eq!(p.copies_of(2), Some(2..4));
    assert_eq!(p.copies_of(3), None);

    let g = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0, 1000.0, 2000.0];
    assert_eq!(
        p.fold_grad(&g).unwrap(),
        vec![11.0, 22.0, 0.0, 0.0, 1100.0, 2200.0]
    );
    // fold_grad_into adds to what is there.
    let mut out = vec![0.5; 6];
    p.fold_grad_into(&g, &mut out).unwrap();
    assert_eq!(out, vec![11.5, 22.5, 0.5, 0.5, 1100.5, 2200.5]);
}

#[test]
fn padding_and_repeats_are_skipped() {
    let x = [0.25f32; 4 * 3];
    // A padded matrix of width 4 passed as chunks, as to ranking_metrics.
    let labels = [
        7,
        7,
        7,
        -1, // one class, three times
        -1,
        -1,
        -1,
        -1, // no label
        i64::MIN,
        3,
        -5,
        9, // any negative value is padding
        9,
        3,
        9,
        3, // repeats in any order
    ];
    let p = PairBatch::new(&x, 3, labels.chunks(4)).unwrap();
    assert_eq!(p.labels(), &[7, 3, 9, 3, 9]);
    assert_eq!(p.source_rows(), &[0, 2, 2, 3, 3]);
    assert_eq!(p.embeddings().len(), 5 * 3);

    // Only padding: no copies, a zero gradient of the rows' shape.
    let p = PairBatch::new(&x, 3, [[-1i64]; 4]).unwrap();
    assert!(p.is_empty());
    assert_eq!(p.rows(), 4);
    assert_eq!(p.fold_grad(&[]).unwrap(), vec![0.0; 12]);

    // No rows at all.
    let p = PairBatch::new(&[], 8, std::iter::empty::<&[i64]>()).unwrap();
    assert_eq!((p.rows(), p.len()), (0, 0));
    assert!(p.fold_grad(&[]).unwrap().is_empty());
}

#[test]
fn bad_shapes_are_typed_errors() {
    let x = [1.0f32; 6];
    let sets = [[0i64], [1]];
    assert!(matches!(
        PairBatch::new(&x, 0, sets),
        Err(PfcError::Param { name: "dim", .. })
    ));
    // 6 values are not whole rows of 4.
    assert!(matches!(
        PairBatch::new(&x, 4, [[0i64]]),
        Err(PfcError::Shape(_))
    ));
    // 2 rows of 3: one set too few, one too many.
    assert!(matches!(
        PairBatch::new(&x, 3, [[0i64]]),
        Err(PfcError::Shape(_))
    ));
    assert!(matches!(
        PairBatch::new(&x, 3, [[0i64], [1], [2]]),
        Err(PfcError::Shape(_))
    ));
    let p = PairBatch::new(&x, 3, sets).unwrap();
    // The gradient is per copy (2 × 3), the output per row (2 × 3).
    assert!(matches!(p.fold_grad(&[0.0; 5]), Err(PfcError::Shape(_))));
    assert!(matches!(p.fold_grad(&[0.0; 9]), Err(PfcError::Shape(_))));
    let mut out = vec![7.0f32; 4];
    assert!(matches!(
        p.fold_grad_into(&[1.0; 6], &mut out),
        Err(PfcError::Shape(_))
    ));
    assert_eq!(
        out,
        vec![7.0; 4],
        "a refused fold leaves the output unchanged"
    );
}

#[test]
fn an_expanded_batch_too_large_to_allocate_is_an_error_not_an_abort() {
    // One row of 2^24 values and 2^22 distinct labels: 2^46 values, 256 TiB, more than a
    // 47-bit address space holds (inputs: 64 MiB + 32 MiB), and more than Linux's default
    // (heuristic) overcommit grants in one allocation on any machine with less memory and swap
    // than that; only `vm.overcommit_memory = 1` on a 57-bit machine would let it through.
    let dim = 1usize << 24;
    let x = vec![1.0f32; dim];
    let labels: Vec<i64> = (0..1i64 << 22).collect();
    match PairBatch::new(&x, dim, [&labels]) {
        Err(PfcError::Shape(msg)) => assert!(msg.contains("expanded"), "{msg}"),
        other => panic!("expected a shape error, got {:?}", other.map(|p| p.len())),
    }
}

#[test]
fn pass_errors_name_the_original_row() {
    let dim = 4;
    let mut cfg = LayerConfig::new(10, dim, 16);
    cfg.sample_rate = 1.0;
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let x: Vec<f32> = (0..3 * dim).map(|i| 1.0 + i as f32).collect();
    // Row 2's class 10 is outside [0, 10); its copy is copy 4 (rows 0 and 1 have two each).
    let p = PairBatch::new(&x, dim, [vec![0, 1], vec![2, 3], vec![10]]).unwrap();
    match p.forward_backward(&mut layer) {
        Err(PfcError::Label { row, label, .. }) => assert_eq!((row, label), (2, 10)),
        other => panic!("expected a label error, got {other:?}"),
    }
    // A NaN in row 1 (copies 1 and 2: row 0 has one label).
    let mut bad = x.clone();
    bad[dim + 1] = f32::NAN;
    let p = PairBatch::new(&bad, dim, [vec![0], vec![2, 3], vec![4]]).unwrap();
    match p.forward_backward(&mut layer) {
        Err(PfcError::NonFinite { row, .. }) => assert_eq!(row, 1),
        other => panic!("expected a non-finite error, got {other:?}"),
    }
}

/// The loss the layer computes for the expanded batch of rows `x`, in f64: the mean over the
/// copies of each copy's softmax cross-entropy (r = 1: every class is sampled).
fn expanded_loss(p: &PairBatch, x: &[f64], w: &[f64], classes: usize, m: &RefMargin) -> f64 {
    let d = p.dim();
    let copies: Vec<f64> = p
        .source_rows()
        .iter()
        .flat_map(|&r| x[r * d..(r + 1) * d].iter().copied())
        .collect();
    let cols: Vec<usize> = (0..classes).collect();
    ref_loss(&copies, w, p.labels(), d, &cols, m)
}

#[test]
fn folded_gradient_is_the_gradient_of_the_copies_mean_loss() {
    // d L / d x_i where L is the mean over every copy's loss and each copy of row i is x_i:
    // the folded gradient must equal central differences of L as a function of the rows.
    const CLASSES: usize = 12;
    const DIM: usize = 6;
    let mut rng = Rng::new(11);
    let rows = 5;
    let x = rng.normal_vec(rows * DIM, 1.0);
    let sets: Vec<Vec<i64>> = vec![
        vec![0, 3, 7],
        vec![],
        vec![3],
        vec![1, 2, 11, 2],
        vec![5, 9],
    ];
    let p = PairBatch::new(&x, DIM, &sets).unwrap();
    assert_eq!(p.len(), 9);

    // A plain scaled softmax: no margin and no kink, so the layer's straight-through gradient
    // is the exact one.
    let margin = Margin::combined(4.0, 1.0, 0.0, 0.0);
    let mut cfg = LayerConfig::new(CLASSES as u64, DIM, p.len());
    cfg.sample_rate = 1.0;
    cfg.margin = margin;
    cfg.optimizer = None;
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let w = to_f64(&layer.weight().unwrap());
    let m = RefMargin::of(&margin);

    let out = p.forward_backward(&mut layer).unwrap();
    assert_eq!(out.grad_embeddings.len(), rows * DIM);
    let x64 = to_f64(&x);
    let loss = expanded_loss(&p, &x64, &w, CLASSES, &m);
    assert!(
        (f64::from(out.loss) - loss).abs() <= 1e-4 * loss.max(1.0),
        "layer loss {} vs reference {loss}",
        out.loss
    );

    let eps = 1e-5;
    let mut numeric = vec![0.0; rows * DIM];
    for (i, g) in numeric.iter_mut().enumerate() {
        let (mut plus, mut minus) = (x64.clone(), x64.clone());
        plus[i] += eps;
        minus[i] -= eps;
        *g = (expanded_loss(&p, &plus, &w, CLASSES, &m)
            - expanded_loss(&p, &minus, &w, CLASSES, &m))
            / (2.0 * eps);
    }
    let got = to_f64(&out.grad_embeddings);
    assert_close_rows("folded grad", &got, &numeric, DIM, 2e-3, 1e-6);
    // The row without labels: exactly zero.
    assert!(out.grad_embeddings[DIM..2 * DIM].iter().all(|&g| g == 0.0));
    // And the by-hand route agrees bit for bit.
    let raw = layer.forward_backward(p.embeddings(), p.labels()).unwrap();
    assert_eq!(
        p.fold_grad(&raw.grad_embeddings).unwrap(),
        out.grad_embeddings
    );
}

/// Synthetic multi-label data as examples/multi_label.rs makes it: unit prototypes, 2..=4
/// distinct classes per row from a power law, embedding = normalized sum of the prototypes +
/// noise. Returns (x, labels padded to width 4).
fn xmc_split(
    rng: &mut Rng,
    protos: &[f32],
    cdf: &[f64],
    dim: usize,
    rows: usize,
) -> (Vec<f32>, Vec<i64>) {
    const WIDTH: usize = 4;
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        let n = 2 + rng.below(3) as usize;
        let mut set: Vec<i64> = Vec::new();
        while set.len() < n {
            let u = rng.uniform();
            let c = cdf.partition_point(|&s| s <= u).min(cdf.len() - 1) as i64;
            if !set.contains(&c) {
                set.push(c);
            }
        }
        let mut sum = vec![0.0f32; dim];
        for &c in &set {
            let p = &protos[c as usize * dim..(c as usize + 1) * dim];
            sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt();
        let sigma = 0.5 / (dim as f64).sqrt();
        x.extend(sum.iter().map(|v| v / norm + (sigma * rng.normal()) as f32));
        set.resize(WIDTH, -1);
        labels.extend(set);
    }
    (x, labels)
}

#[test]
fn multi_label_training_ranks_held_out_labels_above_chance() {
    const CLASSES: usize = 2_000;
    const DIM: usize = 32;
    const WIDTH: usize = 4;
    const BATCH_ROWS: usize = 64;
    let started = std::time::Instant::now();
    let mut rng = Rng::new(3);
    let mut protos = rng.normal_vec(CLASSES * DIM, 1.0);
    for p in protos.chunks_mut(DIM) {
        let n = p.iter().map(|v| v * v).sum::<f32>().sqrt();
        p.iter_mut().for_each(|v| *v /= n);
    }
    let weights: Vec<f64> = (0..CLASSES).map(|c| ((c + 1) as f64).powf(-0.6)).collect();
    let total: f64 = weights.iter().sum();
    let cdf: Vec<f64> = weights
        .iter()
        .scan(0.0, |s, w| {
            *s += w / total;
            Some(*s)
        })
        .collect();
    let (train_x, train_y) = xmc_split(&mut rng, &protos, &cdf, DIM, 8_000);
    let (test_x, test_y) = xmc_split(&mut rng, &protos, &cdf, DIM, 500);

    let mut cfg = LayerConfig::new(CLASSES as u64, DIM, BATCH_ROWS * WIDTH);
    cfg.sample_rate = 0.1;
    cfg.margin = Margin::combined(30.0, 1.0, 0.0, 0.0);
    cfg.optimizer = Some(Optimizer::AdamW(AdamW::default()));
    let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    let p1 = |layer: &mut PartialFc<CpuBackend, SingleRank>| {
        let top = layer.predict_top_k_all(&test_x, 5).unwrap();
        top.ranking_metrics(test_y.chunks(WIDTH)).unwrap()
    };
    let before = p1(&mut layer);

    let rows = train_y.len() / WIDTH;
    let mut losses = Vec::new();
    for epoch in 0..3 {
        let mut sum = 0.0;
        let mut steps = 0;
        for start in (0..rows).step_by(BATCH_ROWS) {
            let end = (start + BATCH_ROWS).min(rows);
            let p = PairBatch::new(
                &train_x[start * DIM..end * DIM],
                DIM,
                train_y[start * WIDTH..end * WIDTH].chunks(WIDTH),
            )
            .unwrap();
            let out = p.forward_backward(&mut layer).unwrap();
            assert_eq!(out.grad_embeddings.len(), (end - start) * DIM);
            layer.step(0.01 * (1.0 - epoch as f32 / 3.0)).unwrap();
            sum += out.loss;
            steps += 1;
        }
        losses.push(sum / steps as f32);
    }
    let after = p1(&mut layer);

    // Chance: always predicting the most frequent held-out class.
    let mut counts = std::collections::HashMap::new();
    for &c in test_y.iter().filter(|&&c| c >= 0) {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let chance = *counts.values().max().unwrap() as f64 / 500.0;
    eprintln!(
        "losses {losses:?}; P@1 before {:.4}, after {:.4}, chance {chance:.4}; P@5 after {:.4}, nDCG@5 {:.4}; {:.2} s",
        before.precision[0],
        after.precision[0],
        after.precision[4],
        after.ndcg[4],
        started.elapsed().as_secs_f64()
    );
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
    assert!(
        after.precision[0] >= before.precision[0] + 0.1,
        "{after:?} vs {before:?}"
    );
    assert!(
        after.precision[0] >= 2.0 * chance,
        "P@1 {} vs chance {chance}",
        after.precision[0]
    );
    assert!(after.ndcg[4] > before.ndcg[4] + 0.05);
}

/// Two ranks with uneven numbers of copies (one rank's rows have labels only on one side, and
/// two rows none at all) train as one rank with all the rows: the same loss (the mean over
/// every rank's copies) and the same folded gradients, to rounding.
#[test]
fn ranks_with_uneven_copies_train_as_one_rank() {
    use partial_fc::collective::ThreadGroup;
    use partial_fc::Collective;
    let d = 4;
    let config = || {
        let mut c = LayerConfig::new(10, d, 8);
        c.sample_rate = 1.0;
        c.margin = Margin::combined(30.0, 1.0, 0.0, 0.0);
        c
    };
    let x: Vec<f32> = (0..4 * d)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let sets: Vec<Vec<i64>> = vec![vec![1, 2, 3], vec![4], vec![-1], vec![-1]];
    let whole = PairBatch::new(&x, d, &sets).unwrap();
    let mut one = PartialFc::new(config(), CpuBackend, SingleRank).unwrap();
    let want = whole.forward_backward(&mut one).unwrap();
    let got = ThreadGroup::run(2, |comm| {
        let r = comm.rank();
        let mut layer = PartialFc::new(config(), CpuBackend, comm).unwrap();
        let mine =
            PairBatch::new(&x[r * 2 * d..(r + 1) * 2 * d], d, &sets[r * 2..(r + 1) * 2]).unwrap();
        assert_eq!(mine.len(), if r == 0 { 4 } else { 0 });
        let out = mine.forward_backward(&mut layer).unwrap();
        (out.loss, out.grad_embeddings)
    });
    let grads: Vec<f32> = got.iter().flat_map(|g| g.1.clone()).collect();
    assert_eq!(grads.len(), want.grad_embeddings.len());
    for (a, b) in grads.iter().zip(&want.grad_embeddings) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert!(
        grads[2 * d..].iter().all(|&g| g == 0.0),
        "rows without labels: zero"
    );
    for (loss, _) in &got {
        assert!((loss - want.loss).abs() < 1e-5, "{loss} vs {}", want.loss);
    }
}
