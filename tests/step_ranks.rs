//! k ranks (threads) compute what one rank computes: the loss, the embedding gradients (each rank
//! its own rows, concatenated) and the class-center gradients (each rank its shard,
//! concatenated), for uneven shards and a batch that does not split evenly; with the whole shard
//! (r = 1) and with a given sample (r < 1). One rank at r = 1 equals a plain full softmax (the
//! f64 reference of tests/common). After `step(lr)`, sparse or dense, the weights agree too.

mod common;

use common::{assert_close_rows, reference, to_f64, RefMargin, Rng};
use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::{
    Collective, CpuBackend, GradMode, LayerConfig, Margin, PartialFc, Sgd, Shard, UpdateMode,
};

const CLASSES: u64 = 1003;
const DIM: usize = 16;
const BATCH: usize = 37;
const WORLDS: [usize; 5] = [1, 2, 3, 4, 8];

struct Data {
    x: Vec<f32>,
    w: Vec<f32>,
    labels: Vec<i64>,
}

/// Class centers N(0, 1); each embedding is its class center's direction plus noise (cosine to
/// its target around 0.85, as in training), so that no loss sits on the 1e-30 floor.
fn data(seed: u64) -> Data {
    let mut rng = Rng::new(seed);
    let w = rng.normal_vec(CLASSES as usize * DIM, 1.0);
    let labels: Vec<i64> = (0..BATCH).map(|_| rng.below(CLASSES) as i64).collect();
    let mut x = Vec::with_capacity(BATCH * DIM);
    for &l in &labels {
        let row = &w[l as usize * DIM..(l as usize + 1) * DIM];
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        let scale = 0.5 + 2.0 * rng.uniform() as f32;
        for v in row {
            x.push(scale * (v / norm + 0.15 * rng.normal() as f32));
        }
    }
    Data { x, w, labels }
}

/// A given sample: every label plus `extra` other classes, sorted and unique.
fn given_sample(d: &Data, extra: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed);
    let mut s: Vec<i64> = d.labels.clone();
    while s.len() < d.labels.len() + extra {
        s.push(rng.below(CLASSES) as i64);
    }
    s.sort_unstable();
    s.dedup();
    s
}

#[derive(Clone, Copy)]
struct Setup {
    margin: Margin,
    sample_rate: f64,
    update: UpdateMode,
    /// Optimizer steps (lr 0.1) taken, each after a forward/backward (0: none).
    steps: usize,
}

/// What a world computes, gathered in rank order.
#[derive(Debug)]
struct World {
    loss: f32,
    grad_x: Vec<f64>,
    grad_w: Vec<f64>,
    weight: Vec<f64>,
}

fn config(s: &Setup, batch_per_rank: usize) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, batch_per_rank);
    cfg.sample_rate = s.sample_rate;
    cfg.margin = s.margin;
    cfg.update = s.update;
    cfg.optimizer = Some(
        Sgd {
            momentum: 0.9,
            weight_decay: 5e-4,
            ..Sgd::default()
        }
        .into(),
    );
    cfg
}

/// One rank's results: loss, its rows' grad_x, its shard's grad_w, its shard's weight.
type RankPart = (f32, Vec<f32>, Vec<f32>, Vec<f32>);

/// One rank's part: forward/backward (and `steps` optimizer steps, repeating the pass before
/// each later one), returning (loss, own grad_x, shard grad_w, shard weight after the steps).
fn one_rank<C: Collective<CpuBackend>>(
    s: &Setup,
    d: &Data,
    sample: Option<&[i64]>,
    rows: std::ops::Range<usize>,
    batch_per_rank: usize,
    comm: C,
) -> RankPart {
    let mut layer = PartialFc::zeroed(config(s, batch_per_rank), CpuBackend, comm).unwrap();
    let shard = layer.shard();
    let (a, b) = (shard.start as usize * DIM, shard.end() as usize * DIM);
    layer.set_weight(&d.w[a..b]).unwrap();
    let x = &d.x[rows.start * DIM..rows.end * DIM];
    let labels = &d.labels[rows];
    let pass = |layer: &mut PartialFc<CpuBackend, C>| match sample {
        Some(ids) => layer.forward_backward_with_sample(x, labels, ids).unwrap(),
        None => layer.forward_backward(x, labels).unwrap(),
    };
    let out = pass(&mut layer);
    let grad_w = layer.weight_grad_dense().unwrap();
    for i in 0..s.steps {
        if i > 0 {
            pass(&mut layer);
        }
        layer.step(0.1).unwrap();
    }
    (
        out.loss,
        out.grad_embeddings,
        grad_w,
        layer.weight().unwrap(),
    )
}

