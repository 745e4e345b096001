//! End to end in seconds: a tiny synthetic run whose loss falls and whose held-out verification
//! improves over the untrained backbone.

use partial_fc::synthetic::data::GeneratorConfig;
use partial_fc::synthetic::{train, TrainConfig};

fn tiny() -> TrainConfig {
    TrainConfig {
        identities: 400,
        samples_per_identity: 6,
        eval_identities: 100,
        eval_samples_per_identity: 4,
        generator: GeneratorConfig {
            input_dim: 64,
            identity_dim: 16,
            nuisance_dim: 4,
            nuisance_scale: 1.0,
            within_noise: 0.2,
            ..GeneratorConfig::default()
        },
        hidden_dim: 128,
        embedding_dim: 32,
        ranks: 4,
        batch_per_rank: 32,
        sample_rate: 0.1,
        steps: 200,
        warmup_steps: 10,
        ..TrainConfig::default()
    }
}

#[test]
fn tiny_run_learns_and_generalizes_to_held_out_identities() {
    let cfg = tiny();
    let mut events = 0;
    let report = train(&cfg, &mut |ev| {
        events += 1;
        assert_eq!(ev.total, cfg.steps);
    })
    .unwrap();
    assert_eq!(events, cfg.steps);
    assert_eq!(report.losses.len(), cfg.steps);
    assert!(report.losses.iter().all(|l| l.is_finite()));

    let (first, last) = report.loss_drop(10);
    assert!(last < 0.8 * first, "loss {first} → {last} did not fall");

    let (before, after) = (report.before, report.after);
    eprintln!("before {before:?}\nafter {after:?}");
    assert!(
        after.tar_far_1e3 > before.tar_far_1e3 + 0.2,
        "TAR@1e-3 {} → {}",
        before.tar_far_1e3,
        after.tar_far_1e3
    );
    assert!(
        after.top1 > before.top1 + 0.2,
        "top-1 {} → {}",
        before.top1,
        after.top1
    );
    // 100 identities × C(4, 2) genuine pairs, the rest impostors.
    assert_eq!(after.genuine_pairs, 600);
    assert_eq!(after.impostor_pairs, 400 * 399 / 2 - 600);
}

#[test]
fn same_seed_same_run() {
    let cfg = TrainConfig { steps: 5, ..tiny() };
    let a = train(&cfg, &mut |_| {}).unwrap();
    let b = train(&cfg, &mut |_| {}).unwrap();
    assert_eq!(a.losses, b.losses);
    assert_eq!(a.after, b.after);
}

#[test]
fn bad_configuration_is_an_error() {
    let cfg = TrainConfig {
        sample_rate: -0.5,
        ..tiny()
    };
    let err = train(&cfg, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("sample_rate"), "{err}");
}

#[test]
fn any_backend_through_virtual_ranks_trains_the_same() {
    // The generic path (each rank its own backend, host-staged collective) that `--backend cuda`
    // takes, run with the CPU backend: the same run as the thread-group path, step for step.
    let cfg = TrainConfig { steps: 5, ..tiny() };
    let direct = train(&cfg, &mut |_| {}).unwrap();
    let staged =
        partial_fc::synthetic::train_on(&cfg, || Ok(partial_fc::CpuBackend), &mut |_| {}).unwrap();
    assert_eq!(direct.losses, staged.losses);
    assert_eq!(direct.after, staged.after);
}

#[test]
fn a_saved_run_predicts_from_its_files_what_the_layers_predicted() {
    use partial_fc::checkpoint::CheckpointSet;
    use partial_fc::tensor_file::TensorFile;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run"); // created by the run
    let cfg = TrainConfig {
        steps: 60,
        save_to: Some(out.clone()),
        ..tiny()
    };
    let report = train(&cfg, &mut |_| {}).unwrap();
    let paths: Vec<_> = (0..4)
        .map(|r| out.join(format!("rank{r}.safetensors")))
        .collect();
    let set = CheckpointSet::open(&paths).unwrap();
    assert_eq!((set.num_classes(), set.step()), (400, 60));
    let probes = TensorFile::read(&out.join("probes.safetensors")).unwrap();
    let (x, shape) = probes.f32("embeddings").unwrap().unwrap();
    let (labels, _) = probes.i64("labels").unwrap().unwrap();
    assert_eq!(shape, vec![400, 32], "one unseen view of each identity");
    let accuracy = set
        .predict_top_k(&x, 5, &|_| {})
        .unwrap()
        .top_accuracy(&labels)
        .unwrap();
    // The same answer up to float rounding (the two score with GEMMs of other shapes, so a
    // near-tie may swap): at most two of the 400 rows may differ.
    for (files, layer) in [
        (accuracy[0], report.classifier_top1),
        (accuracy[4], report.classifier_top5),
    ] {
        assert!((files - layer).abs() <= 2.0 / 400.0, "{files} vs {layer}");
    }
    assert!(report.classifier_top1 > 0.05, "{}", report.classifier_top1);
    // A file where the folder should be is refused before training.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let cfg = TrainConfig {
        save_to: Some(file),
        ..tiny()
    };
    let err = train(&cfg, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("save_to"), "{err}");
}

