//! `Prediction::ranking_metrics` (precision@k, nDCG@k, recall@k against label sets) against a
//! from-the-definition computation for every row and j, against `top_accuracy` with one label
//! per row, and on hand-checked cases.

mod common;

use common::Rng;
use partial_fc::{PfcError, Prediction};

/// A prediction of `rows` rows of `k` distinct classes out of `classes`.
fn random_prediction(rng: &mut Rng, rows: usize, k: usize, classes: u64) -> Prediction {
    let mut out = Vec::with_capacity(rows * k);
    for _ in 0..rows {
        let mut row: Vec<i64> = Vec::new();
        while row.len() < k {
            let c = rng.below(classes) as i64;
            if !row.contains(&c) {
                row.push(c);
            }
        }
        out.extend(row);
    }
    Prediction {
        k,
        scores: vec![0.0; out.len()],
        classes: out,
    }
}

/// The metrics from their definitions, one row and one j at a time.
fn by_definition(p: &Prediction, sets: &[Vec<i64>]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (k, rows) = (p.k, sets.len());
    let (mut prec, mut ndcg, mut rec) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
    for (row, set) in sets.iter().enumerate() {
        let truth: std::collections::BTreeSet<i64> =
            set.iter().copied().filter(|&c| c >= 0).collect();
        if truth.is_empty() {
            continue;
        }
        for j in 1..=k {
            let top = &p.row(row)[..j];
            let hits = top.iter().filter(|c| truth.contains(c)).count() as f64;
            prec[j - 1] += hits / j as f64;
            rec[j - 1] += hits / truth.len() as f64;
            let dcg: f64 = top
                .iter()
                .enumerate()
                .filter(|(_, c)| truth.contains(c))
                .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
                .sum();
            let idcg: f64 = (0..j.min(truth.len()))
                .map(|i| 1.0 / ((i + 2) as f64).log2())
                .sum();
            ndcg[j - 1] += dcg / idcg;
        }
    }
    let mean = |v: Vec<f64>| v.into_iter().map(|s| s / rows as f64).collect::<Vec<_>>();
    (mean(prec), mean(ndcg), mean(rec))
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-12, "{what}@{}: {g} != {w}", j + 1);
    }
}

#[test]
fn metrics_match_their_definitions_on_random_label_sets() {
    let mut rng = Rng::new(5);
    for case in 0..50 {
        let (rows, k, classes) = (1 + case % 7, 1 + case % 6, 12u64);
        let p = random_prediction(&mut rng, rows, k, classes);
        let sets: Vec<Vec<i64>> = (0..rows)
            .map(|_| {
                // 0..5 labels, some repeated, some padding (-1), some outside the classifier.
                (0..rng.below(6))
                    .map(|_| rng.below(classes + 3) as i64 - 1)
                    .collect()
            })
            .collect();
        let m = p.ranking_metrics(&sets).unwrap();
        let (prec, ndcg, rec) = by_definition(&p, &sets);
        let what = format!("case {case}");
        assert_close(&format!("{what} precision"), &m.precision, &prec);
        assert_close(&format!("{what} ndcg"), &m.ndcg, &ndcg);
        assert_close(&format!("{what} recall"), &m.recall, &rec);
        let labelled = sets.iter().filter(|s| s.iter().any(|&c| c >= 0)).count();
        assert_eq!(m.rows_with_labels, labelled, "{what}");
        for v in m.precision.iter().chain(&m.ndcg).chain(&m.recall) {
            assert!((0.0..=1.0).contains(v), "{what}: {v} outside [0, 1]");
        }
    }
}

#[test]
fn one_label_per_row_gives_top_accuracy() {
    let mut rng = Rng::new(9);
    let p = random_prediction(&mut rng, 200, 5, 20);
    let labels: Vec<i64> = (0..200).map(|_| rng.below(20) as i64).collect();
    let sets: Vec<[i64; 1]> = labels.iter().map(|&l| [l]).collect();
    let m = p.ranking_metrics(&sets).unwrap();
    let top = p.top_accuracy(&labels).unwrap();
    // recall@j is top-j accuracy; precision@1 and nDCG@1 are top-1 accuracy.
    assert_close("recall", &m.recall, &top);
    assert!((m.precision[0] - top[0]).abs() < 1e-12);
    assert!((m.ndcg[0] - top[0]).abs() < 1e-12);
    assert!(top[4] > top[0], "the case must have hits past rank 1");
}