/// Rows of each rank: `per` consecutive rows each, the last ranks taking what is left (maybe 0).
fn split(world: usize, per: usize) -> Vec<std::ops::Range<usize>> {
    (0..world)
        .map(|r| (r * per).min(BATCH)..((r + 1) * per).min(BATCH))
        .collect()
}

fn run_world(s: &Setup, d: &Data, sample: Option<&[i64]>, world: usize, per: usize) -> World {
    let parts = if world == 1 {
        vec![one_rank(s, d, sample, 0..BATCH, BATCH, SingleRank)]
    } else {
        let ranges = split(world, per);
        ThreadGroup::run(world, |comm| {
            let rank = Collective::<CpuBackend>::rank(&comm);
            one_rank(s, d, sample, ranges[rank].clone(), per, comm)
        })
    };
    for p in &parts {
        assert_eq!(p.0, parts[0].0, "every rank reports the same loss");
    }
    let cat = |f: &dyn Fn(&RankPart) -> &Vec<f32>| {
        parts
            .iter()
            .flat_map(|p| to_f64(f(p)))
            .collect::<Vec<f64>>()
    };
    World {
        loss: parts[0].0,
        grad_x: cat(&|p| &p.1),
        grad_w: cat(&|p| &p.2),
        weight: cat(&|p| &p.3),
    }
}

fn assert_worlds_agree(what: &str, got: &World, want: &World) {
    let rel = |a: f32, b: f32| (f64::from(a) - f64::from(b)).abs() / f64::from(b).abs();
    assert!(
        rel(got.loss, want.loss) < 1e-6,
        "{what}: loss {} vs {}",
        got.loss,
        want.loss
    );
    let floor = |v: &[f64]| 1e-6 * v.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    assert_close_rows(
        &format!("{what} grad_x"),
        &got.grad_x,
        &want.grad_x,
        DIM,
        1e-5,
        floor(&want.grad_x),
    );
    assert_close_rows(
        &format!("{what} grad_w"),
        &got.grad_w,
        &want.grad_w,
        DIM,
        1e-5,
        floor(&want.grad_w),
    );
    assert_close_rows(
        &format!("{what} weight"),
        &got.weight,
        &want.weight,
        DIM,
        1e-5,
        floor(&want.weight),
    );
}

fn margins() -> [Margin; 2] {
    [
        Margin::arcface(),
        Margin {
            grad_mode: GradMode::Exact,
            interclass_filter: Some(0.5),
            fallback: partial_fc::TargetFallback::Monotonic,
            ..Margin::combined(48.0, 1.2, 0.3, 0.15)
        },
    ]
}

#[test]
fn shards_are_uneven_and_the_batch_does_not_split_evenly() {
    // Guards the premise of the tests below: with C = 1003 every k > 1 has unequal shards, and
    // 37 rows never split evenly.
    for &k in &WORLDS[1..] {
        let lens: Vec<u64> = (0..k).map(|r| Shard::of(CLASSES, k, r).len).collect();
        assert!(lens.iter().any(|&l| l != lens[0]), "k = {k}: {lens:?}");
        assert_ne!(BATCH % k, 0);
    }
}

#[test]
fn k_ranks_equal_one_rank_with_the_whole_shard() {
    let d = data(1);
    for margin in margins() {
        let s = Setup {
            margin,
            sample_rate: 1.0,
            update: UpdateMode::Sparse,
            steps: 0,
        };
        let single = run_world(&s, &d, None, 1, BATCH);
        for &k in &WORLDS[1..] {
            let got = run_world(&s, &d, None, k, BATCH.div_ceil(k));
            assert_worlds_agree(&format!("k = {k}, r = 1"), &got, &single);
        }
    }
}

#[test]
fn k_ranks_equal_one_rank_with_a_given_sample() {
    let d = data(2);
    let sample = given_sample(&d, 50, 7);
    for margin in margins() {
        let s = Setup {
            margin,
            sample_rate: 0.1,
            update: UpdateMode::Sparse,
            steps: 0,
        };
        let single = run_world(&s, &d, Some(&sample), 1, BATCH);
        for &k in &WORLDS[1..] {
            let got = run_world(&s, &d, Some(&sample), k, BATCH.div_ceil(k));
            assert_worlds_agree(&format!("k = {k}, given sample"), &got, &single);
        }
        // Class centers outside the sample get no gradient.
        for c in (0..CLASSES as i64).filter(|c| sample.binary_search(c).is_err()) {
            let row = &single.grad_w[c as usize * DIM..(c as usize + 1) * DIM];
            assert!(row.iter().all(|&g| g == 0.0), "class {c} is not sampled");
        }
    }
}

