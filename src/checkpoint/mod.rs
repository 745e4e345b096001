//! Safetensors checkpoints of one rank's shard: weights, optimizer state, step counter.
//!
//! A checkpoint names the shard it belongs to (classes, world size, rank, range, dim) in its
//! metadata, and loading checks every one of them before touching the layer, so a checkpoint of
//! another run, another world size or a damaged file is a typed error and the layer is unchanged.

use crate::backend::{Backend, Collective};
use crate::error::{PfcError, Result};
use crate::layer::{center_norm_reason, storable_as, CenterNorms, PartialFc};
use crate::tensor_file::{write_pending, OutTensor, TensorFile, STREAM_BLOCK};
use crate::Shard;
use std::collections::HashMap;
use std::path::Path;

mod predict;
mod save_set;
mod set;
pub(crate) use set::recorded_config;
pub use set::{reshard, reshard_grown, shard_file_name, CheckpointSet, MAX_RESHARD_WORLD};

/// Reads values `offset .. offset + len` of a tensor (`weight` or an optimizer state) of a shard.
type ReadBlock<'a> = dyn Fn(&str, usize, usize) -> Result<Vec<f32>> + 'a;

/// Format tag written into every checkpoint.
pub const FORMAT: &str = "partial-fc-shard/1";

/// Prefix of the metadata keys a caller adds to a checkpoint
/// ([`PartialFc::save_with_metadata`]): they can never collide with the crate's own.
pub const USER_PREFIX: &str = "user.";