#[test]
fn a_perfect_ranking_scores_one_and_padding_duplicates_are_ignored() {
    let p = Prediction {
        k: 3,
        classes: vec![4, 2, 9, 1, 0, 3],
        scores: vec![0.0; 6],
    };
    // Row 0: exactly its three classes, in some order, padded and with a repeat.
    // Row 1: one true class, predicted first.
    let padded = [9, 2, 4, 4, -1, 1, -1, -1, -1, -1];
    let sets: Vec<&[i64]> = padded.chunks(5).collect();
    let m = p.ranking_metrics(&sets).unwrap();
    assert_eq!(m.ndcg, vec![1.0, 1.0, 1.0]);
    assert_eq!(
        m.recall,
        vec![(1.0 / 3.0 + 1.0) / 2.0, (2.0 / 3.0 + 1.0) / 2.0, 1.0]
    );
    assert_eq!(
        m.precision,
        vec![1.0, (1.0 + 0.5) / 2.0, (1.0 + 1.0 / 3.0) / 2.0]
    );
    assert_eq!(m.rows_with_labels, 2);
}

#[test]
fn a_row_without_labels_scores_zero_and_counts() {
    let p = Prediction {
        k: 1,
        classes: vec![7, 7],
        scores: vec![0.0; 2],
    };
    let m = p.ranking_metrics(&[vec![7], vec![]]).unwrap();
    assert_eq!((m.precision[0], m.ndcg[0], m.recall[0]), (0.5, 0.5, 0.5));
    assert_eq!(m.rows_with_labels, 1);
}

#[test]
fn a_label_set_per_row_is_required() {
    let p = Prediction {
        k: 2,
        classes: vec![1, 2, 3, 4],
        scores: vec![0.0; 4],
    };
    let e = p.ranking_metrics(&[vec![1]]).unwrap_err();
    assert!(matches!(e, PfcError::Shape(_)), "{e}");
    assert!(
        e.to_string()
            .contains("1 label sets for a prediction of 2 rows"),
        "{e}"
    );
    // Too many, from an iterator (a padded matrix's chunks).
    let e = p.ranking_metrics([1i64, 2, 3].chunks(1)).unwrap_err();
    assert!(
        e.to_string()
            .contains("more than 2 label sets for a prediction of 2 rows"),
        "{e}"
    );
}

#[test]
fn a_repeated_predicted_class_counts_once_and_an_endless_iterator_is_refused() {
    // Fields are public: a prediction from elsewhere may repeat a class.
    let p = Prediction {
        k: 3,
        classes: vec![5, 5, 5],
        scores: vec![],
    };
    let m = p.ranking_metrics([[5i64, 6]]).unwrap();
    assert_eq!(m.precision, vec![1.0, 0.5, 1.0 / 3.0]);
    assert_eq!(m.recall, vec![0.5, 0.5, 0.5]);
    assert!(m.ndcg.iter().all(|v| *v <= 1.0), "{:?}", m.ndcg);
    let e = p.ranking_metrics(std::iter::repeat([5i64])).unwrap_err();
    assert!(e.to_string().contains("more than 1 label sets"), "{e}");
}

