//! The forward/backward pass: agreement, all-gather, sampling, logits, the distributed softmax
//! and the backward GEMMs, and what the last pass left to inspect (its sample and gradient).

use super::buffers::Logits;
use super::row_results::{row_results, RowInputs};
use super::{Accumulated, Call, PartialFc, PassOptions, StepOutput};
use crate::backend::{Backend, Collective, LogitsShape, ReduceOp, SampleArgs};
use crate::config::{NegativeSampler, UpdateMode, ROW_MARGIN_FLOATS};
use crate::error::{PfcError, Result};
use crate::plan::buffers::sampled_count;

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// One forward and backward pass on this rank's batch; the sample is drawn by the layer.
    ///
    /// # Errors
    ///
    /// Refused on every rank alike, with nothing changed: a rank's bad input ([`PfcError::Shape`]
    /// for lengths or more rows than `batch_per_rank`, [`PfcError::Label`] for a label outside
    /// `[0, num_classes)`, a NaN/Inf or zero embedding row), an empty batch on every rank, a
    /// layer left incomplete by a failed load. After every rank agreed to run the pass, a
    /// collective or device error discards the pending gradient and breaks the group
    /// ([`Collective::abort`]; see docs/design.md).
    ///
    /// A second pass before [`PartialFc::step`] replaces the pending gradient (also one summed
    /// by [`forward_backward_accumulate`](Self::forward_backward_accumulate)).
    pub fn forward_backward(&mut self, embeddings: &[f32], labels: &[i64]) -> Result<StepOutput> {
        let out = self.forward_backward_inner(embeddings, labels, None, PassOptions::new());
        self.end_pass(out)
    }

    /// [`forward_backward`](Self::forward_backward) with options: gradient accumulation, a
    /// loss weight per row, per-row margins (ElasticFace, AdaFace), alone or together
    /// ([`PassOptions`], whose doc has an example). `PassOptions::new()` gives
    /// `forward_backward`'s result bit for bit, and so do per-row margins equal to the
    /// layer's own m2 and m3.
    ///
    /// Per-row margins reach the other ranks through one extra all-gather of
    /// [`ROW_MARGIN_FLOATS`] floats per row before the softmax, into a table the layer allocates
    /// at its first such pass (16 bytes per gathered row and per row of this rank: in
    /// [`memory_report`](Self::memory_report)'s row statistics, beyond the planner's figure).
    /// Only each row's target logit reads it, so the softmax's cost does not change.
    ///
    /// # Errors
    ///
    /// Those of [`forward_backward`](Self::forward_backward), of
    /// [`forward_backward_accumulate`](Self::forward_backward_accumulate) when accumulating and
    /// of [`forward_backward_weighted`](Self::forward_backward_weighted) with weights, and on
    /// every rank alike: [`PfcError::Shape`] for margins not of one value per row,
    /// [`PfcError::Param`] for an angular margin outside (−π/2, π/2) or a cosine margin outside
    /// (−1, 1) (NaN included), [`PfcError::Collective`] when the ranks' options differ in
    /// having margins, weights or accumulation.
    pub fn forward_backward_with(
        &mut self,
        embeddings: &[f32],
        labels: &[i64],
        options: PassOptions<'_>,
    ) -> Result<StepOutput> {
        let out = self.forward_backward_inner(embeddings, labels, None, options);
        self.end_pass(out)
    }

    /// Like [`forward_backward`](Self::forward_backward), with a weight per row: the loss is
    /// `Σ_i w_i ℓ_i / rows` over the gathered batch (the mean of the weighted terms; the weights
    /// are not normalized), and so are both gradients. Uses: each row of a multi-label batch
    /// weighted by 1/labels of its sample ([`PairBatch::row_weights`](crate::PairBatch::row_weights):
    /// every sample counts alike), class-balanced or importance weights. A row of weight 0 adds
    /// no loss and no gradient, but still counts in the mean's `rows`, still brings its class
    /// into the sample (and so, under the sparse update, into the optimizer's update of the
    /// sampled rows) and still steers hard negatives. Weights of 1 give `forward_backward`'s
    /// result bit for bit. Every rank calls it with its own rows' weights (all ranks weighted
    /// or none: a mix is refused by name).
    ///
    /// The weights reach the other ranks through one extra all-gather of `batch_per_rank`
    /// floats, and each row of the logits' gradient is multiplied by its weight after the
    /// softmax (`Backend::scale_rows`): one more pass over the logits. The weights multiply the
    /// gradients, so large ones overflow them (f32 beyond ~1e38; an f16 gradient saturates at
    /// 65504, an f16 `grad_wire` rounds to infinity past it) and tiny ones lose them in 16 bits:
    /// with 16-bit logits the product is rounded to 16 bits again (an f16 gradient can sink
    /// below its range), so keep weights of order 1 there (e.g. normalized to average 1).
    ///
    /// ```
    /// use partial_fc::{collective::SingleRank, CpuBackend, LayerConfig, PartialFc};
    /// let mut cfg = LayerConfig::new(1000, 16, 4);
    /// cfg.sample_rate = 1.0;
    /// let x: Vec<f32> = (0..4 * 16).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
    /// let labels = [3, 300, 600, 900];
    /// let mut plain = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    /// let mut weighted = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    /// let a = plain.forward_backward(&x, &labels).unwrap();
    /// // Row 1 counts twice, row 3 not at all.
    /// let b = weighted.forward_backward_weighted(&x, &labels, &[1.0, 2.0, 1.0, 0.0]).unwrap();
    /// assert!(b.grad_embeddings[3 * 16..].iter().all(|&g| g == 0.0));
    /// assert_eq!(a.grad_embeddings[..16], b.grad_embeddings[..16]); // row 0: weight 1
    /// ```
    ///
    /// # Errors
    ///
    /// Those of [`forward_backward`](Self::forward_backward), and on every rank alike:
    /// [`PfcError::Shape`] for a `weights` not of one value per row, [`PfcError::Param`] for a
    /// weight outside [0, 1e6] (NaN included: normalize larger ones), [`PfcError::Collective`]
    /// when some ranks pass weights and others do not.
    pub fn forward_backward_weighted(
        &mut self,
        embeddings: &[f32],
        labels: &[i64],
        weights: &[f32],
    ) -> Result<StepOutput> {
        let options = PassOptions::new().weights(weights);
        let out = self.forward_backward_inner(embeddings, labels, None, options);
        self.end_pass(out)
    }

    /// [`forward_backward_accumulate`](Self::forward_backward_accumulate) with a weight per row,
    /// as [`forward_backward_weighted`](Self::forward_backward_weighted) takes them.
    ///
    /// # Errors
    ///
    /// Those of `forward_backward_accumulate` and of `forward_backward_weighted`.
    pub fn forward_backward_accumulate_weighted(
        &mut self,
        embeddings: &[f32],
        labels: &[i64],
        weights: &[f32],
    ) -> Result<StepOutput> {
        let options = PassOptions::new().weights(weights).accumulate(true);
        let out = self.forward_backward_inner(embeddings, labels, None, options);
        self.end_pass(out)
    }

    /// Like [`forward_backward`](Self::forward_backward), but the pass's gradient of the class
    /// centers is added to the pending one instead of replacing it: gradient accumulation,
    /// where [`step`](Self::step) applies the sum of the passes since the last step, as
    /// PyTorch's `backward()` sums into `weight.grad` until `optimizer.step()` (insightface's
    /// `gradient_acc`). Each pass draws its own sample; the sum is over the union of samples, so
    /// it needs [`UpdateMode::Dense`], whose dense gradient buffer holds it (no memory beyond
    /// what that mode has). The sum is not divided by the number of passes (nor is PyTorch's):
    /// for the mean, as PyTorch's `(loss / K).backward()` gives, set
    /// [`set_grad_scale`](Self::set_grad_scale)`(1.0 / K)` (docs/design.md). The first pass
    /// after a `step` starts a new sum; the embedding gradient each pass returns is its own, as
    /// with `forward_backward`.
    ///
    /// ```
    /// use partial_fc::{collective::SingleRank, CpuBackend, LayerConfig, PartialFc, UpdateMode};
    /// let mut cfg = LayerConfig::new(1000, 16, 8);
    /// cfg.update = UpdateMode::Dense;
    /// let mut layer = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    /// layer.set_grad_scale(1.0 / 4.0).unwrap(); // each pass's gradient is loss / 4's
    /// let x: Vec<f32> = (0..8 * 16).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
    /// for micro_batch in 0..4i64 {
    ///     let labels: Vec<i64> = (0..8).map(|i| i * 100 + micro_batch).collect();
    ///     layer.forward_backward_accumulate(&x, &labels).unwrap();
    /// }
    /// assert_eq!(layer.pending_passes(), 4);
    /// layer.step(0.1).unwrap(); // one update from the mean of the four passes' gradients
    /// ```
    ///
    /// # Errors
    ///
    /// Those of [`forward_backward`](Self::forward_backward); [`PfcError::Param`] on every rank
    /// when the layer's update mode is [`UpdateMode::Sparse`]; [`PfcError::Collective`] when
    /// some ranks accumulate and others do not. A pass refused before it ran keeps the sum so
    /// far; one that fails after the ranks agreed to run it drops the whole sum and breaks the
    /// group, as a failed [`forward_backward`](Self::forward_backward) does.
    pub fn forward_backward_accumulate(
        &mut self,
        embeddings: &[f32],
        labels: &[i64],
    ) -> Result<StepOutput> {
        let options = PassOptions::new().accumulate(true);
        let out = self.forward_backward_inner(embeddings, labels, None, options);
        self.end_pass(out)
    }

    /// A pass that failed after every rank agreed to run it breaks the group (see
    /// [`PartialFc::abort_after_agreement`]) and drops the pending gradient: whatever the pass
    /// had reached, the last pass's gradient is not the one to apply.
    fn end_pass<T>(&mut self, out: Result<T>) -> Result<T> {
        if self.abort_after_agreement(&out, "forward/backward pass") {
            self.drop_grad();
        }
        out
    }

    /// After a call that agreed with the other ranks to run (`mid_pass` set): a failure past
    /// that point breaks the group, since this rank's peers would otherwise wait for it in the
    /// collective it left (until their timeout), or pair its next call with that one. Refusals
    /// every rank agreed on return before the point. Says whether it broke the group.
    pub(crate) fn abort_after_agreement<T>(&mut self, out: &Result<T>, what: &str) -> bool {
        let agreed = std::mem::take(&mut self.mid_pass);
        match out {
            Err(e) if agreed => {
                let rank = self.comm.rank();
                self.comm
                    .abort(&format!("rank {rank}'s {what} failed: {e}"));
                true
            }
            _ => false,
        }
    }

    /// Like [`PartialFc::forward_backward`], with the sample given instead of drawn: `sampled`
    /// holds sorted global class ids (any rank's; each rank keeps those in its shard) and must
    /// hold every positive of the gathered batch. Used for parity with other implementations.
    ///
    /// # Errors
    ///
    /// Those of [`PartialFc::forward_backward`], and, on every rank alike: a class outside
    /// `[0, num_classes)`, a sample not sorted and unique, more of this shard's classes than its
    /// sample capacity, a positive of the batch missing from the sample.
    pub fn forward_backward_with_sample(
        &mut self,
        embeddings: &[f32],
        labels: &[i64],
        sampled: &[i64],
    ) -> Result<StepOutput> {
        let options = PassOptions::new();
        let out = self.forward_backward_inner(embeddings, labels, Some(sampled), options);
        self.end_pass(out)
    }

    fn forward_backward_inner(
        &mut self,
        embeddings: &[f32],
        labels: &[i64],
        given: Option<&[i64]>,
        options: PassOptions<'_>,
    ) -> Result<StepOutput> {
        let (accumulate, weights) = (options.accumulate, options.weights);
        let mut own = self.check_complete().err();
        if own.is_none() && accumulate && self.config.update != UpdateMode::Dense {
            own = Some(PfcError::param(
                "update",
                format!("{:?}", self.config.update),
                "gradient accumulation needs UpdateMode::Dense: the passes' samples differ, so \
                 their sum is a dense gradient",
            ));
        }
        if own.is_none() {
            own = self.check_input(embeddings, labels);
        }
        if own.is_none() {
            own = options.check(labels.len());
        }
        let local_sample: Vec<i32> = match given {
            Some(ids) => {
                if own.is_none() {
                    if let Some(&bad) = ids
                        .iter()
                        .find(|&&c| c < 0 || c as u64 >= self.config.num_classes)
                    {
                        own = Some(PfcError::Shape(format!(
                            "a given sample holds class {bad}, outside [0, {})",
                            self.config.num_classes
                        )));
                    }
                }
                if own.is_none() && ids.windows(2).any(|w| w[0] >= w[1]) {
                    own = Some(PfcError::Shape(
                        "a given sample must be sorted and unique".into(),
                    ));
                }
                let ids: Vec<i32> = ids
                    .iter()
                    .filter(|&&c| self.shard.contains(c))
                    .map(|&c| (c as u64 - self.shard.start) as i32)
                    .collect();
                if own.is_none() && ids.len() > self.capacity {
                    own = Some(PfcError::Shape(format!(
                        "a given sample of {} classes exceeds this shard's capacity {}",
                        ids.len(),
                        self.capacity
                    )));
                }
                ids
            }
            None => Vec::new(),
        };
        let call = match (given.is_some(), accumulate, weights.is_some()) {
            (true, ..) => Call::Given,
            (false, accumulate, weighted) if options.has_margins() => Call::Margined {
                accumulate,
                weighted,
            },
            (false, true, true) => Call::AccumulateWeighted,
            (false, true, false) => Call::Accumulate,
            (false, false, true) => Call::Weighted,
            (false, false, false) => Call::Drawn,
        };
        let real_rows = self.agree_on_input(own, labels.len(), call)?;
        if real_rows == 0 {
            // Every rank sees the same count, so all of them stop here together.
            return Err(PfcError::Shape(
                "every rank passed an empty batch: there is no loss to take".into(),
            ));
        }
        // Every rank runs this pass now: a failure from here on breaks the group and drops the
        // last pass's gradient (`end_pass`), in the all-gather too.
        self.mid_pass = true;
        if accumulate {
            self.fold_pending_grad()?;
        }

        // Ranks may pass fewer rows than `batch_per_rank` (a last, smaller batch; a batch that
        // does not split evenly). Every rank pads to N: padding rows are zero embeddings with
        // label −1, which normalize to zero, own no target and so add nothing to the loss or the
        // class centers' gradient; their embedding gradient is computed and discarded.
        let d = self.config.dim;
        let n = self.config.batch_per_rank;
        let world = self.comm.world_size();
        let m = n * world;
        let shard_len = self.shard.len as usize;

        // 1. All-gather embeddings and labels, normalized on arrival.
        self.gather_rows(embeddings, labels)?;
        let (b, x) = (&self.backend, &mut self.bufs);
        // 2. Labels of this shard become shard-local ids.
        b.localize_labels(
            &x.gathered_labels,
            m,
            self.shard.start,
            shard_len,
            &mut x.local_labels,
        )?;

        // 3. Sample.
        let s = match given {
            Some(_) => {
                let mut local = b.download(&x.local_labels, m)?;
                let mut missing = None;
                for (row, l) in local.iter_mut().enumerate().filter(|(_, l)| **l >= 0) {
                    match local_sample.binary_search(l) {
                        Ok(p) => *l = p as i32,
                        Err(_) => {
                            missing.get_or_insert(PfcError::Shape(format!(
                                "the given sample misses class {} (label of gathered row {row})",
                                *l as u64 + self.shard.start
                            )));
                        }
                    }
                }
                // Only the rank that holds the class can tell; every rank must learn it before
                // any returns, or the others wait in the next collective (or pair it with the
                // wrong call). Nothing observable has changed yet.
                // A refusal here is every rank's, not a failure to break the group for.
                self.mid_pass = false;
                self.agree_on_input(missing, 0, Call::Given)?;
                self.mid_pass = true;
                let (b, x) = (&self.backend, &mut self.bufs);
                b.upload(&local, &mut x.local_labels)?;
                b.upload(&local_sample, &mut x.sampled_index)?;
                local_sample.len()
            }
            None => {
                let hard_fraction = match self.config.sampler {
                    NegativeSampler::Hard { fraction } => fraction as f32,
                    NegativeSampler::Random => 0.0,
                };
                let scores = match (&mut x.scores, &mut x.chunk_weights, &mut x.chunk_cosines) {
                    (Some(scores), Some(cw), Some(cc)) if self.config.sample_rate < 1.0 => {
                        b.class_max_cosine(
                            &x.weight,
                            shard_len,
                            d,
                            &x.x_hat,
                            &x.gathered_labels,
                            m,
                            cw,
                            cc,
                            scores,
                        )?;
                        Some(&*scores)
                    }
                    _ => None,
                };
                let args = SampleArgs {
                    shard_len,
                    shard_start: self.shard.start,
                    num_sample: sampled_count(self.shard.len, self.config.sample_rate) as usize,
                    rows: m,
                    seed: self.config.seed,
                    step: self.step,
                    hard_fraction,
                };
                b.sample_classes(
                    &args,
                    &mut x.local_labels,
                    scores,
                    &mut x.keys,
                    &mut x.sampled_index,
                )?
            }
        };
        // The counter counts passes that drew their sample: every rank gets here after the same
        // collectives, so a later failure on some of them advances all counters alike.
        self.step += 1;
        self.grad_pending = false;
        self.last_sampled = None;
        if !accumulate {
            self.accumulated = Accumulated::None;
            self.pending_passes = 0;
        }
        let (b, x) = (&self.backend, &mut self.bufs);

        // 4. Sampled, normalized centers and the cosine logits, each logits row padded to
        //    `shape.ld` columns (see `LogitsShape`): the GEMMs run over all `ld` columns, the
        //    padding rows of the sampled centers are zero (at allocation, and zeroed again
        //    below after a larger sample wrote them), and the softmax ignores the padding
        //    columns and zeroes their gradient, so they add nothing to either backward GEMM.
        let shape = LogitsShape::aligned(m, s)?;
        let ld = shape.ld;
        let stale = self.sampled_rows_written.min(ld);
        if stale > s {
            // Only after a larger sample (a given one, or more positives than `num_sample`).
            b.upload_at(&vec![0.0; (stale - s) * d], &mut x.sampled_weights, s * d)?;
        }
        self.sampled_rows_written = self.sampled_rows_written.max(s);
        b.gather_normalize_rows(
            &x.weight,
            d,
            &x.sampled_index,
            s,
            &mut x.sampled_weights,
            &mut x.weight_norms,
        )?;
        let logits = &mut x.logits;
        match logits {
            Logits::F32(l) => b.gemm_nt(m, ld, d, &x.x_hat, &x.sampled_weights, l)?,
            Logits::Half(l, _) => b.gemm_nt16(m, ld, d, &x.x_hat, &x.sampled_weights, l)?,
        }

        // 5–6. Margin, distributed softmax, loss and the logits' gradient in place. A world of
        //      one has nothing to all-reduce, so it runs the three passes as one kernel.
        let margin = self.config.margin.params();
        // Per-row margins (`PassOptions`): every rank's rows of the margin table, gathered in
        // row order (padding rows carry the layer's margin and own no target).
        let host_table = options
            .has_margins()
            .then(|| options.margin_table(&self.config.margin, n));
        let row_margins = if let Some(table) = &host_table {
            if x.margin_table.is_none() {
                let send = b.alloc(n * ROW_MARGIN_FLOATS)?;
                x.margin_table = Some((send, b.alloc(m * ROW_MARGIN_FLOATS)?));
            }
            match &mut x.margin_table {
                Some((send, all)) => {
                    b.upload(table, send)?;
                    self.comm.all_gather(b, send, n * ROW_MARGIN_FLOATS, all)?;
                    Some(&*all)
                }
                None => None,
            }
        } else {
            None
        };
        // The mean over the gathered rows, times the user's gradient scale (`set_grad_scale`).
        let mean = self.grad_scale / real_rows as f32;
        let grad_scale = logits.softmax_grad_scale(mean);
        if self.comm.world_size() == 1 {
            logits.fused(
                b,
                shape,
                &x.local_labels,
                &margin,
                row_margins,
                grad_scale,
                &mut x.row_loss,
            )?;
        } else {
            logits.rowmax(
                b,
                shape,
                &x.local_labels,
                &margin,
                row_margins,
                &mut x.row_max,
                &mut x.target_cos,
            )?;
            self.comm
                .all_reduce_f32(b, &mut x.row_max, m, ReduceOp::Max)?;
            logits.exp_rowsum(
                b,
                shape,
                &x.local_labels,
                &margin,
                row_margins,
                &x.row_max,
                &mut x.row_sum,
            )?;
            self.comm
                .all_reduce_f32(b, &mut x.row_sum, m, ReduceOp::Sum)?;
            let stats = (&x.row_max, &x.row_sum, &x.target_cos);
            logits.loss_grad(
                b,
                shape,
                &x.local_labels,
                &margin,
                row_margins,
                stats,
                grad_scale,
                &mut x.row_loss,
            )?;
            // The losses and the target cosines (pass 3 put them side by side) in one call.
            self.comm
                .all_reduce_f32(b, &mut x.row_loss, 2 * m, ReduceOp::Sum)?;
        }
        let row_stats = b.download(&x.row_loss, 2 * m)?;
        let (row_loss, target_cos) = row_stats.split_at(m);
        let mine = self.comm.rank() * n..self.comm.rank() * n + labels.len();
        let rows = row_results(
            RowInputs {
                loss: &row_loss[mine.clone()],
                target_cos: &target_cos[mine],
                labels,
                table: host_table.as_deref(),
                weights,
            },
            &margin,
            mean,
            real_rows,
        );
        let loss = match weights {
            None => row_loss.iter().map(|&l| f64::from(l)).sum::<f64>(),
            Some(w) => {
                // Every rank's weights, in gathered-row order, into row_max (free once the
                // softmax is done) through staging (free until the reduce-scatter); padding
                // rows weigh 0. Then each row of the logits' gradient times its weight.
                let mut mine = vec![0.0f32; n];
                mine[..w.len()].copy_from_slice(w);
                b.upload(&mine, &mut x.staging)?;
                self.comm.all_gather(b, &x.staging, n, &mut x.row_max)?;
                logits.scale_rows(b, shape, &x.row_max)?;
                let gathered = b.download(&x.row_max, m)?;
                row_loss
                    .iter()
                    .zip(&gathered)
                    .map(|(&l, &w)| f64::from(l) * f64::from(w))
                    .sum::<f64>()
            }
        } / real_rows as f64;

        // 7. Back through the GEMMs and both normalizations; the embedding gradient is summed
        //    over ranks and each rank keeps its own rows.
        match &x.logits {
            Logits::F32(g) => b.gemm_backward(
                m,
                ld,
                d,
                g,
                &x.sampled_weights,
                &x.x_hat,
                &mut x.x_grad,
                &mut x.sampled_weights_grad,
            )?,
            // The mean's 1/rows rides in the GEMMs' alpha (see `Logits::softmax_grad_scale`);
            // the 16-bit copies of x̂ and ŵ made by gemm_nt16 above are still in place.
            Logits::Half(g, _) => b.gemm_backward16(
                m,
                ld,
                d,
                g,
                mean,
                &x.sampled_weights,
                &x.x_hat,
                &mut x.x_grad,
                &mut x.sampled_weights_grad,
                true,
            )?,
        }
        b.normalize_backward(&mut x.x_grad, &x.x_hat, &x.x_norms, m, d)?;
        b.normalize_backward(
            &mut x.sampled_weights_grad,
            &x.sampled_weights,
            &x.weight_norms,
            s,
            d,
        )?;
        match &mut x.grad_wire {
            None => self
                .comm
                .reduce_scatter_f32(b, &x.x_grad, n * d, &mut x.staging)?,
            Some((send, recv)) => {
                // Half the bytes on the wire: each rank's gradient rounded once, summed in the
                // 16-bit dtype by the collective, widened back (see `LayerConfig::grad_wire`).
                let dtype = self.config.grad_wire;
                b.cast_to_wire(&x.x_grad, m * d, dtype, send)?;
                self.comm.reduce_scatter_16(b, send, n * d, recv, dtype)?;
                b.cast_from_wire(recv, n * d, dtype, &mut x.staging)?;
            }
        }
        let grad_embeddings = b.download(&x.staging, labels.len() * d)?;
        self.grad_pending = true;
        self.last_sampled = Some(s);
        self.pending_passes = if accumulate {
            self.pending_passes.saturating_add(1)
        } else {
            1
        };
        Ok(StepOutput {
            loss: loss as f32,
            grad_embeddings,
            sampled: s,
            rows,
        })
    }

    /// Adds the pending pass's gradient into the dense buffer before an accumulating pass
    /// overwrites the sampled rows: the buffer then holds every pass of the sum so far.
    fn fold_pending_grad(&mut self) -> Result<()> {
        let pending = match (self.grad_pending, self.last_sampled) {
            (true, Some(sampled)) => sampled,
            _ => {
                // Nothing pending (a fresh sum after a step or a dropped gradient).
                self.accumulated = Accumulated::None;
                return Ok(());
            }
        };
        let (b, x) = (&self.backend, &mut self.bufs);
        let Some(dense) = x.weight_grad.as_mut() else {
            // forward_backward_inner refused a layer without UpdateMode::Dense.
            return Err(PfcError::Order(
                "gradient accumulation without a dense gradient buffer".into(),
            ));
        };
        let (d, shard_len) = (self.config.dim, self.shard.len as usize);
        let (rows, index) = (&x.sampled_weights_grad, &x.sampled_index);
        match self.accumulated {
            Accumulated::Earlier => {
                b.scatter_add_rows(rows, index, pending, d, dense, shard_len)?
            }
            _ => b.scatter_rows(rows, index, pending, d, dense, shard_len)?,
        }
        self.accumulated = Accumulated::Earlier;
        self.grad_pending = false;
        Ok(())
    }

    /// The sorted global class ids this rank sampled in the last forward pass (also after
    /// [`PartialFc::step`]; empty before the first pass and after the weights were replaced).
    pub fn sampled_classes(&self) -> Result<Vec<i64>> {
        let s = self.last_sampled.unwrap_or(0);
        Ok(self
            .backend
            .download(&self.bufs.sampled_index, s)?
            .into_iter()
            .map(|c| c as i64 + self.shard.start as i64)
            .collect())
    }

    /// d loss / d shard weights, dense (`shard × d`): the gradient [`PartialFc::step`] applies,
    /// or applied when called after it: the last pass's (zero outside its sample), or with
    /// [`PartialFc::forward_backward_accumulate`] the sum of the passes since the step before.
    /// All zero before the first pass and after the weights were replaced.
    pub fn weight_grad_dense(&self) -> Result<Vec<f32>> {
        let d = self.config.dim;
        let len = self.shard.len as usize * d;
        let mut dense = match (self.accumulated, &self.bufs.weight_grad) {
            (Accumulated::Earlier | Accumulated::Applied, Some(sum)) => {
                self.backend.download(sum, len)?
            }
            _ => vec![0.0f32; len],
        };
        if self.accumulated == Accumulated::Applied {
            return Ok(dense);
        }
        if let Some(sampled) = self.last_sampled {
            let rows = self
                .backend
                .download(&self.bufs.sampled_weights_grad, sampled * d)?;
            let index = self.backend.download(&self.bufs.sampled_index, sampled)?;
            crate::cpu::optimizer::scatter_add_rows(&rows, &index, d, &mut dense);
        }
        Ok(dense)
    }
}

/// The largest row weight a pass takes. A row's gradient grows with its weight: far above 1 it
/// leaves 16-bit logits' range (an f16 gradient saturates once s · w passes 65504) and drives
/// the update's scale; a weight of 1e30 gave a finite pass whose step left the weights too
/// large for the next pass (NaN loss). Weights meant as relative importances can always be
/// normalized (e.g. to average 1), which keeps them far below this.
pub(crate) const ROW_WEIGHT_MAX: f32 = 1e6;

/// What is wrong with a pass's row weights, if anything: one per row, each finite and in
/// [0, [`ROW_WEIGHT_MAX`]].
pub(super) fn check_weights(weights: &[f32], rows: usize) -> Option<PfcError> {
    if weights.len() != rows {
        return Some(PfcError::Shape(format!(
            "{} weights for {rows} rows: one weight per row expected",
            weights.len()
        )));
    }
    weights
        .iter()
        .position(|w| !(0.0..=ROW_WEIGHT_MAX).contains(w))
        .map(|row| {
            PfcError::param(
                "weights",
                format!("{} at row {row}", weights[row]),
                "a row's weight must lie in [0, 1e6]: normalize the weights (e.g. to average 1)",
            )
        })
}
