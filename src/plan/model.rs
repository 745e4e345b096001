//! What the planner says about a configuration: per-component bytes, the fit, the largest class
//! count, the upper bound on classes over cluster sizes, the fewest GPUs for a target, and
//! the largest sample rate.
//!
//! Every search rests on two monotonicities of [`step_buffers`](super::step_buffers), which
//! the property tests check:
//! - rank 0's bytes depend on C only through its shard, `ceil(C / k)`, and never decrease as
//!   the shard grows; so the largest C that fits on k GPUs is exactly `k · s*(k)`, where `s*(k)`
//!   is the largest shard that fits (a binary search);
//! - at a fixed shard, bytes never decrease as k grows (the gathered batch `N·k` grows), so
//!   `s*(k)` is non-increasing in k, and on any range of cluster sizes `[lo, hi]`,
//!   `max_classes(k) <= hi · s*(lo)`: the bound that lets a branch-and-bound search over
//!   k in `[1, 2^32]` be exact while evaluating only a few hundred k.

use super::buffers::Component;
use super::config::{PlanConfig, MAX_GPUS, MAX_SHARD_CLASSES};
use crate::error::{PfcError, Result};
use std::collections::HashMap;

/// The upper bound over cluster sizes: the most classes this configuration (at its sample rate;
/// with r = 1, model parallelism's bound) can train on any number of GPUs, and the smallest
/// cluster that reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperBound {
    /// The largest `max_classes` over every cluster size (0 when nothing fits anywhere).
    pub classes: u64,
    /// The smallest number of GPUs that reaches it (1 when nothing fits anywhere).
    pub gpus: u64,
}

impl PlanConfig {
    /// Whether a rank holding `shard` classes in a group of `gpus`, at `sample_rate`, fits on
    /// the device together with the reserve.
    pub fn shard_fits(&self, shard: u64, gpus: u64, sample_rate: f64) -> bool {
        let shape = self.shape(shard, gpus, sample_rate);
        PlanConfig::fc_bytes(&shape)
            .is_some_and(|b| b.saturating_add(self.reserved) <= self.gpu_memory)
    }

    /// Whether this configuration fits (rank 0, the largest shard, is the binding one).
    pub fn fits(&self) -> bool {
        self.shard_fits(
            self.classes.div_ceil(self.gpus.max(1)),
            self.gpus,
            self.sample_rate,
        )
    }

