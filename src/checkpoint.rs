//! Safetensors checkpoints of one rank's shard: weights, optimizer state, step counter.
//!
//! A checkpoint names the shard it belongs to (classes, world size, rank, range, dim) in its
//! metadata, and loading checks every one of them before touching the layer, so a checkpoint of
//! another run, another world size or a damaged file is a typed error and the layer is unchanged.

use crate::backend::{Backend, Collective};
use crate::error::{PfcError, Result};
use crate::layer::PartialFc;
use crate::tensor_file::{write_atomic, OutTensor, TensorFile, STREAM_BLOCK};
use std::collections::HashMap;
use std::path::Path;

/// Format tag written into every checkpoint.
pub const FORMAT: &str = "partial-fc-shard/1";

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// Writes this rank's shard (and momentum, if any) to `path`, atomically.
    ///
    /// ```
    /// use partial_fc::{CpuBackend, LayerConfig, PartialFc, collective::SingleRank};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("rank0.safetensors");
    /// let layer = PartialFc::new(LayerConfig::new(100, 8, 4), CpuBackend, SingleRank).unwrap();
    /// layer.save(&path).unwrap();
    /// let mut other = PartialFc::zeroed(LayerConfig::new(100, 8, 4), CpuBackend, SingleRank).unwrap();
    /// other.load(&path).unwrap();
    /// assert_eq!(other.weight().unwrap(), layer.weight().unwrap());
    /// ```
    ///
    /// The shard goes through host memory a block (64 MiB) at a time, so a shard of tens of
    /// gigabytes needs no host copy of itself.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.check_complete()?;
        let shard = self.shard();
        let shape = vec![shard.len as usize, self.config().dim];
        let weight = |offset, len| self.weight_block(offset, len);
        let momentum = |offset, len| self.momentum_block(offset, len);
        let mut tensors = vec![OutTensor::F32Blocks("weight", shape.clone(), &weight)];
        if self.config().optimizer.is_some() {
            tensors.push(OutTensor::F32Blocks("momentum", shape, &momentum));
        }
        write_atomic(path, &tensors, self.checkpoint_metadata())
    }

    fn checkpoint_metadata(&self) -> HashMap<String, String> {
        let shard = self.shard();
        let c = self.collective();
        [
            ("format", FORMAT.to_string()),
            ("num_classes", self.config().num_classes.to_string()),
            ("world_size", c.world_size().to_string()),
            ("rank", c.rank().to_string()),
            ("shard_start", shard.start.to_string()),
            ("shard_len", shard.len.to_string()),
            ("dim", self.config().dim.to_string()),
            ("step", self.steps().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Loads this rank's shard from `path`. Every field, and every value (a NaN, a read error),
    /// is checked before the layer changes. The tensors go through the host a block (64 MiB) at
    /// a time, read twice: once to check them, once to upload them. Should the second read fail
    /// (the file changed or became unreadable in between), the layer is left part old, part new
    /// and says so: it refuses to train or save until a load succeeds.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let file = TensorFile::read(path)?;
        let mismatch = |reason: String| PfcError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let want = self.checkpoint_metadata();
        for key in [
            "format",
            "num_classes",
            "world_size",
            "rank",
            "shard_start",
            "shard_len",
            "dim",
        ] {
            let got = file.metadata().get(key);
            if got != want.get(key) {
                return Err(mismatch(format!(
                    "{key} is {} but this layer has {}",
                    got.map_or("missing", String::as_str),
                    want[key]
                )));
            }
        }
        let step: u64 = file
            .meta("step")?
            .ok_or_else(|| mismatch("step is missing".into()))?;
        if step == u64::MAX {
            return Err(mismatch(
                "step is u64::MAX: the step counter could not advance".into(),
            ));
        }
        let shape = [self.shard().len as usize, self.config().dim];
        let mut names = vec!["weight"];
        if self.config().optimizer.is_some() {
            names.push("momentum");
        }
        for name in &names {
            match file.shape(name) {
                None => return Err(mismatch(format!("{name} is missing"))),
                Some(s) if s != shape => {
                    return Err(mismatch(format!(
                        "{name} has shape {s:?}, {shape:?} expected"
                    )))
                }
                Some(_) => {}
            }
        }
        // The tensors go through the host a block at a time: first every block is read and
        // checked (a NaN or a read error changes nothing), then read again and uploaded.
        let dim = self.config().dim.max(1);
        let len = shape[0] * shape[1];
        for name in &names {
            for offset in (0..len).step_by(STREAM_BLOCK) {
                let block = file.f32_block(name, offset, STREAM_BLOCK.min(len - offset))?;
                if let Some(i) = block.iter().position(|x| !x.is_finite()) {
                    let at = offset + i;
                    return Err(mismatch(format!(
                        "{name} holds {} at row {}, column {}",
                        block[i],
                        at / dim,
                        at % dim
                    )));
                }
            }
        }
        // A failure from here on (the file changed or became unreadable since the check) leaves
        // the layer part old, part new: it is marked so, and refuses to train or save until a
        // load succeeds.
        self.begin_replacing_state();
        for name in &names {
            for offset in (0..len).step_by(STREAM_BLOCK) {
                let block = file.f32_block(name, offset, STREAM_BLOCK.min(len - offset))?;
                if let Some(i) = block.iter().position(|x| !x.is_finite()) {
                    return Err(mismatch(format!(
                        "{name} changed while it was loaded (a {} at value {})",
                        block[i],
                        offset + i
                    )));
                }
                self.put_block(name == &"momentum", offset, &block)?;
            }
        }
        self.finish_replacing_state();
        self.set_steps(step);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::collective::SingleRank;
    use crate::{CpuBackend, LayerConfig, PartialFc, PfcError};

    #[test]
    fn a_layer_a_load_left_half_replaced_refuses_to_train_or_save_until_a_load_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.safetensors");
        let mut layer =
            PartialFc::new(LayerConfig::new(100, 8, 4), CpuBackend, SingleRank).unwrap();
        layer.save(&good).unwrap();
        // What a second read failing midway leaves behind.
        layer.begin_replacing_state();
        let x = crate::init::normal_rows(1, 0, 4, 8, 1.0);
        let labels = [1i64, 2, 3, 4];
        let is_refusal = |e: PfcError| {
            matches!(
                e,
                PfcError::Param {
                    name: "checkpoint",
                    ..
                }
            )
        };
        assert!(is_refusal(layer.forward_backward(&x, &labels).unwrap_err()));
        assert!(is_refusal(layer.step(0.1).unwrap_err()));
        assert!(is_refusal(layer.save(&dir.path().join("x")).unwrap_err()));
        assert!(!dir.path().join("x").exists());
        layer.load(&good).unwrap();
        layer.forward_backward(&x, &labels).unwrap();
        layer.step(0.1).unwrap();
    }
}