/// Each rank (or chunk) holds its own rows: merging their metrics, weighted by rows, gives the
/// metrics of all the rows at once, for any split, including empty parts.
#[test]
fn merged_parts_give_the_whole() {
    let mut rng = Rng::new(13);
    for case in 0..30 {
        let (rows, k) = (1 + case % 9, 1 + case % 4);
        let p = random_prediction(&mut rng, rows, k, 10);
        let sets: Vec<Vec<i64>> = (0..rows)
            .map(|_| (0..rng.below(4)).map(|_| rng.below(10) as i64).collect())
            .collect();
        let whole = p.ranking_metrics(&sets).unwrap();
        assert_eq!(whole.rows, rows);
        // Cut the rows at random points (an empty part where two cuts meet).
        let mut cuts: Vec<usize> = (0..3)
            .map(|_| rng.below(rows as u64 + 1) as usize)
            .collect();
        cuts.push(0);
        cuts.push(rows);
        cuts.sort_unstable();
        let parts: Vec<_> = cuts
            .windows(2)
            .map(|w| {
                let part = Prediction {
                    k,
                    classes: p.classes[w[0] * k..w[1] * k].to_vec(),
                    scores: p.scores[w[0] * k..w[1] * k].to_vec(),
                };
                part.ranking_metrics(&sets[w[0]..w[1]]).unwrap()
            })
            .collect();
        let merged = partial_fc::RankingMetrics::merge(&parts).unwrap();
        let what = format!("case {case}, cuts {cuts:?}");
        assert_eq!(merged.rows, rows, "{what}");
        assert_eq!(merged.rows_with_labels, whole.rows_with_labels, "{what}");
        for (name, got, want) in [
            ("precision", &merged.precision, &whole.precision),
            ("ndcg", &merged.ndcg, &whole.ndcg),
            ("recall", &merged.recall, &whole.recall),
        ] {
            assert_eq!(got.len(), want.len(), "{what} {name}");
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-12, "{what} {name}: {g} != {w}");
            }
        }
    }
}

#[test]
fn merging_nothing_or_different_k_is_refused() {
    assert!(matches!(
        partial_fc::RankingMetrics::merge(&[]),
        Err(PfcError::Shape(_))
    ));
    let mut rng = Rng::new(2);
    let sets = vec![vec![1i64]; 3];
    let two = random_prediction(&mut rng, 3, 2, 5)
        .ranking_metrics(&sets)
        .unwrap();
    let three = random_prediction(&mut rng, 3, 3, 5)
        .ranking_metrics(&sets)
        .unwrap();
    match partial_fc::RankingMetrics::merge(&[two, three]) {
        Err(PfcError::Shape(msg)) => assert!(
            msg.contains("ranking metrics of k = 2 and of k = 3 cannot be merged"),
            "{msg}"
        ),
        other => panic!("different k must be refused: {other:?}"),
    }
}

/// PSP@j and PSnDCG@j from their definitions: per row, the weighted hits (and their DCG) of the
/// prediction and of the best ranking of the true classes (by weight, largest first, found by
/// trying every order of a row's few labels), summed over rows, then divided.
fn propensity_by_definition(
    p: &Prediction,
    sets: &[Vec<i64>],
    inv: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let k = p.k;
    let (mut num, mut den, mut nnum, mut nden) =
        (vec![0.0; k], vec![0.0; k], vec![0.0; k], vec![0.0; k]);
    let gain = |i: usize| 1.0 / ((i + 2) as f64).log2();
    for (row, set) in sets.iter().enumerate() {
        let truth: std::collections::BTreeSet<i64> =
            set.iter().copied().filter(|&c| c >= 0).collect();
        if truth.is_empty() {
            continue;
        }
        let truth: Vec<i64> = truth.into_iter().collect();
        // Every order of the true classes: the best one's sums for each j.
        let mut orders = vec![vec![]];
        for &c in &truth {
            orders = orders
                .into_iter()
                .flat_map(|o: Vec<i64>| {
                    (0..=o.len()).map(move |at| {
                        let mut o = o.clone();
                        o.insert(at, c);
                        o
                    })
                })
                .collect();
        }
        for j in 1..=k {
            let top = &p.row(row)[..j];
            let hits: Vec<(usize, i64)> = top
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, c)| truth.contains(c))
                .collect();
            let idcg: f64 = (0..j.min(truth.len())).map(gain).sum();
            num[j - 1] += hits.iter().map(|&(_, c)| inv[c as usize]).sum::<f64>() / j as f64;
            nnum[j - 1] += hits
                .iter()
                .map(|&(i, c)| inv[c as usize] * gain(i))
                .sum::<f64>()
                / idcg;
            let best = |score: &dyn Fn(&[i64]) -> f64| {
                orders
                    .iter()
                    .map(|o| score(&o[..j.min(o.len())]))
                    .fold(0.0f64, f64::max)
            };
            den[j - 1] += best(&|o| o.iter().map(|&c| inv[c as usize]).sum::<f64>()) / j as f64;
            nden[j - 1] += best(&|o| {
                o.iter()
                    .enumerate()
                    .map(|(i, &c)| inv[c as usize] * gain(i))
                    .sum::<f64>()
            }) / idcg;
        }
    }
    let div = |a: Vec<f64>, b: Vec<f64>| -> Vec<f64> {
        a.iter()
            .zip(&b)
            .map(|(x, y)| if *y > 0.0 { x / y } else { 0.0 })
            .collect()
    };
    (div(num, den), div(nnum, nden))
}