    /// The largest shard that fits on one of `gpus` GPUs (0 when not even one class fits).
    pub fn max_shard(&self, gpus: u64) -> u64 {
        let fits = |s| self.shard_fits(s, gpus, self.sample_rate);
        if !fits(1) {
            return 0;
        }
        if fits(MAX_SHARD_CLASSES) {
            return MAX_SHARD_CLASSES;
        }
        // invariant: fits(lo), !fits(hi)
        let (mut lo, mut hi) = (1, MAX_SHARD_CLASSES);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The largest number of classes that fits on this configuration's GPUs: C fits and C + 1
    /// does not (or would exceed the 2^31 − 1 classes a shard can index). 0 when nothing fits.
    pub fn max_classes(&self) -> u64 {
        self.max_classes_on(self.gpus)
    }

    /// [`PlanConfig::max_classes`] on `gpus` GPUs instead of this configuration's (saturating at
    /// `u64::MAX` for absurd cluster sizes).
    pub fn max_classes_on(&self, gpus: u64) -> u64 {
        gpus.saturating_mul(self.max_shard(gpus))
    }

    /// The smallest k at which not even a one-class shard fits (bytes grow with k at a fixed
    /// shard), or `None` when one still fits on [`MAX_GPUS`] GPUs.
    fn first_gpus_where_nothing_fits(&self) -> Option<u64> {
        let fits = |k| self.shard_fits(1, k, self.sample_rate);
        if fits(MAX_GPUS) {
            return None;
        }
        if !fits(1) {
            return Some(1);
        }
        let (mut lo, mut hi) = (1, MAX_GPUS);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(hi)
    }

    /// The upper bound over cluster sizes (at this sample rate): the largest [`max_classes`](PlanConfig::max_classes)
    /// over every cluster size k, with everything else of this configuration held fixed, and
    /// the smallest k that reaches it.
    ///
    /// It exists because the gathered-embedding buffers (`N·k × d`) grow with k until not even
    /// one class fits; `None` only when a one-class shard still fits on 2^32 GPUs (a tiny batch
    /// and dimension on a huge device), where the search stops.
    pub fn upper_bound(&self) -> Option<UpperBound> {
        let k_none = self.first_gpus_where_nothing_fits()?;
        if k_none == 1 {
            return Some(UpperBound {
                classes: 0,
                gpus: 1,
            });
        }
        let mut s_star = ShardCache::new(self);
        let value = |k: u64, s: &mut ShardCache| k * s.get(k);
        let (lo0, hi0) = (1, k_none - 1);
        let mut best = UpperBound {
            classes: value(lo0, &mut s_star),
            gpus: lo0,
        };
        let consider = |k: u64, classes: u64, best: &mut UpperBound| {
            if classes > best.classes || (classes == best.classes && k < best.gpus) {
                *best = UpperBound { classes, gpus: k };
            }
        };
        let v = value(hi0, &mut s_star);
        consider(hi0, v, &mut best);
        let mut stack = vec![(lo0, hi0)];
        while let Some((lo, hi)) = stack.pop() {
            if hi - lo <= 1 {
                continue;
            }
            let bound = u128::from(hi) * u128::from(s_star.get(lo));
            let best_c = u128::from(best.classes);
            if bound < best_c || (bound == best_c && lo >= best.gpus) {
                continue;
            }
            let mid = lo + (hi - lo) / 2;
            let v = value(mid, &mut s_star);
            consider(mid, v, &mut best);
            stack.push((lo, mid));
            stack.push((mid, hi));
        }
        Some(best)
    }

    /// The smallest number of GPUs on which `classes` classes fit, everything else of this
    /// configuration held fixed; `None` when no cluster size does (the target is above the
    /// upper bound). A cluster never has more GPUs than classes.
    pub fn min_gpus_for(&self, classes: u64) -> Option<u64> {
        self.min_gpus_in_steps(classes, 1)
    }

    /// The fewest whole nodes of `gpus_per_node` GPUs on which `classes` classes fit, everything
    /// else held fixed; `None` when no number of nodes does (or `gpus_per_node` is 0). Not
    /// [`min_gpus_for`](Self::min_gpus_for) rounded up: memory is not monotone in the GPU count
    /// (the gathered batch grows with it), so the next multiple of the node size above the
    /// fewest GPUs may not fit while a later one does, or none does.
    ///
    /// ```
    /// use partial_fc::plan::PlanConfig;
    /// let cfg = PlanConfig::new(29_000_000, 8, 32 << 30);
    /// let gpus = cfg.min_gpus_for(cfg.classes).unwrap();
    /// let nodes = cfg.min_nodes_for(cfg.classes, 8).unwrap();
    /// assert!(nodes * 8 >= gpus);
    /// ```
    pub fn min_nodes_for(&self, classes: u64, gpus_per_node: u64) -> Option<u64> {
        if gpus_per_node == 0 {
            return None;
        }
        self.min_gpus_in_steps(classes, gpus_per_node)
            .map(|k| k / gpus_per_node)
    }

    /// The smallest multiple of `step` GPUs on which `classes` classes fit.
    fn min_gpus_in_steps(&self, classes: u64, step: u64) -> Option<u64> {
        if classes == 0 {
            return None;
        }
        let k_max = match self.first_gpus_where_nothing_fits() {
            Some(k_none) => (k_none - 1).min(classes),
            None => MAX_GPUS.min(classes),
        };
        let n_max = k_max / step;
        if n_max == 0 {
            return None;
        }
        let mut s_star = ShardCache::new(self);
        let target = u128::from(classes);
        // Over node counts n (k = n·step GPUs), depth-first, left half first: the first leaf
        // found is the smallest. The largest shard that fits falls as k grows, so no k in
        // [lo, hi] holds more than hi·s*(lo) classes: a range below the target is skipped.
        let mut stack = vec![(1u64, n_max)];
        while let Some((lo, hi)) = stack.pop() {
            if u128::from(hi * step) * u128::from(s_star.get(lo * step)) < target {
                continue;
            }
            if lo == hi {
                return Some(lo * step);
            }
            let mid = lo + (hi - lo) / 2;
            stack.push((mid + 1, hi));
            stack.push((lo, mid));
        }
        None
    }

    /// The largest sample rate r in [0, 1] at which this configuration fits (to the precision
    /// of an `f64`), or `None` when it does not fit even with positives only (r = 0).
    pub fn max_sample_rate(&self) -> Option<f64> {
        let shard = self.classes.div_ceil(self.gpus.max(1));
        let fits = |r| self.shard_fits(shard, self.gpus, r);
        if !fits(0.0) {
            return None;
        }
        if fits(1.0) {
            return Some(1.0);
        }
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..2048 {
            let mid = lo + (hi - lo) / 2.0;
            if mid <= lo || mid >= hi {
                break;
            }
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }
}

/// `s*(k)`, the largest shard that fits on k GPUs, memoized for the searches over k.
struct ShardCache<'a> {
    config: &'a PlanConfig,
    values: HashMap<u64, u64>,
}

impl<'a> ShardCache<'a> {
    fn new(config: &'a PlanConfig) -> Self {
        ShardCache {
            config,
            values: HashMap::new(),
        }
    }