/// The classifier trained with AdamW (`--fc-optimizer adamw`) learns as well: the loss falls and
/// held-out verification improves.
#[test]
fn tiny_run_with_an_adamw_classifier_learns() {
    let cfg = TrainConfig {
        fc_optimizer: partial_fc::AdamW::default().into(),
        fc_lr: 0.002,
        ..tiny()
    };
    let report = train(&cfg, &mut |_| {}).unwrap();
    let (first, last) = report.loss_drop(10);
    assert!(last < 0.8 * first, "loss {first} → {last} did not fall");
    let (before, after) = (report.before, report.after);
    assert!(
        after.tar_far_1e3 > before.tar_far_1e3 + 0.2,
        "TAR@1e-3 {} → {}",
        before.tar_far_1e3,
        after.tar_far_1e3
    );
}

/// Gradient accumulation end to end: two micro-batches of 16 rows per rank, summed with
/// gradients of loss / 2, train as one batch of 32 (the same samples: the data order is the
/// same, and r = 1 takes every class either way), step for step up to float rounding.
#[test]
fn two_accumulated_micro_batches_train_as_one_batch_of_both() {
    use partial_fc::UpdateMode;
    let base = TrainConfig {
        steps: 6,
        sample_rate: 1.0,
        fc_update: UpdateMode::Dense,
        ..tiny()
    };
    let whole = train(&base, &mut |_| {}).unwrap();
    let halves = TrainConfig {
        batch_per_rank: 16,
        accumulate: 2,
        ..base.clone()
    };
    let mut samples = Vec::new();
    let accumulated = train(&halves, &mut |e| samples.push(e.samples)).unwrap();
    assert_eq!(
        samples.last(),
        Some(&(6 * 4 * 32)),
        "a step is both micro-batches"
    );
    for (step, (a, w)) in accumulated.losses.iter().zip(&whole.losses).enumerate() {
        assert!(
            (a - w).abs() <= 1e-4 * w.abs(),
            "step {step}: loss {a} accumulated, {w} in one batch"
        );
    }
    // Accumulation needs the dense update.
    let sparse = TrainConfig {
        fc_update: UpdateMode::Sparse,
        ..halves
    };
    let e = train(&sparse, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("--fc-update dense"), "{e}");
}

/// The trainer's MagFace mode: margins from the backbone's norms, the norm's gradient added to
/// the backbone's. It learns, reports the regularizer in its loss (so the loss differs from an
/// ArcFace run's from the first step), and keeps the held-out norms where MagFace's gradients
/// live: with λ above `min_lambda` their mean stays above l_a, where a λ of 0 lets the margin's
/// push (a larger norm, a larger margin) shrink them (this run: means 5.8 and 3.6 against
/// l_a = 4.4; ArcFace's backbone ends at 8.8).
#[test]
fn magface_mode_learns_and_its_regularizer_holds_the_norms() {
    use partial_fc::synthetic::RowMarginMode;
    use partial_fc::MagFace;
    let base = TrainConfig {
        steps: 120,
        ..tiny()
    };
    let arcface = train(&base, &mut |_| {}).unwrap();
    let (mean, _, _) = arcface.embedding_norms;
    // A range around the backbone's norms, and λ well above what it needs there.
    let range = MagFace {
        lower_norm: 0.5 * mean,
        upper_norm: 1.5 * mean,
        ..MagFace::default()
    };
    let need = range.min_lambda(base.margin.scale);
    let run = |lambda: f64| {
        let cfg = TrainConfig {
            row_margins: RowMarginMode::MagFace(MagFace { lambda, ..range }),
            ..base.clone()
        };
        train(&cfg, &mut |_| {}).unwrap()
    };
    let held = run(2.0 * need);
    assert!(held.losses.iter().all(|l| l.is_finite()));
    assert_ne!(
        held.losses[0], arcface.losses[0],
        "the regularizer is in the loss"
    );
    assert!(
        held.after.tar_far_1e3 > held.before.tar_far_1e3 + 0.2,
        "{:?}",
        held.after
    );
    let free = run(0.0);
    eprintln!(
        "norms: arcface {:?}, λ = 2·min {:?}, λ = 0 {:?} (l_a {})",
        arcface.embedding_norms, held.embedding_norms, free.embedding_norms, range.lower_norm
    );
    assert!(
        held.embedding_norms.0 > free.embedding_norms.0,
        "λ pulls the norms up"
    );
    assert!(
        held.embedding_norms.0 > range.lower_norm,
        "{:?}",
        held.embedding_norms
    );
}