/// The metadata a caller saved with [`PartialFc::save_with_metadata`], keys without
/// [`USER_PREFIX`]: the trainer's own state beside the layer's (an epoch, a schedule, AdaFace's
/// running statistics). Only the file's header is read.
///
/// # Errors
///
/// Those of reading a safetensors file ([`TensorFile::read`]).
pub fn user_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let file = TensorFile::read(path)?;
    Ok(file
        .metadata()
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(USER_PREFIX)?.to_string(), v.clone())))
        .collect())
}

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// Writes this rank's shard (and its optimizer state, if any: `momentum` for SGD, `exp_avg`
    /// and `exp_avg_sq` for AdamW) to `path`, atomically.
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
    ///
    /// # Errors
    ///
    /// [`PfcError::Checkpoint`] when a weight or momentum value is NaN or infinite (a diverged
    /// run: `load` would refuse the file, so none is written and an existing file at `path` is
    /// kept), or when the step counter is `u64::MAX` (likewise); I/O errors as [`PfcError::Io`]; the layer's refusal after a failed load.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with_metadata(path, &[])
    }

    /// [`save`](Self::save), with entries of the caller's own in the file's metadata, read back
    /// with [`user_metadata`]: what a trainer must resume besides the layer (AdaFace's running
    /// statistics, an epoch, a learning-rate schedule), in the same file and written in the
    /// same atomic step. Keys are stored under [`USER_PREFIX`]; each rank saves its own
    /// (`load`, `load_resharded` and `pfc reshard` ignore them, and a reshard does not carry
    /// them over: per-rank state has no meaning at another world size).
    ///
    /// ```
    /// use partial_fc::checkpoint::user_metadata;
    /// use partial_fc::{collective::SingleRank, AdaFace, CpuBackend, LayerConfig, PartialFc};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("rank0.safetensors");
    /// let layer = PartialFc::new(LayerConfig::new(100, 8, 4), CpuBackend, SingleRank).unwrap();
    /// let adaface = AdaFace::new();
    /// let stats = format!("{} {}", adaface.batch_mean, adaface.batch_std);
    /// layer.save_with_metadata(&path, &[("adaface", stats.as_str())]).unwrap();
    /// assert_eq!(user_metadata(&path).unwrap()["adaface"], "20 100");
    /// ```
    ///
    /// # Errors
    ///
    /// Those of `save`, and [`PfcError::Param`] for an empty key, a key of characters other
    /// than ASCII letters, digits, `.`, `_` and `-`, or the same key twice (nothing written).
    pub fn save_with_metadata(&self, path: &Path, extra: &[(&str, &str)]) -> Result<()> {
        self.pending_save(path, extra)?.commit()
    }

    /// `save_with_metadata`'s checks and write, up to a flushed temporary file beside `path`
    /// that [`PendingFile::commit`](crate::atomic_file::PendingFile::commit) renames into place
    /// (dropped uncommitted, it is removed).
    pub(crate) fn pending_save(
        &self,
        path: &Path,
        extra: &[(&str, &str)],
    ) -> Result<crate::atomic_file::PendingFile> {
        let mut user = HashMap::new();
        for &(key, value) in extra {
            let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if key.is_empty() || !key.chars().all(plain) {
                return Err(PfcError::param(
                    "metadata key",
                    format!("{key:?}"),
                    "must be non-empty ASCII letters, digits, '.', '_' or '-'",
                ));
            }
            if user
                .insert(format!("{USER_PREFIX}{key}"), value.to_string())
                .is_some()
            {
                return Err(PfcError::param(
                    "metadata key",
                    format!("{key:?}"),
                    "given twice",
                ));
            }
        }
        self.check_complete()?;
        if self.steps() == u64::MAX {
            // `load` refuses such a file (the counter could not advance): do not write it.
            return Err(PfcError::Checkpoint {
                path: path.to_path_buf(),
                reason: "not written: the step counter is u64::MAX (set_steps), which load \
                         refuses"
                    .into(),
            });
        }
        let shard = self.shard();
        let shape = vec![shard.len as usize, self.config().dim];
        // A diverged run's NaN would make a file that `load` refuses: refuse to write it.
        let dim = self.config().dim.max(1);
        let finite = |name: &str, offset: usize, block: Vec<f32>| match block
            .iter()
            .position(|v| !v.is_finite())
        {
            None => Ok(block),
            Some(i) => {
                let row = (offset + i) / dim;
                Err(PfcError::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "not written: {name} holds {} at row {row} (class {}); the training \
                         diverged (lower the learning rate, or resume from an earlier checkpoint)",
                        block[i],
                        shard.start + row as u64
                    ),
                })
            }
        };
        let weight = |offset, len| finite("weight", offset, self.weight_block(offset, len)?);
        let states: Vec<_> = self
            .state_names()
            .iter()
            .map(|&name| {
                move |offset, len| finite(name, offset, self.state_block(name, offset, len)?)
            })
            .collect();
        let mut tensors = vec![OutTensor::F32Blocks("weight", shape.clone(), &weight)];
        for (name, read) in self.state_names().iter().zip(&states) {
            tensors.push(OutTensor::F32Blocks(name, shape.clone(), read));
        }
        let mut meta = self.checkpoint_metadata();
        meta.extend(user);
        write_pending(path, &tensors, meta)
    }

    fn checkpoint_metadata(&self) -> HashMap<String, String> {
        let c = self.collective();
        set::metadata(
            self.config().num_classes,
            c.world_size(),
            c.rank(),
            self.shard(),
            self.config().dim,
            self.steps(),
            self.optimizer_steps(),
            Some(self.config().seed),
            Some(&recorded_config(self.config())),
        )
    }

    /// Loads this rank's shard from `path`: weights, optimizer state and both counters (so that,
    /// with the saved run's `LayerConfig::seed`, the sampler draws what it would have drawn next;
    /// no `set_steps` is needed). Not the gradient scale, which the run's schedule sets
    /// ([`PartialFc::set_grad_scale`]: call it again after the load, as after construction). Every
    /// field, and every value (a NaN, a read error), is checked before the layer changes. The
    /// tensors go through the host a block (64 MiB) at a time, read twice: once to check them,
    /// once to upload them. Should the second read fail (the file changed or became unreadable
    /// in between), the layer is left part old, part new and says so: it refuses to train or
    /// save until a load succeeds. A load that changes the layer drops its pending gradient
    /// (also a sum of accumulated passes: checkpoints do not hold one); one refused before it
    /// changed anything keeps it.
    ///
    /// `load` reads this rank's file alone and talks to no other rank: it cannot tell that the
    /// ranks' files come from different steps (a crash between two ranks' saves) or seeds. To
    /// resume a run, prefer [`PartialFc::load_resharded`] with every rank's file: it checks that
    /// they make one run (same step, seed and classifier) and works for any world size.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let file = TensorFile::read(path)?;
        // The reasons quote the file's own metadata: escaped and cut (`printable`).
        let mismatch = |reason: String| PfcError::Checkpoint {
            path: path.to_path_buf(),
            reason: crate::tensor_file::printable(&reason),
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
            // Numbers compare as numbers, parsed as CheckpointSet::open parses them (so "010"
            // is 10 to both, and text that is no number is refused the same way).
            let same = match key {
                "format" => got == want.get(key),
                _ => file.meta::<u64>(key)? == want[key].parse().ok(),
            };
            if !same {
                let hint = match key {
                    "world_size" | "rank" => {
                        " (to resume on another world size, use load_resharded with every rank's \
                         file)"
                    }
                    "num_classes" => {
                        " (to grow a classifier for new classes, rewrite the files first: \
                         checkpoint::reshard_grown, or pfc reshard --num-classes)"
                    }
                    _ => "",
                };
                return Err(mismatch(format!(
                    "{key} is {} but this layer has {}{hint}",
                    got.map_or("missing", String::as_str),
                    want[key]
                )));
            }
        }
        let step: u64 = file
            .meta("step")?
            .ok_or_else(|| mismatch("step is missing".into()))?;
        // Files from before the count was recorded: builds that took AdamW's t from the pass
        // counter, and SGD runs of one update per pass.
        let optimizer_steps: u64 = file.meta("optimizer_steps")?.unwrap_or(step);
        // Not compared with this layer's (a run may resume with another seed), but parsed as
        // CheckpointSet::open parses it, so that a file one reader refuses the other does too.
        let _seed: Option<u64> = file.meta("seed")?;
        if step == u64::MAX {
            return Err(mismatch(
                "step is u64::MAX: the step counter could not advance".into(),
            ));
        }
        let shape = [self.shard().len as usize, self.config().dim];
        // The file's tensors as `CheckpointSet::open` judges them (all f32 of the shard's
        // shape, no mix of two optimizers' state), whichever this layer reads: a file one
        // reader refuses, the other does too (a review found `load` taking a file with both
        // SGD's and AdamW's state, or a bf16 momentum beside a layer that reads none).
        set::state_group(&file, shape)?;
        let names = self.tensor_names();
        for name in &names {
            match file.shape(name) {
                None if *name == "weight" => return Err(mismatch("weight is missing".into())),
                None => {
                    return Err(mismatch(format!(
                        "{name} is missing: this layer's optimizer keeps {:?}, the file {} (a \
                         file of another optimizer: load it into a layer of that optimizer, or \
                         of none for the weights alone)",
                        self.state_names(),
                        describe_states(&file)
                    )))
                }
                Some(s) if s != shape => {
                    return Err(mismatch(format!(
                        "{name} has shape {s:?}, {shape:?} expected"
                    )))
                }
                Some(_) => {}
            }
        }
        let dim = self.config().dim.max(1);
        let read = |name: &str, offset, len| {
            let block = file.f32_block(name, offset, len)?;
            let bad = |x: &f32| !crate::layer::storable(name, *x);
            match block.iter().position(bad) {
                Some(i) => {
                    let at = offset + i;
                    Err(mismatch(format!(
                        "{name} holds {} at row {}, column {}",
                        block[i],
                        at / dim,
                        at % dim
                    )))
                }
                None => Ok(block),
            }
        };
        let checks = LoadChecks {
            dim: self.config().dim,
            first_class: self.shard().start,
            bf16_state: self.state_in_bf16(),
            path,
        };
        check_state(&names, shape[0] * shape[1], &read, &checks)?;
        self.write_state(&names, shape[0] * shape[1], &read)?;
        self.set_steps(step);
        self.set_optimizer_steps(optimizer_steps);
        Ok(())
    }

    /// Loads this rank's shard from the checkpoint files of a run of any world size (every
    /// rank's file, or at least those holding this rank's classes): resume a job on another
    /// number of GPUs. The files must agree with each other ([`CheckpointSet::open`]) and with
    /// this layer (classes, dimension; the optimizer's state tensors if the layer has an
    /// optimizer). Every value is checked before the layer changes, as in [`load`](Self::load).
    /// It is a collective call: in a job of k ranks every rank calls it, with the same files,
    /// and the ranks agree (the all-reduces a pass agrees with) before any layer changes. If one
    /// rank's check fails (a file it needs is missing or damaged), that rank returns its error,
    /// every other rank a [`PfcError::Collective`] naming it, and no layer has changed; a rank
    /// in another call (a pass) is refused as such. The ranks wait for each other there, so a
    /// collective timeout (`NcclCollective`'s, `ThreadGroup`'s) must cover the slowest rank's
    /// check: one read of its shard's tensors from the files.
    ///
    /// The ranks must also have found the same checkpoint (the same step, optimizer step, seed,
    /// writing world size, optimizer state tensors and recorded configuration,
    /// [`CheckpointSet::config`]): ranks given different runs' files, or one run's files of two
    /// steps, are all refused in the same way, naming a rank that differs. (A resharded copy
    /// counts as another checkpoint than its originals: give every rank the same files.)
    ///
    /// Not compared with the loading layer, because a difference is legitimate on resume: the
    /// state dtype (bf16 files load into an f32 layer and back, converted), the margin, sampler,
    /// update mode and the optimizer's hyper-parameters (recorded in the files' `config`); and
    /// the seed (recorded, [`CheckpointSet::seed`]): a layer with another `LayerConfig::seed`
    /// draws other samples from here on.
    ///
    /// ```
    /// use partial_fc::{collective::ThreadGroup, Collective, CpuBackend, LayerConfig, PartialFc};
    /// let dir = tempfile::tempdir().unwrap();
    /// let root = dir.path().to_path_buf();
    /// // A run of 3 ranks saves its shards...
    /// let old: Vec<Vec<f32>> = ThreadGroup::run(3, |comm| {
    ///     let path = root.join(format!("rank{}.safetensors", comm.rank()));
    ///     let layer = PartialFc::new(LayerConfig::new(100, 8, 4), CpuBackend, comm).unwrap();
    ///     layer.save(&path).unwrap();
    ///     layer.weight().unwrap()
    /// });
    /// // ...and a run of 2 ranks resumes from them.
    /// let paths: Vec<_> = (0..3).map(|r| root.join(format!("rank{r}.safetensors"))).collect();
    /// let new: Vec<Vec<f32>> = ThreadGroup::run(2, |comm| {
    ///     let mut layer = PartialFc::zeroed(LayerConfig::new(100, 8, 4), CpuBackend, comm).unwrap();
    ///     layer.load_resharded(&paths).unwrap();
    ///     layer.weight().unwrap()
    /// });
    /// assert_eq!(old.concat(), new.concat());
    /// ```
    pub fn load_resharded<P: AsRef<Path>>(&mut self, paths: &[P]) -> Result<()> {
        // Every rank checks the files for its own shard (reading every value once), then the
        // ranks agree: one rank's missing or damaged file stops all of them before any layer
        // changes, instead of leaving the others to train alone and fail later in a collective.
        let (set, own) = match self.check_resharded(paths) {
            Ok(set) => (Some(set), None),
            Err(e) => (None, Some(e)),
        };
        // The same agreement as a pass's (a call code and the configuration's fingerprint), so
        // that a peer in another call is refused as such rather than paired with this one; each
        // rank adds which checkpoint it found, so that ranks given different runs' files (or
        // the same run's at different steps) are refused instead of training on a mix.
        let (identity, second) = set.as_ref().map_or((0, 0), set_identity);
        let found = self.agree(own, identity, crate::layer::Call::Load)?;
        let set = set.ok_or_else(|| {
            PfcError::Collective("internal: the ranks agreed on a check that failed".into())
        })?;
        // A second 24 bits of the identity, so that two checkpoints must collide in 48 bits to
        // pass (a review found a step that matched another's 24 bits in a search of 10⁷).
        let mismatch = found.iter().position(|&f| f != identity);
        let found_second = match mismatch {
            Some(_) => found,
            None => self.agree(None, second, crate::layer::Call::Load)?,
        };
        let mismatch = mismatch.or_else(|| found_second.iter().position(|&f| f != second));
        if let Some(r) = mismatch {
            return Err(PfcError::Collective(format!(
                "rank {r} loaded another checkpoint than rank {} (step {}, optimizer step {}, \
                 seed {}, written by {} ranks): every rank must load the same run's files of one \
                 step; no rank's layer changed",
                self.collective().rank(),
                set.step(),
                set.optimizer_steps(),
                set.seed().map_or("not recorded".into(), |s| s.to_string()),
                set.world_size()
            )));
        }
        let (shard, dim) = (self.shard(), self.config().dim);
        let names = self.tensor_names();
        let read = |name: &str, offset, len| set.read(name, shard.start, offset, len);
        self.write_state(&names, shard.len as usize * dim, &read)?;
        self.set_steps(set.step());
        self.set_optimizer_steps(set.optimizer_steps());
        Ok(())
    }

    /// The tensors a checkpoint of this layer holds: `weight`, then its optimizer's state.
    fn tensor_names(&self) -> Vec<&'static str> {
        let mut names = vec!["weight"];
        names.extend_from_slice(self.state_names());
        names
    }

    /// `load_resharded`'s checks on this rank, before the ranks agree: the set, its match with
    /// this layer, and every value of this rank's shard read once.
    fn check_resharded<P: AsRef<Path>>(&self, paths: &[P]) -> Result<CheckpointSet> {
        let set = CheckpointSet::open(paths)?;
        let first = paths[0].as_ref();
        let mismatch = |reason: String| PfcError::Checkpoint {
            path: first.to_path_buf(),
            reason: crate::tensor_file::printable(&reason),
        };
        let (classes, dim) = (self.config().num_classes, self.config().dim);
        if (set.num_classes(), set.dim()) != (classes, dim) {
            let hint = if set.dim() == dim && set.num_classes() < classes {
                " (to grow a classifier for new classes, rewrite the files first: \
                 checkpoint::reshard_grown, or pfc reshard --num-classes)"
            } else {
                ""
            };
            return Err(mismatch(format!(
                "the files hold {} classes of d = {}, this layer {classes} of d = {dim}{hint}",
                set.num_classes(),
                set.dim()
            )));
        }
        let names = self.tensor_names();
        if set.state_names() != self.state_names() && !self.state_names().is_empty() {
            let held = match set.state_names() {
                [] => "no optimizer state (saved without an optimizer)".to_string(),
                names => format!("optimizer state {names:?}"),
            };
            return Err(mismatch(format!(
                "the files hold {held} and this layer's optimizer keeps {:?} (a layer without an \
                 optimizer loads the weights alone)",
                self.state_names()
            )));
        }
        // (A step counter of u64::MAX was refused by CheckpointSet::open.)
        let shard: Shard = self.shard();
        set.require(shard)?;
        let read = |name: &str, offset, len| set.read(name, shard.start, offset, len);
        let checks = LoadChecks {
            dim,
            first_class: shard.start,
            bf16_state: self.state_in_bf16(),
            path: first,
        };
        check_state(&names, shard.len as usize * dim, &read, &checks)?;
        Ok(set)
    }

    /// Uploads `read`'s blocks, already checked ([`check_state`]: a NaN or a read error there
    /// changes nothing). A failure here (the files changed or became
    /// unreadable since the check) leaves the layer part old, part new: it is marked so, and
    /// refuses to train or save until a load succeeds.
    fn write_state(&mut self, names: &[&str], len: usize, read: &ReadBlock<'_>) -> Result<()> {
        self.begin_replacing_state();
        for name in names {
            for offset in (0..len).step_by(STREAM_BLOCK) {
                let block = read(name, offset, STREAM_BLOCK.min(len - offset))?;
                self.put_block(name, offset, &block)?;
            }
        }
        self.finish_replacing_state();
        Ok(())
    }
}

