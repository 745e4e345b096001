//! The update: the optimizer (SGD with momentum, or AdamW) applied to the shard from the last
//! pass's gradient (`step`).

use super::{Accumulated, PartialFc};
use crate::backend::AdamWStep;
use crate::backend::{Backend, Collective};
use crate::config::{Optimizer, UpdateMode};
use crate::error::{PfcError, Result};

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// Applies the optimizer (SGD with momentum, or AdamW) to the shard with learning rate `lr`,
    /// from the pending gradient: the last [`PartialFc::forward_backward`]'s, plus those of the
    /// [`PartialFc::forward_backward_accumulate`] passes after it ([`PartialFc::pending_passes`]
    /// in all). Each call that runs an
    /// update counts one in [`optimizer_steps`](Self::optimizer_steps), AdamW's t.
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] for a NaN, infinite or negative `lr` (with AdamW also `lr ×
    /// weight_decay ≥ 1`), a layer without an optimizer, or one left incomplete by a load that
    /// failed midway;
    /// [`PfcError::Order`] when no gradient is pending (no pass since the last `step`, the
    /// last pass failed, or the gradient was dropped: [`PartialFc::discard_grad`], new weights
    /// from [`PartialFc::set_weight`] or a load). The gradient is consumed before the update runs: should a device error
    /// stop the update part-way, the gradient is gone (applying it again after a partial update
    /// would count it twice), so the next `step` needs a new pass.
    pub fn step(&mut self, lr: f32) -> Result<()> {
        self.check_complete()?;
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(PfcError::param("lr", lr, "must be finite and >= 0"));
        }
        let Some(optimizer) = self.config.optimizer else {
            return Err(PfcError::param(
                "optimizer",
                "none",
                "this layer was built without an optimizer",
            ));
        };
        if let Optimizer::AdamW(a) = optimizer {
            // The decoupled decay multiplies each weight by 1 − lr·λ: at lr·λ ≥ 1 that flips or
            // zeroes every weight (PyTorch does it anyway; here it is refused).
            if f64::from(lr) * f64::from(a.weight_decay) >= 1.0 {
                return Err(PfcError::param(
                    "lr",
                    lr,
                    format!(
                        "lr × weight_decay ({}) must be < 1 for AdamW's decoupled decay",
                        a.weight_decay
                    ),
                ));
            }
        }
        let sampled =
            match (self.grad_pending, self.last_sampled) {
                (true, Some(sampled)) => sampled,
                _ => return Err(PfcError::Order(
                    "step() needs a forward_backward() first (none since the last step, or the \
                     pending gradient was dropped: a failed pass, discard_grad, or new weights \
                     from set_weight or a load)"
                        .into(),
                )),
            };
        self.grad_pending = false;
        self.pending_passes = 0;
        let accumulated = self.accumulated == Accumulated::Earlier;
        // Counted before the update runs, as the gradient is consumed: an update stopped part-way
        // by a device error is not retried.
        self.optimizer_step = self.optimizer_step.saturating_add(1);
        let b = &self.backend;
        let x = &mut self.bufs;
        let d = self.config.dim;
        let len = self.shard.len as usize * d;
        let dense = match (self.config.update, x.weight_grad.as_mut()) {
            (UpdateMode::Dense, Some(grad)) => {
                let (rows, index, shard_len) = (
                    &x.sampled_weights_grad,
                    &x.sampled_index,
                    self.shard.len as usize,
                );
                if accumulated {
                    // The earlier passes' sum is there; the last pass adds to it.
                    self.accumulated = Accumulated::Applied;
                    b.scatter_add_rows(rows, index, sampled, d, grad, shard_len)?;
                } else {
                    b.scatter_rows(rows, index, sampled, d, grad, shard_len)?;
                }
                Some(&*grad)
            }
            _ => None,
        };
        match (optimizer, x.states.as_mut_slice()) {
            (Optimizer::Sgd(sgd), [momentum]) => match dense {
                Some(grad) => b.sgd_momentum_dense(
                    &mut x.weight,
                    momentum,
                    grad,
                    len,
                    lr,
                    sgd.momentum,
                    sgd.weight_decay,
                ),
                None => b.sgd_momentum_sparse(
                    &mut x.weight,
                    momentum,
                    &x.sampled_weights_grad,
                    &x.sampled_index,
                    sampled,
                    d,
                    lr,
                    sgd.momentum,
                    sgd.weight_decay,
                ),
            },
            (Optimizer::AdamW(adamw), [exp_avg, exp_avg_sq]) => {
                let step = AdamWStep {
                    lr,
                    adamw,
                    t: self.optimizer_step,
                    seed: self.config.seed,
                };
                match dense {
                    Some(grad) => {
                        b.adamw_dense(&mut x.weight, exp_avg, exp_avg_sq, grad, len, step)
                    }
                    None => b.adamw_sparse(
                        &mut x.weight,
                        exp_avg,
                        exp_avg_sq,
                        &x.sampled_weights_grad,
                        &x.sampled_index,
                        sampled,
                        d,
                        step,
                    ),
                }
            }
            _ => unreachable!("the layer allocates one state buffer per state name"),
        }
    }
}