#[test]
fn ranks_with_fewer_rows_than_their_peers_or_none_change_nothing() {
    // k = 8 with 6 rows per rank: ranks 0..=5 hold 6 rows, rank 6 one row, rank 7 none.
    let d = data(3);
    let s = Setup {
        margin: Margin::arcface(),
        sample_rate: 1.0,
        update: UpdateMode::Dense,
        steps: 1,
    };
    assert_eq!(split(8, 6)[7].len(), 0);
    let single = run_world(&s, &d, None, 1, BATCH);
    let got = run_world(&s, &d, None, 8, 6);
    assert_worlds_agree("k = 8, an empty rank", &got, &single);
}

#[test]
fn one_rank_with_the_whole_shard_is_a_plain_full_softmax() {
    let d = data(4);
    let (x, w) = (to_f64(&d.x), to_f64(&d.w));
    for margin in margins() {
        let s = Setup {
            margin,
            sample_rate: 1.0,
            update: UpdateMode::Sparse,
            steps: 0,
        };
        let got = run_world(&s, &d, None, 1, BATCH);
        let all: Vec<usize> = (0..CLASSES as usize).collect();
        let want = reference(&x, &w, &d.labels, DIM, &all, &RefMargin::of(&margin));
        assert!(
            (f64::from(got.loss) - want.loss).abs() < 1e-5 * want.loss,
            "loss {} vs full softmax {}",
            got.loss,
            want.loss
        );
        let floor = |v: &[f64]| 1e-5 * v.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        assert_close_rows(
            "grad_x",
            &got.grad_x,
            &want.grad_x,
            DIM,
            1e-4,
            floor(&want.grad_x),
        );
        assert_close_rows(
            "grad_w",
            &got.grad_w,
            &want.grad_w,
            DIM,
            1e-4,
            floor(&want.grad_w),
        );

        // With a given sample the same softmax runs over the sampled columns only.
        let sample = given_sample(&d, 50, 9);
        let cols: Vec<usize> = sample.iter().map(|&c| c as usize).collect();
        let got = run_world(
            &Setup {
                sample_rate: 0.1,
                ..s
            },
            &d,
            Some(&sample),
            1,
            BATCH,
        );
        let want = reference(&x, &w, &d.labels, DIM, &cols, &RefMargin::of(&margin));
        assert!((f64::from(got.loss) - want.loss).abs() < 1e-5 * want.loss);
        assert_close_rows(
            "sampled grad_x",
            &got.grad_x,
            &want.grad_x,
            DIM,
            1e-4,
            floor(&want.grad_x),
        );
        assert_close_rows(
            "sampled grad_w",
            &got.grad_w,
            &want.grad_w,
            DIM,
            1e-4,
            floor(&want.grad_w),
        );
    }
}

#[test]
fn k_ranks_equal_one_rank_after_sparse_and_dense_steps() {
    let d = data(5);
    let sample = given_sample(&d, 50, 11);
    let before = to_f64(&d.w);
    for update in [UpdateMode::Sparse, UpdateMode::Dense] {
        for (rate, sample) in [(1.0, None), (0.1, Some(sample.as_slice()))] {
            let s = Setup {
                margin: Margin::arcface(),
                sample_rate: rate,
                update,
                steps: 2,
            };
            let single = run_world(&s, &d, sample, 1, BATCH);
            let moved = single
                .weight
                .iter()
                .zip(&before)
                .filter(|(a, b)| a != b)
                .count();
            assert!(moved > 0, "{update:?}: the step must move the weights");
            if let (UpdateMode::Sparse, Some(ids)) = (update, sample) {
                // Sparse: rows outside the sample do not move; dense: weight decay moves them.
                for c in (0..CLASSES as usize).filter(|c| ids.binary_search(&(*c as i64)).is_err())
                {
                    assert_eq!(
                        single.weight[c * DIM..(c + 1) * DIM],
                        before[c * DIM..(c + 1) * DIM]
                    );
                }
            }
            for &k in &WORLDS[1..] {
                let got = run_world(&s, &d, sample, k, BATCH.div_ceil(k));
                assert_worlds_agree(&format!("{update:?} r = {rate}, k = {k}"), &got, &single);
            }
        }
    }
}
