//! Launches cuda/sampling.cu: `localize_labels`, and `sample_classes` (CPU references:
//! src/cpu/sampling.rs). The sampler is a chain of kernels on one stream with a single host
//! sync (the design is in sampling.cu's header), so its glue is more than checks and a launch:
//! the constants that must match sampling.cu's, the device scratch kept between calls
//! ([`SampleScratch`]), the grid and radix passes its kernels share, and the order of the
//! chain, plain or with hard negatives.

use super::common::{i32_of, launch, need, per_elem, single_block};
use crate::backend::{Backend, SampleArgs};
use crate::cuda::{dev, CudaBackend};
use crate::error::{PfcError, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Classes per block of the compaction (SCAN_BLOCK in sampling.cu).
const SCAN_BLOCK: usize = 1024;
/// Threads per block of the radix passes (SELECT_THREADS in sampling.cu).
const SELECT_THREADS: usize = 1024;
/// Histogram bins of one radix digit (BINS in sampling.cu).
const SELECT_BINS: usize = 2048;
/// u64 words of the select state (sampling.cu).
const SELECT_STATE: usize = 7;
/// Word of the select state holding the candidates of the last plain call.
const STATE_LAST_CANDIDATES: usize = 6;
/// Word of the select state holding the distinct positives.
const STATE_POSITIVES: usize = 3;
/// Word of the select state holding the number of classes selected.
const STATE_SELECTED: usize = 4;
/// Rows whose labels `compact_selected`'s last block remaps itself (REMAP_IN_LAST_BLOCK in
/// sampling.cu); more get the `remap_labels` kernel.
const REMAP_IN_LAST_BLOCK: usize = 2048;
/// Length of the plain sampler's candidate list (the keys of the first digit's bin): random high
/// words spread over 1024 first-digit bins, so a bin holds about `shard / 1024` keys (standard
/// deviation about the square root of that); positives have a bin of their own, at most one per
/// row. Four times the mean plus the rows and a margin never overflows in practice; an overflow
/// would only make the last block of `collect_candidates` walk all keys.
fn candidate_capacity(shard: usize, rows: usize) -> usize {
    (4 * shard.div_ceil(1024) + rows + 4096).min(shard)
}

/// The digits of the high key word: the S-th largest high word, ties resolved by class order.
const HIGH_DIGITS: [(i32, i32); 3] = [(53, 11), (42, 11), (32, 10)];
/// All digits of the key: the exact S-th largest key.
const ALL_DIGITS: [(i32, i32); 6] = [(53, 11), (42, 11), (32, 10), (21, 11), (10, 11), (0, 10)];

/// Device scratch of the sampler (sampling.cu): select state words, digit histogram, block
/// counts, and the candidate list of the plain sampler.
pub(crate) struct SampleScratch {
    state: CudaSlice<u64>,
    hist: CudaSlice<u32>,
    counts: CudaSlice<u64>,
    candidates: CudaSlice<u64>,
    /// The candidate list's length in the last plain call (`None` before one).
    list_len: Option<usize>,
}

impl CudaBackend {
    pub(super) fn launch_localize_labels(
        &self,
        global: &CudaSlice<i64>,
        rows: usize,
        shard_start: u64,
        shard_len: usize,
        local: &mut CudaSlice<i32>,
    ) -> Result<()> {
        need(global, rows, "localize_labels global")?;
        need(local, rows, "localize_labels local")?;
        // Local ids are int: a larger shard would truncate them (as on the CPU).
        i32_of(shard_len, "localize_labels: shard_len")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, len_u) = (i32_of(rows, "rows")?, shard_len as u64);
        launch!(
            self,
            "localize_labels",
            per_elem(rows),
            global,
            &rows_i,
            &shard_start,
            &len_u,
            local
        );
        Ok(())
    }

    pub(super) fn launch_sample_classes(
        &self,
        args: &SampleArgs,
        labels: &mut CudaSlice<i32>,
        scores: Option<&CudaSlice<f32>>,
        keys: &mut CudaSlice<u64>,
        sampled: &mut CudaSlice<i32>,
    ) -> Result<usize> {
        let shard = args.shard_len;
        let shard_i = i32_of(shard, "shard_len")?;
        need(labels, args.rows, "sample_classes labels")?;
        if args.num_sample >= shard {
            need(sampled, shard, "sample_classes sampled")?;
            if shard > 0 {
                launch!(self, "iota", per_elem(shard), sampled, &shard_i);
            }
            return Ok(shard);
        }
        need(keys, shard, "sample_classes keys")?;
        need(sampled, args.num_sample, "sample_classes sampled")?;
        let mut scratch = self.take_scratch()?;
        let result = self.sample_on_device(args, labels, scores, keys, sampled, &mut scratch);
        // The kernels leave the scratch zeroed for the next call, unless the call failed midway.
        if result.is_ok() {
            if let Ok(mut slot) = self.sample_scratch.lock() {
                *slot = Some(scratch);
            }
        }
        result
    }

    /// `sample_classes` below the trivial case: the design is in cuda/sampling.cu's header.
    fn sample_on_device(
        &self,
        args: &SampleArgs,
        labels: &mut CudaSlice<i32>,
        scores: Option<&CudaSlice<f32>>,
        keys: &mut CudaSlice<u64>,
        sampled: &mut CudaSlice<i32>,
        scratch: &mut SampleScratch,
    ) -> Result<usize> {
        let shard = args.shard_len;
        let shard_i = i32_of(shard, "shard_len")?;
        let rows_i = i32_of(args.rows, "rows")?;
        let capacity = sampled.len().min(shard);
        let capacity_i = i32_of(capacity, "sampled capacity")?;
        let hard_possible = scores.is_some() && args.hard_fraction > 0.0;
        let init = |s: &mut SampleScratch, k: u64, reset: i32| -> Result<()> {
            launch!(
                self,
                "sampling_init",
                single_block(1024),
                &mut s.state,
                &mut s.hist,
                &k,
                &reset
            );
            Ok(())
        };
        let num_sample = args.num_sample as u64;
        launch!(
            self,
            "random_keys",
            Self::select_grid(shard),
            &mut *keys,
            &shard_i,
            &args.shard_start,
            &args.seed,
            &args.step,
            &mut scratch.hist
        );
        // With hard negatives the first digit is picked later, over the final keys.
        let select_first = i32::from(!hard_possible);
        let force_cfg = LaunchConfig {
            grid_dim: (args.rows.div_ceil(SELECT_THREADS).max(1) as u32, 1, 1),
            block_dim: (SELECT_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "force_positives",
            force_cfg,
            &*labels,
            &rows_i,
            &mut *keys,
            &mut scratch.state,
            &mut scratch.hist,
            &num_sample,
            &select_first
        );
        // With hard negatives: their keys in place, and the distinct positives.
        let hard_positives = if hard_possible {
            // The hard share depends on the positives: one 8-byte download.
            let positives = self
                .read_back(&scratch.state.slice(STATE_POSITIVES..STATE_POSITIVES + 1))?[0]
                as usize;
            let fill = args.num_sample.saturating_sub(positives);
            let hard = ((args.hard_fraction as f64 * fill as f64).round() as usize).min(fill);
            if let (Some(scores), true) = (scores, hard > 0) {
                need(scores, shard, "sample_classes scores")?;
                launch!(
                    self,
                    "score_keys",
                    per_elem(shard),
                    &mut *keys,
                    scores,
                    &shard_i
                );
                init(scratch, (positives + hard) as u64, 0)?;
                self.radix_passes(keys, shard, &ALL_DIGITS, scratch)?;
                launch!(
                    self,
                    "promote_chosen",
                    per_elem(shard),
                    &mut *keys,
                    &shard_i,
                    &scratch.state,
                    &args.shard_start,
                    &args.seed,
                    &args.step
                );
            }
            Some(positives)
        } else {
            None
        };
        let blocks = shard.div_ceil(SCAN_BLOCK);
        if scratch.counts.len() < blocks {
            scratch.counts = self.alloc::<u64>(blocks)?;
        }
        let scan_cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (SCAN_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        if let Some(positives) = hard_positives {
            init(scratch, args.num_sample.max(positives) as u64, 0)?;
            self.radix_passes(keys, shard, &HIGH_DIGITS, scratch)?;
            // Its last block scans the block counts.
            launch!(
                self,
                "count_selected",
                scan_cfg,
                &*keys,
                &shard_i,
                &mut scratch.state,
                &mut scratch.counts
            );
        } else {
            // The first digit was picked by force_positives; the other two from the keys of its
            // bin (sampling.cu, header step 4).
            let list_len = self
                .sampler_candidates
                .unwrap_or_else(|| candidate_capacity(shard, args.rows));
            if scratch.candidates.len() < list_len.max(1) {
                scratch.candidates = self.alloc::<u64>(list_len.max(1))?;
            }
            let list_len_i = i32_of(list_len, "sampler candidates")?;
            scratch.list_len = Some(list_len);
            // Its last block picks the two digits from the list and scans the block counts.
            launch!(
                self,
                "collect_candidates",
                scan_cfg,
                &*keys,
                &shard_i,
                &mut scratch.state,
                &mut scratch.counts,
                &mut scratch.candidates,
                &list_len_i,
                &mut scratch.hist
            );
        }
        // Its last block remaps the labels, unless there are many.
        launch!(
            self,
            "compact_selected",
            scan_cfg,
            &*keys,
            &shard_i,
            &mut scratch.state,
            &scratch.counts,
            &mut *sampled,
            &capacity_i,
            &mut *labels,
            &rows_i
        );
        if args.rows > REMAP_IN_LAST_BLOCK {
            launch!(
                self,
                "remap_labels",
                per_elem(args.rows),
                labels,
                &rows_i,
                &*sampled,
                &scratch.state,
                &capacity_i
            );
        }
        // The one host sync of the plain sampler.
        let n =
            self.read_back(&scratch.state.slice(STATE_SELECTED..STATE_SELECTED + 1))?[0] as usize;
        if n > capacity {
            return Err(PfcError::Shape(format!(
                "sample_classes: {n} classes selected (the distinct positives exceed the sample), \
                 but the sampled buffer holds {capacity}"
            )));
        }
        if n < args.num_sample {
            return Err(PfcError::Device(format!(
                "sampler selected {n} classes, at least {} expected (radix select invariant broken)",
                args.num_sample
            )));
        }
        Ok(n)
    }

    /// Grid of the histogram passes: enough blocks of 1024 threads to fill the device, each
    /// walking several keys.
    fn select_grid(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(SELECT_THREADS * 8).clamp(1, 264) as u32, 1, 1),
            block_dim: (SELECT_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Radix passes over the digits `(shift, bits)` (MSB first) of the keys that agree with the
    /// prefix in `state[0]`; each pass's last block extends the prefix (sampling.cu).
    fn radix_passes(
        &self,
        keys: &CudaSlice<u64>,
        n: usize,
        digits: &[(i32, i32)],
        scratch: &mut SampleScratch,
    ) -> Result<()> {
        let n_i = i32_of(n, "shard_len")?;
        for &(shift, bits) in digits {
            launch!(
                self,
                "radix_pass",
                Self::select_grid(n),
                keys,
                &n_i,
                &mut scratch.state,
                &shift,
                &bits,
                &mut scratch.hist
            );
        }
        Ok(())
    }

    /// For tests: the keys the last plain `sample_classes` put on its candidate list, and the
    /// list's length (more keys than that took the slow path); `None` before any such call.
    pub(crate) fn candidates_seen(&self) -> Result<Option<(u64, usize)>> {
        let guard = self
            .sample_scratch
            .lock()
            .map_err(|_| PfcError::Device("sampler scratch lock poisoned".into()))?;
        let Some((scratch, list_len)) = guard.as_ref().and_then(|s| Some((s, s.list_len?))) else {
            return Ok(None);
        };
        let word = STATE_LAST_CANDIDATES;
        let seen = self.read_back(&scratch.state.slice(word..word + 1))?[0];
        Ok(Some((seen, list_len)))
    }

    /// The select state and histogram of `sample_classes`, allocated once per backend.
    fn take_scratch(&self) -> Result<SampleScratch> {
        let cached = self.sample_scratch.lock().ok().and_then(|mut s| s.take());
        match cached {
            Some(s) => Ok(s),
            None => Ok(SampleScratch {
                state: self.alloc::<u64>(SELECT_STATE)?,
                hist: self.alloc::<u32>(SELECT_BINS)?,
                counts: self.alloc::<u64>(1)?,
                candidates: self.alloc::<u64>(1)?,
                list_len: None,
            }),
        }
    }
}