/// What a loaded shard must hold beyond finite values, and whom to blame: the layer's first
/// class (to name a class), whether its optimizer state is bf16, and the file (or the set's
/// first file) an error names.
struct LoadChecks<'a> {
    dim: usize,
    first_class: u64,
    bf16_state: bool,
    path: &'a Path,
}

/// Reads every block of every tensor once: a NaN, a bad value or a read error is an error
/// before anything changes. So is a class center whose sum of squares overflows f32 (the step
/// could not normalize it: `set_weight` refuses it too) and, for bf16 optimizer state, a value
/// that would round to infinity there.
fn check_state(names: &[&str], len: usize, read: &ReadBlock<'_>, c: &LoadChecks<'_>) -> Result<()> {
    let refuse = |reason: String| PfcError::Checkpoint {
        path: c.path.to_path_buf(),
        reason,
    };
    let dim = c.dim.max(1);
    for name in names {
        let mut norms = CenterNorms::new(dim);
        for offset in (0..len).step_by(STREAM_BLOCK) {
            let block = read(name, offset, STREAM_BLOCK.min(len - offset))?;
            if *name == "weight" {
                if let Some((row, largest)) = norms.push(offset, &block) {
                    let class = c.first_class + row as u64;
                    return Err(refuse(center_norm_reason(row, class, largest)));
                }
            } else if let Some(i) = block
                .iter()
                .position(|&v| !storable_as(name, v, c.bf16_state))
            {
                let at = offset + i;
                return Err(refuse(format!(
                    "{name} holds {:e} at row {}, column {}: past bf16's range, in which this \
                     layer keeps its optimizer state (StateDtype::Bf16)",
                    block[i],
                    at / dim,
                    at % dim
                )));
            }
        }
    }
    Ok(())
}

