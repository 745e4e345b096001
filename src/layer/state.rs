//! The shard's weights and optimizer state: reading and replacing them, and the hooks a
//! checkpoint load replaces them through (src/checkpoint).

use super::checks::{check_center_norms, check_finite, check_state_range};
use super::PartialFc;
use crate::backend::StateBuf;
use crate::backend::{Backend, Collective};
use crate::config::Optimizer;
use crate::error::{PfcError, Result};

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// Whether the optimizer state is kept in bf16 (`StateDtype::Bf16`): values past bf16's
    /// range must be refused where they enter, before they round to infinity.
    pub(crate) fn state_in_bf16(&self) -> bool {
        self.bufs
            .states
            .iter()
            .any(|s| matches!(s, StateBuf::Bf16(_)))
    }

    /// The shard's weights, `shard × d`, row-major.
    pub fn weight(&self) -> Result<Vec<f32>> {
        self.backend
            .download(&self.bufs.weight, self.shard.len as usize * self.config.dim)
    }

    /// Replaces the shard's weights. The pending gradient (a pass's, or a sum of accumulated
    /// passes) was taken at the old weights and is dropped: `step` then needs a new pass.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] for a length other than the shard's, [`PfcError::Param`] for a
    /// non-finite value or a center whose sum of squares overflows f32 (the step could not
    /// normalize it); the weights are then unchanged.
    pub fn set_weight(&mut self, weight: &[f32]) -> Result<()> {
        let want = self.shard.len as usize * self.config.dim;
        if weight.len() != want {
            return Err(PfcError::Shape(format!(
                "weight of {} values for a shard of {} × {} = {want}",
                weight.len(),
                self.shard.len,
                self.config.dim
            )));
        }
        check_finite("weight", weight, self.config.dim)?;
        check_center_norms("weight", weight, self.config.dim, self.shard.start)?;
        self.backend.upload(weight, &mut self.bufs.weight)?;
        // A gradient of the old weights must not be applied to (or reported for) the new ones.
        self.drop_grad();
        Ok(())
    }

    /// The error of a layer a failed load left part old, part new; `Ok` otherwise.
    pub(crate) fn check_complete(&self) -> Result<()> {
        if self.incomplete {
            return Err(PfcError::param(
                "checkpoint",
                "a load that failed midway",
                "the weights are part old, part new: load a checkpoint again before training or saving",
            ));
        }
        Ok(())
    }

    /// A checkpoint load starts overwriting weights and optimizer state block by block.
    pub(crate) fn begin_replacing_state(&mut self) {
        self.incomplete = true;
        self.drop_grad();
    }

    /// Uploads a block of tensor `name` (`weight` or one of the optimizer's
    /// [`Optimizer::state_names`]) at element `offset`.
    pub(crate) fn put_block(&mut self, name: &str, offset: usize, values: &[f32]) -> Result<()> {
        if name == "weight" {
            return self
                .backend
                .upload_at(values, &mut self.bufs.weight, offset);
        }
        let i = self.state_index(name)?;
        self.bufs.states[i].upload_at(&self.backend, values, offset)
    }

    /// The load that began replacing the state finished.
    pub(crate) fn finish_replacing_state(&mut self) {
        self.incomplete = false;
    }

    /// Weight values `offset .. offset + len` (row-major over the shard), for streaming.
    pub(crate) fn weight_block(&self, offset: usize, len: usize) -> Result<Vec<f32>> {
        self.backend.download_at(&self.bufs.weight, offset, len)
    }

    /// Values `offset .. offset + len` of the optimizer state `name`, widened to f32.
    pub(crate) fn state_block(&self, name: &str, offset: usize, len: usize) -> Result<Vec<f32>> {
        let i = self.state_index(name)?;
        self.bufs.states[i].download_at(&self.backend, offset, len)
    }

    /// Names of this layer's optimizer state tensors (`momentum` for SGD, `exp_avg` and
    /// `exp_avg_sq` for AdamW, none without an optimizer): what checkpoints hold beside the
    /// weights.
    pub fn state_names(&self) -> &'static [&'static str] {
        self.config.optimizer.map_or(&[], |o| o.state_names())
    }

    fn state_index(&self, name: &str) -> Result<usize> {
        let names = self.state_names();
        names.iter().position(|n| *n == name).ok_or_else(|| {
            PfcError::Shape(if names.is_empty() {
                format!("this layer has no optimizer state (asked for {name})")
            } else {
                format!("this layer's optimizer state is {names:?}, not {name}")
            })
        })
    }

    /// The SGD momentum, if the layer's optimizer is SGD (a bf16 momentum widened to f32,
    /// exactly); `None` without an optimizer or with AdamW (see
    /// [`optimizer_state`](Self::optimizer_state)).
    pub fn momentum(&self) -> Result<Option<Vec<f32>>> {
        match self.config.optimizer {
            Some(Optimizer::Sgd(_)) => self.optimizer_state("momentum").map(Some),
            _ => Ok(None),
        }
    }

    /// Replaces the SGD momentum (rounded to nearest even for a bf16 momentum).
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when the layer's optimizer is not SGD or the length is not the
    /// shard's; [`PfcError::Param`] for a NaN or infinite value.
    pub fn set_momentum(&mut self, momentum: &[f32]) -> Result<()> {
        self.set_optimizer_state("momentum", momentum)
    }

    /// The optimizer state tensor `name` (one of [`state_names`](Self::state_names)), `shard × d`
    /// row-major, widened to f32 (exactly, for bf16 state).
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when the layer has no such state.
    pub fn optimizer_state(&self, name: &str) -> Result<Vec<f32>> {
        let i = self.state_index(name)?;
        let len = self.shard.len as usize * self.config.dim;
        self.bufs.states[i].download(&self.backend, len)
    }

    /// Replaces the optimizer state tensor `name` (rounded to nearest even for bf16 state).
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when the layer has no such state or the length is not the shard's;
    /// [`PfcError::Param`] for a NaN or infinite value, or a negative `exp_avg_sq` (nothing is
    /// changed).
    pub fn set_optimizer_state(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let i = self.state_index(name)?;
        let want = self.shard.len as usize * self.config.dim;
        if values.len() != want {
            return Err(PfcError::Shape(format!(
                "{name} of {} values for a shard of {want}",
                values.len()
            )));
        }
        let name = self.state_names()[i];
        check_finite(name, values, self.config.dim)?;
        check_state_range(name, values, self.config.dim)?;
        if self.state_in_bf16() {
            if let Some(at) = values
                .iter()
                .position(|&v| !half::bf16::from_f32(v).is_finite())
            {
                let dim = self.config.dim.max(1);
                return Err(PfcError::param(
                    name,
                    format!("row {}, column {}: {:e}", at / dim, at % dim, values[at]),
                    "past bf16's range: the state is kept in bf16 (StateDtype::Bf16), where it \
                     would round to infinity",
                ));
            }
        }
        self.bufs.states[i].upload(&self.backend, values)
    }
}
