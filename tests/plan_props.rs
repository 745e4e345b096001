//! Property tests of the memory planner: monotonicity, exact `max_classes`, shard split, fused
//! logits.

use partial_fc::plan::{Component, LogitsMode, Optimizer, PlanConfig};
use partial_fc::{Shard, UpdateMode};
use proptest::prelude::*;

fn config() -> impl Strategy<Value = PlanConfig> {
    (
        (1u64..20_000, 1u64..9, 1u64..65, 1u64..129),
        (
            0.0f64..=1.0,
            0u64..3,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(|((c, k, n, d), (r, opt, dense, fused, hard))| {
            let mut cfg = PlanConfig::new(c.max(k), k, 256 << 20);
            cfg.batch_per_gpu = n;
            cfg.dim = d;
            cfg.sample_rate = r;
            cfg.optimizer =
                [Optimizer::None, Optimizer::SgdMomentum, Optimizer::AdamW][opt as usize];
            cfg.update = if dense {
                UpdateMode::Dense
            } else {
                UpdateMode::Sparse
            };
            cfg.logits = if fused {
                LogitsMode::Fused
            } else {
                LogitsMode::Materialized
            };
            cfg.hard_negatives = hard;
            cfg
        })
}

fn total(cfg: &PlanConfig) -> u64 {
    cfg.rank0_total()
        .expect("small configurations never overflow")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn memory_never_decreases_as_classes_batch_or_dim_grow(cfg in config(), dc in 0u64..5000, dn in 0u64..64, dd in 0u64..64) {
        let base = total(&cfg);
        let more_classes = total(&PlanConfig { classes: cfg.classes + dc, ..cfg });
        let more_batch = total(&PlanConfig { batch_per_gpu: cfg.batch_per_gpu + dn, ..cfg });
        let more_dim = total(&PlanConfig { dim: cfg.dim + dd, ..cfg });
        prop_assert!(more_classes >= base);
        prop_assert!(more_batch >= base);
        prop_assert!(more_dim >= base);
    }

    #[test]
    fn memory_never_decreases_as_r_grows_or_gpus_grow_at_a_fixed_shard(cfg in config(), dr in 0.0f64..1.0, dk in 0u64..64) {
        let shard = cfg.classes.div_ceil(cfg.gpus);
        let at = |k, r| PlanConfig::fc_bytes(&cfg.shape(shard, k, r)).unwrap();
        let base = at(cfg.gpus, cfg.sample_rate);
        prop_assert!(at(cfg.gpus, (cfg.sample_rate + dr).min(1.0)) >= base);
        prop_assert!(at(cfg.gpus + dk, cfg.sample_rate) >= base);
    }

    #[test]
    fn max_classes_fits_and_one_more_does_not(cfg in config(), mem in (1u64 << 16)..(64u64 << 20), reserved in 0u64..(1 << 20)) {
        let cfg = PlanConfig { gpu_memory: mem, reserved, ..cfg };
        let max = cfg.max_classes();
        if max == 0 {
            prop_assert!(!cfg.shard_fits(1, cfg.gpus, cfg.sample_rate));
        } else {
            prop_assert!(max >= cfg.gpus);
            let at_max = PlanConfig { classes: max, ..cfg };
            let one_more = PlanConfig { classes: max + 1, ..cfg };
            prop_assert!(at_max.fits());
            prop_assert!(!one_more.fits());
        }
        if let Some(u) = cfg.upper_bound() {
            prop_assert!(u.classes >= max);
            prop_assert_eq!(cfg.max_classes_on(u.gpus), u.classes);
        }
    }

    #[test]
    fn shard_sizes_sum_to_the_classes_and_rank0_is_the_largest(c in 1u64..1_000_000, k in 1usize..300) {
        prop_assume!(c >= k as u64);
        let shards: Vec<Shard> = (0..k).map(|r| Shard::of(c, k, r)).collect();
        prop_assert_eq!(shards.iter().map(|s| s.len).sum::<u64>(), c);
        prop_assert!(shards.iter().all(|s| s.len <= shards[0].len && s.len >= 1));
        let cfg = PlanConfig::new(c, k as u64, 1 << 30);
        prop_assert_eq!(cfg.rank0_shape().shard_classes, shards[0].len);
    }

    #[test]
    fn fused_mode_has_no_logits_term(cfg in config()) {
        let fused = PlanConfig { logits: LogitsMode::Fused, ..cfg };
        let materialized = PlanConfig { logits: LogitsMode::Materialized, ..cfg };
        let logits = |c: &PlanConfig| c.rank0_components().iter().find(|(k, _)| *k == Component::Logits).unwrap().1;
        prop_assert_eq!(logits(&fused), 0);
        let s = materialized.rank0_shape();
        prop_assert_eq!(logits(&materialized), s.gathered_rows() * s.sampled_stride() * 4);
        prop_assert_eq!(total(&materialized) - total(&fused), logits(&materialized));
    }
}