/// Which optimizer state a file holds, for error messages.
fn describe_states(file: &TensorFile) -> String {
    let held: Vec<&str> = set::STATE_GROUPS
        .iter()
        .flat_map(|g| g.iter())
        .copied()
        .filter(|n| file.shape(n).is_some())
        .collect();
    if held.is_empty() {
        "holds none".into()
    } else {
        format!("holds {held:?}")
    }
}

/// Which checkpoint a set is, as `load_resharded`'s ranks compare it: FNV-1a of what the files
/// record about their run and step, twice (the second salted), each folded to 24 bits (exact
/// in an agreement's f32 slot).
fn set_identity(set: &CheckpointSet) -> (u32, u32) {
    let recorded = format!(
        "{} {} {:?} {} {:?} {:?}",
        set.step(),
        set.optimizer_steps(),
        set.seed(),
        set.world_size(),
        set.state_names(),
        set.config()
    );
    (
        crate::layer::fnv1a_bits(&recorded, 24),
        crate::layer::fnv1a_bits(&format!("second {recorded}"), 24),
    )
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

    #[test]
    fn a_diverged_layer_writes_no_checkpoint_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rank0.safetensors");
        let mut layer =
            PartialFc::new(LayerConfig::new(100, 8, 4), CpuBackend, SingleRank).unwrap();
        layer.save(&path).unwrap();
        let before = std::fs::read(&path).unwrap();
        let x = crate::init::normal_rows(1, 0, 4, 8, 1.0);
        let labels = [1i64, 2, 3, 4];
        // A learning rate this large overflows the weights to infinity, then NaN.
        for _ in 0..4 {
            layer.forward_backward(&x, &labels).unwrap();
            layer.step(1e30).unwrap();
        }
        assert!(layer.weight().unwrap().iter().any(|v| !v.is_finite()));
        let err = layer.save(&path).unwrap_err();
        assert!(
            matches!(&err, PfcError::Checkpoint { reason, .. } if reason.contains("not written")),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the good file is kept"
        );
        let fresh = dir.path().join("fresh.safetensors");
        assert!(layer.save(&fresh).is_err());
        assert!(
            !fresh.exists(),
            "no file, not even a temporary one, is left"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