    fn get(&mut self, gpus: u64) -> u64 {
        let config = self.config;
        *self
            .values
            .entry(gpus)
            .or_insert_with(|| config.max_shard(gpus))
    }
}

/// Everything the planner says about one configuration.
///
/// ```
/// use partial_fc::plan::{Plan, PlanConfig};
/// // 29M identities on 8 GPUs of 32 GiB, 128 images per GPU, d = 512, r = 0.1.
/// let plan = Plan::new(PlanConfig::new(29_000_000, 8, 32 << 30)).unwrap();
/// assert!(plan.fits);
/// assert_eq!(plan.shard_classes, 3_625_000);
/// assert_eq!(plan.sampled_classes, 362_500);
/// // Each logits row is padded to a multiple of 8 columns (aligned rows for the GEMMs).
/// assert_eq!(plan.component("logits"), Some(1024 * 362_504 * 4));
/// // max_classes is exact: it fits, one more class does not.
/// let at = |c| partial_fc::plan::PlanConfig { classes: c, ..plan.config };
/// assert!(at(plan.max_classes).fits() && !at(plan.max_classes + 1).fits());
/// let bound = plan.upper_bound.unwrap();
/// assert!(bound.classes >= plan.max_classes);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The configuration planned.
    pub config: PlanConfig,
    /// Classes of rank 0's shard, the largest: `ceil(C / k)`.
    pub shard_classes: u64,
    /// Classes rank 0 samples per step at most (the sampled capacity S).
    pub sampled_classes: u64,
    /// Bytes of every buffer of rank 0's step, by component, the reserve last.
    pub components: Vec<(Component, u64)>,
    /// Their sum.
    pub total_bytes: u64,
    /// Whether the total fits in the device memory.
    pub fits: bool,
    /// The largest class count that fits on these GPUs ([`PlanConfig::max_classes`]).
    pub max_classes: u64,
    /// The upper bound over cluster sizes ([`PlanConfig::upper_bound`]).
    pub upper_bound: Option<UpperBound>,
    /// The fewest GPUs on which these classes fit ([`PlanConfig::min_gpus_for`]).
    pub min_gpus: Option<u64>,
    /// The largest sample rate that fits ([`PlanConfig::max_sample_rate`]).
    pub max_sample_rate: Option<f64>,
}