#[test]
fn propensity_scored_metrics_match_their_definitions() {
    let mut rng = Rng::new(17);
    let classes = 12u64;
    for case in 0..40 {
        let (rows, k) = (1 + case % 6, 1 + case % 5);
        let p = random_prediction(&mut rng, rows, k, classes);
        let inv: Vec<f64> = (0..classes)
            .map(|_| 1.0 + rng.below(1000) as f64 / 100.0)
            .collect();
        let sets: Vec<Vec<i64>> = (0..rows)
            .map(|_| {
                // 0..4 labels, some repeated, some padding.
                (0..rng.below(5))
                    .map(|_| rng.below(classes + 1) as i64 - 1)
                    .collect()
            })
            .collect();
        let m = p.propensity_scored_metrics(&sets, &inv).unwrap();
        let (psp, psndcg) = propensity_by_definition(&p, &sets, &inv);
        let what = format!("case {case}");
        assert_close(&format!("{what} psp"), &m.psp, &psp);
        assert_close(&format!("{what} psndcg"), &m.psndcg, &psndcg);
        for v in m.psp.iter().chain(&m.psndcg) {
            assert!(
                (0.0..=1.0 + 1e-12).contains(v),
                "{what}: {v} outside [0, 1]"
            );
        }
        // Unit weights: PSP@j is P@j over the best P@j a ranking could reach.
        let ones = vec![1.0; classes as usize];
        let unit = p.propensity_scored_metrics(&sets, &ones).unwrap();
        let plain = p.ranking_metrics(&sets).unwrap();
        for j in 0..k {
            let reachable = unit.psp_ideal[j];
            let want = if reachable > 0.0 {
                plain.precision[j] / reachable
            } else {
                0.0
            };
            assert!((unit.psp[j] - want).abs() < 1e-12, "{what} j {j}");
        }
        // Merging any split gives the whole.
        let cut = rng.below(rows as u64 + 1) as usize;
        let part = |from: usize, to: usize| {
            Prediction {
                k,
                classes: p.classes[from * k..to * k].to_vec(),
                scores: p.scores[from * k..to * k].to_vec(),
            }
            .propensity_scored_metrics(&sets[from..to], &inv)
            .unwrap()
        };
        let merged =
            partial_fc::PropensityMetrics::merge(&[part(0, cut), part(cut, rows)]).unwrap();
        assert_close(&format!("{what} merged psp"), &merged.psp, &m.psp);
        assert_close(&format!("{what} merged psndcg"), &merged.psndcg, &m.psndcg);
        assert_eq!(merged.rows, rows);
    }
}

