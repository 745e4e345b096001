//! A small full-softmax layer (r = 1) and its batches, shared by the tests that compare runs
//! across world sizes or collectives: with r < 1 each shard samples its own fraction and the
//! sample depends on the split, with r = 1 the step's arithmetic is the same for every split.

use partial_fc::LayerConfig;

pub const CLASSES: u64 = 1003;
pub const DIM: usize = 24;
/// Rows of the whole batch, split over the ranks by `Shard::of(BATCH, world, rank)`.
pub const BATCH: usize = 30;

/// The layer of one of `world` ranks (each takes up to ⌈BATCH / world⌉ rows).
pub fn config(world: usize) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH.div_ceil(world));
    cfg.sample_rate = 1.0;
    cfg
}

/// The whole batch: rows drawn from `seed`, labels spread over the classes and shifted by
/// `shift` (so that successive steps hit other classes).
pub fn batch(seed: u64, shift: u64) -> (Vec<f32>, Vec<i64>) {
    let x = partial_fc::init::normal_rows(seed, 0, BATCH, DIM, 1.0);
    let labels = (0..BATCH as i64)
        .map(|i| (i * 97 + 5 + 31 * shift as i64) % CLASSES as i64)
        .collect();
    (x, labels)
}