impl Plan {
    /// Validates `config` and plans it.
    pub fn new(config: PlanConfig) -> Result<Plan> {
        config.validate()?;
        let shape = config.rank0_shape();
        let components = config.rank0_components();
        if components.is_empty() {
            return Err(PfcError::param(
                "classes",
                config.classes,
                "the per-GPU memory of this configuration exceeds 2^63 bytes",
            ));
        }
        let total_bytes = components.iter().map(|(_, b)| b).sum::<u64>();
        Ok(Plan {
            config,
            shard_classes: shape.shard_classes,
            sampled_classes: shape.sampled_capacity(),
            fits: total_bytes <= config.gpu_memory,
            total_bytes,
            components,
            max_classes: config.max_classes(),
            upper_bound: config.upper_bound(),
            min_gpus: config.min_gpus_for(config.classes),
            max_sample_rate: config.max_sample_rate(),
        })
    }

    /// Bytes of the component of that snake_case name, if it exists.
    pub fn component(&self, name: &str) -> Option<u64> {
        self.components
            .iter()
            .find(|(c, _)| c.name() == name)
            .map(|(_, b)| *b)
    }

    /// The plan as one JSON object: `total_bytes`, `fits`, `max_classes`,
    /// `upper_bound_classes`, `upper_bound_gpus` (null without a bound), `components`
    /// (name -> bytes), and the inputs and other answers.
    pub fn to_json(&self) -> serde_json::Value {
        let components: serde_json::Map<String, serde_json::Value> = self
            .components
            .iter()
            .map(|(c, b)| (c.name().to_string(), (*b).into()))
            .collect();
        let c = &self.config;
        serde_json::json!({
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "max_classes": self.max_classes,
            "upper_bound_classes": self.upper_bound.map(|u| u.classes),
            // no cluster size "reaches" zero classes
            "upper_bound_gpus": self.upper_bound.filter(|u| u.classes > 0).map(|u| u.gpus),
            "components": components,
            "gpu_memory_bytes": c.gpu_memory,
            "free_bytes": c.gpu_memory.saturating_sub(self.total_bytes),
            "classes": c.classes,
            "gpus": c.gpus,
            "batch_per_gpu": c.batch_per_gpu,
            "dim": c.dim,
            "sample_rate": c.sample_rate,
            "shard_classes": self.shard_classes,
            "sampled_classes": self.sampled_classes,
            "min_gpus": self.min_gpus,
            "max_sample_rate": self.max_sample_rate,
            // What was planned, spelled as `pfc plan` takes it, so that a script reading the
            // answer also reads the question.
            "reserved_bytes": c.reserved,
            "weight_dtype": dtype_name(c.weight_dtype),
            "optimizer": match c.optimizer {
                super::Optimizer::None => "none",
                super::Optimizer::SgdMomentum => "sgd-momentum",
                super::Optimizer::AdamW => "adamw",
            },
            "state_dtype": dtype_name(c.state_dtype),
            "update": match c.update {
                crate::config::UpdateMode::Sparse => "sparse",
                crate::config::UpdateMode::Dense => "dense",
            },
            "logits": match c.logits {
                super::LogitsMode::Materialized => "materialized",
                super::LogitsMode::Fused => "fused",
            },
            "wire_dtype": dtype_name(c.wire_dtype),
            "grad_wire_dtype": dtype_name(c.grad_wire_dtype),
            "hard_negatives": c.hard_negatives,
            "gemm_precision": c.gemm_precision.name(),
        })
    }
}

