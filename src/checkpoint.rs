//! Safetensors checkpoints of one rank's shard: weights, optimizer state, step counter.
//!
//! A checkpoint names the shard it belongs to (classes, world size, rank, range, dim) in its
//! metadata, and loading checks every one of them before touching the layer, so a checkpoint of
//! another run, another world size or a damaged file is a typed error and the layer is unchanged.

use crate::backend::{Backend, Collective};
use crate::error::{PfcError, Result};
use crate::layer::PartialFc;
use crate::tensor_file::{write_streamed_atomic, StreamedTensor, TensorFile};
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
        let shard = self.shard();
        let shape = vec![shard.len as usize, self.config().dim];
        let weight = |offset, len| self.weight_block(offset, len);
        let momentum = |offset, len| self.momentum_block(offset, len);
        let mut tensors = vec![StreamedTensor {
            name: "weight",
            shape: shape.clone(),
            block: &weight,
        }];
        if self.config().optimizer.is_some() {
            tensors.push(StreamedTensor {
                name: "momentum",
                shape,
                block: &momentum,
            });
        }
        write_streamed_atomic(path, &tensors, self.checkpoint_metadata())
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

    /// Loads this rank's shard from `path`. Every field is checked before the layer changes.
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
        let shape = vec![self.shard().len as usize, self.config().dim];
        let (weight, wshape) = file.require("weight", file.f32("weight"))?;
        if wshape != shape {
            return Err(mismatch(format!(
                "weight has shape {wshape:?}, {shape:?} expected"
            )));
        }
        let momentum = file.f32("momentum")?;
        let has_optimizer = self.config().optimizer.is_some();
        match (&momentum, has_optimizer) {
            (Some((_, mshape)), true) if *mshape != shape => {
                return Err(mismatch(format!(
                    "momentum has shape {mshape:?}, {shape:?} expected"
                )))
            }
            (None, true) => return Err(mismatch("momentum is missing".into())),
            _ => {}
        }
        if step == u64::MAX {
            return Err(mismatch(
                "step is u64::MAX: the step counter could not advance".into(),
            ));
        }
        let dim = self.config().dim.max(1);
        let non_finite = [
            ("weight", Some(&weight)),
            ("momentum", momentum.as_ref().map(|m| &m.0)),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v?)))
        .find_map(|(name, v)| Some((name, v.iter().position(|x| !x.is_finite())?, v)));
        if let Some((name, i, v)) = non_finite {
            return Err(mismatch(format!(
                "{name} holds {} at row {}, column {}",
                v[i],
                i / dim,
                i % dim
            )));
        }
        // Shapes and values are checked above: upload without scanning them a second time.
        self.put_weight(&weight)?;
        if let (Some((m, _)), true) = (momentum, has_optimizer) {
            self.put_momentum(&m)?;
        }
        self.set_steps(step);
        Ok(())
    }
}
