//! Checks on what enters the layer: embedding rows (`row_error`), weights and optimizer state
//! (`check_finite`, `check_state_range`, `storable`), and a pass's input (`check_input`).

use super::PartialFc;
use crate::backend::{Backend, Collective};
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use rayon::prelude::*;

/// Largest sum of squares a row (an embedding, a class center) may reach: half of f32::MAX, since
/// the kernels add in another order and may overflow a little earlier. One bound for every check
/// that a row can be normalized.
const SQUARES_BOUND: f32 = f32::MAX / 2.0;

/// What is wrong with embedding row `row`, if anything: a NaN or infinite value, all zeros,
/// or a finite row the step still cannot carry: its sum of squares overflows f32, or the
/// 16-bit wire rounds a value to infinity or the whole row to zeros. Every rank normalizes
/// the gathered rows, so one such row would turn every shard's gradient to NaN.
pub(crate) fn row_error(row: usize, x: &[f32], wire: Dtype) -> Option<PfcError> {
    // One pass, eight independent lanes (so it vectorizes): the sum of squares in f32, as
    // the kernels compute it, and the largest magnitude. A NaN or infinity makes the sum
    // non-finite; only then is the row searched for it.
    const LANES: usize = 8;
    let (mut squares, mut largest) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            squares[l] += chunk[l] * chunk[l];
            largest[l] = if chunk[l].abs() > largest[l] {
                chunk[l].abs()
            } else {
                largest[l]
            };
        }
    }
    for &v in chunks.remainder() {
        squares[0] += v * v;
        largest[0] = if v.abs() > largest[0] {
            v.abs()
        } else {
            largest[0]
        };
    }
    let squares: f32 = squares.iter().sum();
    let largest = largest.iter().fold(0.0f32, |m, &v| m.max(v));
    if !squares.is_finite() {
        if let Some(&value) = x.iter().find(|v| !v.is_finite()) {
            return Some(PfcError::NonFinite { row, value });
        }
    }
    if largest == 0.0 {
        return Some(PfcError::ZeroRow { row });
    }
    if squares >= SQUARES_BOUND {
        return Some(PfcError::OutOfRange {
            row,
            value: largest,
            reason: format!(
                "its sum of squares overflows f32 (largest |value| {largest:e}); scale the \
                 embeddings down"
            ),
        });
    }
    if wire == Dtype::F32 {
        return None;
    }
    // Rounding is monotonic in magnitude: some value rounds to infinity exactly when the
    // largest does, and every value rounds to zero exactly when the largest does.
    let rounded = crate::cpu::wire::from_wire(crate::cpu::wire::to_wire(largest, wire), wire);
    let name = || format!("{wire:?}").to_lowercase();
    if rounded.is_infinite() {
        return Some(PfcError::OutOfRange {
            row,
            value: largest,
            reason: format!(
                "{largest:e} rounds to infinity on the {} all-gather wire (LayerConfig::wire); \
                 scale the embeddings or use an f32 or bf16 wire",
                name()
            ),
        });
    }
    if rounded == 0.0 {
        return Some(PfcError::OutOfRange {
            row,
            value: largest,
            reason: format!(
                "every value rounds to zero on the {} all-gather wire (largest |value| \
                 {largest:e}); scale the embeddings or use an f32 or bf16 wire",
                name()
            ),
        });
    }
    None
}

/// [`row_error`] for a row to predict from: a row that arrives as zeros (all zeros, or all
/// rounded to zero by a 16-bit wire) is no error there: it has no direction, so no class is
/// nearest to it and its prediction is empty (see [`zero_rows`]).
pub(crate) fn prediction_row_error(row: usize, x: &[f32], wire: Dtype) -> Option<PfcError> {
    if arrives_as_zeros(x, wire) {
        return None;
    }
    row_error(row, x, wire)
}

/// Whether a row reaches the layer as zeros: all its values are zero (−0.0 included), or the
/// wire rounds every one of them to zero (rounding is monotonic in magnitude, so the largest
/// decides).
fn arrives_as_zeros(x: &[f32], wire: Dtype) -> bool {
    // (`f32::max` skips a NaN: such a row is not zeros, and `row_error` names it.)
    if x.iter().any(|v| v.is_nan()) {
        return false;
    }
    let largest = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    largest == 0.0
        || (wire != Dtype::F32
            && crate::cpu::wire::from_wire(crate::cpu::wire::to_wire(largest, wire), wire) == 0.0)
}

/// The rows of `embeddings` (`dim` values each) that reach the layer as zeros over `wire`
/// (every value zero, or rounded to zero by a 16-bit wire): their predictions are emptied.
pub(crate) fn zero_rows(embeddings: &[f32], dim: usize, wire: Dtype) -> Vec<usize> {
    embeddings
        .par_chunks(dim.max(1))
        .enumerate()
        .filter(|(_, x)| arrives_as_zeros(x, wire))
        .map(|(row, _)| row)
        .collect()
}

/// A NaN or infinite weight or optimizer state would reach every logit of its class and,
/// through the softmax's normalizer, every row's gradient: refuse it where it enters.
pub(super) fn check_finite(name: &'static str, values: &[f32], dim: usize) -> Result<()> {
    refuse_first(
        name,
        values,
        dim,
        |v| !v.is_finite(),
        "every value must be finite",
    )
}