/// A dtype as `pfc plan`'s options spell it.
fn dtype_name(d: super::Dtype) -> &'static str {
    match d {
        super::Dtype::F32 => "f32",
        super::Dtype::F16 => "f16",
        super::Dtype::Bf16 => "bf16",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpdateMode;
    use crate::plan::LogitsMode;

    fn small() -> PlanConfig {
        let mut c = PlanConfig::new(10_000, 4, 64 << 20);
        c.batch_per_gpu = 32;
        c.dim = 64;
        c
    }

    #[test]
    fn max_classes_is_exact() {
        for cfg in [small(), PlanConfig::new(29_000_000, 8, 32 << 30)] {
            let max = cfg.max_classes();
            assert!(max > 0);
            assert!(PlanConfig {
                classes: max,
                ..cfg
            }
            .fits());
            assert!(!PlanConfig {
                classes: max + 1,
                ..cfg
            }
            .fits());
        }
    }

    #[test]
    fn nothing_fits_gives_zero() {
        let cfg = PlanConfig {
            reserved: 64 << 20,
            ..small()
        };
        assert_eq!(cfg.max_classes(), 0);
        assert_eq!(
            cfg.upper_bound(),
            Some(UpperBound {
                classes: 0,
                gpus: 1
            })
        );
        assert_eq!(cfg.min_gpus_for(10), None);
        assert_eq!(cfg.max_sample_rate(), None);
    }

    /// The branch-and-bound result equals a plain scan over every k where one class fits.
    #[test]
    fn upper_bound_matches_an_exhaustive_scan() {
        for (r, logits) in [
            (0.1, LogitsMode::Materialized),
            (1.0, LogitsMode::Materialized),
            (0.0, LogitsMode::Materialized),
            (0.1, LogitsMode::Fused),
        ] {
            let mut cfg = small();
            cfg.gpu_memory = 4 << 20;
            cfg.sample_rate = r;
            cfg.logits = logits;
            let k_none = cfg.first_gpus_where_nothing_fits().unwrap();
            assert!(k_none < 2000, "scan too long: {k_none}");
            let mut best = UpperBound {
                classes: 0,
                gpus: 1,
            };
            for k in 1..k_none {
                let v = cfg.max_classes_on(k);
                if v > best.classes {
                    best = UpperBound {
                        classes: v,
                        gpus: k,
                    };
                }
            }
            assert_eq!(cfg.upper_bound(), Some(best), "r {r} {logits:?}");
            // min_gpus_for agrees with the scan too, and so does min_nodes_for in whole nodes
            for target in [1, best.classes / 3, best.classes, best.classes + 1] {
                let want = (1..k_none).find(|&k| k <= target && cfg.max_classes_on(k) >= target);
                assert_eq!(cfg.min_gpus_for(target), want, "target {target}");
                for per_node in [3u64, 8] {
                    let want = (1..k_none)
                        .filter(|k| k % per_node == 0)
                        .find(|&k| k <= target && cfg.max_classes_on(k) >= target)
                        .map(|k| k / per_node);
                    assert_eq!(
                        cfg.min_nodes_for(target, per_node),
                        want,
                        "target {target}, {per_node} GPUs a node"
                    );
                }
            }
        }
    }

    #[test]
    fn max_sample_rate_fits_and_a_little_more_does_not() {
        let mut cfg = small();
        cfg.classes = 200_000;
        cfg.update = UpdateMode::Sparse;
        let r = cfg.max_sample_rate().unwrap();
        assert!(r > 0.0 && r < 1.0, "{r}");
        assert!(PlanConfig {
            sample_rate: r,
            ..cfg
        }
        .fits());
        assert!(!PlanConfig {
            sample_rate: (r + 1e-4).min(1.0),
            ..cfg
        }
        .fits());
    }

    #[test]
    fn plan_json_has_the_documented_keys() {
        let plan = Plan::new(small()).unwrap();
        let json = plan.to_json();
        for key in [
            "total_bytes",
            "fits",
            "max_classes",
            "upper_bound_classes",
            "upper_bound_gpus",
            "components",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        let sum: u64 = json["components"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(sum, json["total_bytes"].as_u64().unwrap());
    }
}