#[test]
fn inverse_propensities_follow_the_published_model_and_bad_input_is_refused() {
    use partial_fc::layer::inverse_propensities;
    let (n, a, b) = (10_000u64, 0.55, 1.5);
    let inv = inverse_propensities(&[0, 1, 10, 1000], n, a, b).unwrap();
    let c = ((n as f64).ln() - 1.0) * (b + 1.0f64).powf(a);
    for (count, got) in [0u64, 1, 10, 1000].iter().zip(&inv) {
        // p = 1 / (1 + C e^(-A ln(N_l + B)))
        let p = 1.0 / (1.0 + c * (-a * (*count as f64 + b).ln()).exp());
        assert!(
            (got - 1.0 / p).abs() < 1e-9,
            "{count}: {got} vs {}",
            1.0 / p
        );
    }
    assert!(
        inv.windows(2).all(|w| w[0] > w[1]),
        "rarer is heavier: {inv:?}"
    );
    // Pinned, from an independent computation (Python's math module): with B = 1.5 a class
    // seen once weighs exactly ln N, whatever A.
    let pinned = [
        11.873715704849316,
        9.210340371976185,
        4.546862514240743,
        1.3039975909986996,
    ];
    for (got, want) in inv.iter().zip(pinned) {
        assert!((got - want).abs() < 1e-12 * want, "{got} vs {want}");
    }
    assert!((inv[1] - (n as f64).ln()).abs() < 1e-12);
    assert!(inverse_propensities(&[1], 2, a, b).is_err());
    assert!(inverse_propensities(&[1], n, f64::NAN, b).is_err());
    assert!(inverse_propensities(&[1], n, a, 0.0).is_err());
    // A true class beyond the weights, or a weight below 1, is refused by the metrics.
    let p = Prediction {
        k: 1,
        classes: vec![0],
        scores: vec![0.5],
    };
    match p.propensity_scored_metrics([[3]], &[1.0, 1.0]) {
        Err(PfcError::Shape(msg)) => assert!(msg.contains("true class 3"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        p.propensity_scored_metrics([[0]], &[0.5]),
        Err(PfcError::Param { .. })
    ));
}

/// Metrics rebuilt from their fields (as another process sends them) merge like the originals;
/// malformed fields are refused; `is_empty_row` past the end is false, not a panic.
#[test]
fn metrics_rebuilt_from_their_fields_merge_and_bad_fields_are_refused() {
    use partial_fc::{PropensityMetrics, RankingMetrics};
    let mut rng = Rng::new(23);
    let p = random_prediction(&mut rng, 6, 3, 9);
    let sets: Vec<Vec<i64>> = (0..6).map(|r| vec![r % 9, (r * 4) % 9]).collect();
    let m = p.ranking_metrics(&sets).unwrap();
    let rebuilt = RankingMetrics::new(
        m.precision.clone(),
        m.ndcg.clone(),
        m.recall.clone(),
        m.rows_with_labels,
        m.rows,
    )
    .unwrap();
    assert_eq!(rebuilt, m);
    assert_eq!(
        RankingMetrics::merge(&[rebuilt, m.clone()]).unwrap().rows,
        12
    );
    let bad = [
        RankingMetrics::new(vec![], vec![], vec![], 0, 0),
        RankingMetrics::new(vec![0.5], vec![0.5, 0.5], vec![0.5], 1, 1),
        RankingMetrics::new(vec![1.5], vec![0.5], vec![0.5], 1, 1),
        RankingMetrics::new(vec![f64::NAN], vec![0.5], vec![0.5], 1, 1),
        RankingMetrics::new(vec![0.5], vec![0.5], vec![0.5], 2, 1),
    ];
    for (i, b) in bad.iter().enumerate() {
        assert!(matches!(b, Err(PfcError::Shape(_))), "case {i}: {b:?}");
    }
    let inv = vec![2.0; 9];
    let q = p.propensity_scored_metrics(&sets, &inv).unwrap();
    let rebuilt = PropensityMetrics::new(
        q.psp.clone(),
        q.psndcg.clone(),
        q.psp_ideal.clone(),
        q.psndcg_ideal.clone(),
        q.rows_with_labels,
        q.rows,
    )
    .unwrap();
    assert_eq!(rebuilt, q);
    assert!(PropensityMetrics::new(vec![0.1], vec![0.1], vec![-1.0], vec![0.1], 1, 1).is_err());
    assert!(!p.is_empty_row(6) && !p.is_empty_row(usize::MAX));
}