/// Refuses class centers whose sum of squares overflows f32 (each value finite): the step
/// normalizes every sampled center, and such a row would normalize to NaN and turn the loss and
/// every gradient NaN. Summed in f64, against half of f32::MAX as `row_error` does (the kernels
/// add in another order).
pub(super) fn check_center_norms(
    name: &'static str,
    values: &[f32],
    dim: usize,
    first_class: u64,
) -> Result<()> {
    let Some(row) = values.par_chunks(dim.max(1)).position_first(|row| {
        row.iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            >= f64::from(SQUARES_BOUND)
    }) else {
        return Ok(());
    };
    let values_of_row = &values[row * dim..(row + 1) * dim];
    let largest = values_of_row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    Err(PfcError::param(
        name,
        format!(
            "row {row}, class {} (largest |value| {largest:e})",
            first_class + row as u64
        ),
        "its sum of squares overflows f32 (reaches half of its largest value, the step's \
         margin), so the step could not normalize it: scale the centers down (only their \
         directions count)",
    ))
}

/// Whether `value` may enter tensor `name` (weight or optimizer state): finite, and not negative
/// in a second moment. What `check_finite` and `check_state_range` refuse, with their
/// messages; checkpoint reads test it value by value.
pub(crate) fn storable(name: &str, value: f32) -> bool {
    value.is_finite() && !(name == "exp_avg_sq" && value < 0.0)
}

/// [`storable`], and for optimizer state kept in bf16 (`StateDtype::Bf16`) finite once rounded
/// to it: f32 values from about 3.3961·10³⁸ up round to +inf in bf16, which would put inf into
/// the weights at the next update.
pub(crate) fn storable_as(name: &str, value: f32, bf16_state: bool) -> bool {
    storable(name, value)
        && (name == "weight" || !bf16_state || half::bf16::from_f32(value).is_finite())
}

/// The first row of a row-major f32 stream of class centers whose sum of squares overflows
/// f32 (as [`check_center_norms`] judges it), fed a block at a time: blocks need not end on a
/// row's end, so the running sum carries over.
pub(crate) struct CenterNorms {
    dim: usize,
    row: usize,
    sum: f64,
    largest: f32,
}

impl CenterNorms {
    pub(crate) fn new(dim: usize) -> Self {
        CenterNorms {
            dim: dim.max(1),
            row: 0,
            sum: 0.0,
            largest: 0.0,
        }
    }

    /// Adds values `offset..offset + block.len()` of the stream (in order, no gaps); the first
    /// overflowing row and its largest |value|, once its sum reaches the bound.
    pub(crate) fn push(&mut self, offset: usize, block: &[f32]) -> Option<(usize, f32)> {
        for (i, &v) in block.iter().enumerate() {
            let row = (offset + i) / self.dim;
            if row != self.row {
                (self.row, self.sum, self.largest) = (row, 0.0, 0.0);
            }
            self.sum += f64::from(v) * f64::from(v);
            self.largest = self.largest.max(v.abs());
            if self.sum >= f64::from(SQUARES_BOUND) {
                // The rest of the row only adds to it: report its largest value so far.
                return Some((row, self.largest));
            }
        }
        None
    }
}

/// The reason [`check_center_norms`] gives, for a checkpoint's error.
pub(crate) fn center_norm_reason(row: usize, class: u64, largest: f32) -> String {
    format!(
        "weight row {row} (class {class}, largest |value| {largest:e}): its sum of squares \
         overflows f32, so the step could not normalize it"
    )
}

/// A second moment (`exp_avg_sq`) is an average of squares: a negative one would put NaN into
/// the weights through its square root at the next update, so it is refused where it enters.
pub(super) fn check_state_range(name: &'static str, values: &[f32], dim: usize) -> Result<()> {
    if name != "exp_avg_sq" {
        return Ok(());
    }
    refuse_first(
        name,
        values,
        dim,
        |v| v < 0.0,
        "a second moment must be >= 0",
    )
}

/// [`PfcError::Param`] naming the row and column of the first value that is `bad`.
fn refuse_first(
    name: &'static str,
    values: &[f32],
    dim: usize,
    bad: impl Fn(f32) -> bool,
    rule: &str,
) -> Result<()> {
    match values.iter().position(|&v| bad(v)) {
        None => Ok(()),
        Some(i) => Err(PfcError::param(
            name,
            format!(
                "{} at row {}, column {}",
                values[i],
                i / dim.max(1),
                i % dim.max(1)
            ),
            rule,
        )),
    }
}

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// Checks this rank's input; `None` when it is fine.
    pub(super) fn check_input(&self, embeddings: &[f32], labels: &[i64]) -> Option<PfcError> {
        let d = self.config.dim;
        let n = labels.len();
        if n > self.config.batch_per_rank {
            return Some(PfcError::Shape(format!(
                "batch of {n} labels; this layer takes at most {} per rank",
                self.config.batch_per_rank
            )));
        }
        if embeddings.len() != n * d {
            return Some(PfcError::Shape(format!(
                "embeddings hold {} values, {n} labels × dim {d} = {} expected",
                embeddings.len(),
                n * d
            )));
        }
        if let Some((row, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l < 0 || l as u64 >= self.config.num_classes)
        {
            return Some(PfcError::Label {
                row,
                label,
                num_classes: self.config.num_classes,
            });
        }
        // Rows in parallel, the first bad row (in row order) reported: this runs before every
        // pass, on the host, so it must cost little next to a GPU step.
        let wire = self.config.wire;
        let bad_row = embeddings
            .par_chunks(d.max(1))
            .enumerate()
            .find_map_first(|(row, x)| row_error(row, x, wire));
        if bad_row.is_some() {
            return bad_row;
        }
        if self.step == u64::MAX {
            return Some(PfcError::param(
                "step",
                self.step,
                "the step counter cannot advance past u64::MAX (set_steps or a checkpoint set it)",
            ));
        }
        None
    }
}
