//! One run's checkpoint files read as one classifier, whatever world size wrote them: resume on
//! another number of GPUs ([`PartialFc::load_resharded`](crate::PartialFc::load_resharded)),
//! rewrite the files for another world size ([`reshard`]), or merge them into one file (world
//! size 1) for evaluation or export.
//!
//! A run's files hold consecutive class ranges ([`Shard::of`]); a rank of the new world size
//! needs the rows of its own range, which lie in one or a few of the old files. Rows go
//! through the host a block (64 MiB) at a time (two blocks' worth of host memory at most), so
//! resharding a classifier of tens of gigabytes needs no host copy of it.

use super::FORMAT;
use crate::atomic_file::PendingFile;
use crate::error::{PfcError, Result};
use crate::shard::Shard;
use crate::tensor_file::{write_pending, OutTensor, TensorFile};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One file of the set: the shard it holds.
struct Part {
    file: TensorFile,
    rank: usize,
    shard: Shard,
}

/// The checkpoint files of one run (one file per rank, as [`PartialFc::save`] writes them),
/// checked to agree with each other: same classes, dimension, world size, step, sampler seed and
/// recorded configuration (margin, sampler, optimizer, update mode), each file's rows the shard
/// its rank holds, no rank twice. Two runs with the same configuration, seed and step cannot be
/// told apart by their files: give each run its own `LayerConfig::seed` (from the launcher's
/// run id or the clock) or its own folder. Each read checks that the
/// file is still the one opened (a save that replaced it meanwhile is an error, not a mix).
///
/// ```
/// use partial_fc::checkpoint::CheckpointSet;
/// use partial_fc::{collective::ThreadGroup, Collective, CpuBackend, LayerConfig, PartialFc};
/// let dir = tempfile::tempdir().unwrap();
/// let root = dir.path().to_path_buf();
/// ThreadGroup::run(3, move |comm| {
///     let path = root.join(format!("rank{}.safetensors", comm.rank()));
///     let layer = PartialFc::new(LayerConfig::new(100, 8, 4), CpuBackend, comm).unwrap();
///     layer.save(&path).unwrap();
/// });
/// let paths: Vec<_> = (0..3).map(|r| dir.path().join(format!("rank{r}.safetensors"))).collect();
/// let set = CheckpointSet::open(&paths).unwrap();
/// assert_eq!((set.num_classes(), set.dim(), set.world_size()), (100, 8, 3));
/// assert!(set.is_complete());
/// ```
///
/// [`PartialFc::save`]: crate::PartialFc::save
pub struct CheckpointSet {
    /// Sorted by rank (and so by class).
    parts: Vec<Part>,
    num_classes: u64,
    dim: usize,
    world_size: usize,
    step: u64,
    /// Optimizer updates applied (AdamW's t); `step` in files written before it was recorded.
    optimizer_steps: u64,
    /// The optimizer state tensors every file holds (one of [`STATE_GROUPS`], or none).
    states: &'static [&'static str],
    /// The run's sampler seed (`LayerConfig::seed`), absent from files written before it was
    /// recorded.
    seed: Option<u64>,
    /// The run's margin, sampler, optimizer and update mode ([`recorded_config`]), absent from
    /// files written before it was recorded.
    config: Option<String>,
}

/// What a checkpoint records of the layer's configuration beyond its shape: the margin, the
/// negative sampler, the optimizer and its hyper-parameters, the update mode. The files of one
/// save agree on it, so a set that mixes two runs which differ there (a folder of the random
/// sampler's run and one of the hard sampler's) is refused. Not the sample rate, which may differ
/// between the ranks of one run.
pub(crate) fn recorded_config(c: &crate::LayerConfig) -> String {
    format!(
        "margin {:?}; sampler {:?}; optimizer {:?}; update {:?}",
        c.margin, c.sampler, c.optimizer, c.update
    )
}

/// The optimizer state tensors a checkpoint may hold beside `weight`: SGD's momentum, or
/// AdamW's two moments ([`crate::Optimizer::state_names`]).
pub(crate) const STATE_GROUPS: [&[&str]; 2] = [&["momentum"], &["exp_avg", "exp_avg_sq"]];

/// The state group `file` holds: none, or exactly one of [`STATE_GROUPS`], each tensor an f32
/// of shape `rows`.
pub(crate) fn state_group(file: &TensorFile, rows: [usize; 2]) -> Result<&'static [&'static str]> {
    let path = file.path();
    let all = STATE_GROUPS.iter().flat_map(|g| g.iter()).copied();
    for name in std::iter::once("weight").chain(all.clone()) {
        match file.dtype(name) {
            Some("F32") | None => {}
            Some(other) => return Err(refuse(path, format!("{name} is {other}, F32 expected"))),
        }
        match file.shape(name) {
            Some(s) if s != rows => {
                return Err(refuse(
                    path,
                    format!("{name} has shape {s:?}, {rows:?} expected"),
                ))
            }
            _ => {}
        }
    }
    let held: Vec<&str> = all.filter(|n| file.shape(n).is_some()).collect();
    if held.is_empty() {
        return Ok(&[]);
    }
    STATE_GROUPS
        .iter()
        .copied()
        .find(|g| *g == held.as_slice())
        .ok_or_else(|| {
            refuse(
                path,
                format!(
                    "it holds optimizer state {held:?}, which is none of SGD's {:?} or AdamW's {:?}",
                    STATE_GROUPS[0], STATE_GROUPS[1]
                ),
            )
        })
}

fn refuse(path: &Path, reason: impl Into<String>) -> PfcError {
    PfcError::Checkpoint {
        path: path.to_path_buf(),
        reason: crate::tensor_file::printable(&reason.into()),
    }
}

/// How two recorded configurations (`recorded_config`: "margin …; sampler …; …") differ, naming
/// only the parts that do: "has sampler Hard { … } against Random".
fn config_difference(this: Option<&str>, first: Option<&str>) -> String {
    match (this, first) {
        (Some(a), Some(b)) => {
            let (pa, pb): (Vec<&str>, Vec<&str>) =
                (a.split("; ").collect(), b.split("; ").collect());
            if pa.len() != pb.len() {
                return format!("is {a} against {b}");
            }
            let differing: Vec<String> = pa
                .iter()
                .zip(&pb)
                .filter(|(x, y)| x != y)
                .map(|(x, y)| {
                    // "sampler Hard { .. }" against "sampler Random": the field named once.
                    match (x.split_once(' '), y.split_once(' ')) {
                        (Some((field, xv)), Some((f2, yv))) if field == f2 => {
                            format!("{field} {xv} against {yv}")
                        }
                        _ => format!("{x} against {y}"),
                    }
                })
                .collect();
            format!("has {}", differing.join("; "))
        }
        (a, b) => format!(
            "is {} against {}",
            a.unwrap_or("not recorded (an older build)"),
            b.unwrap_or("not recorded (an older build)")
        ),
    }
}

/// A required metadata entry of a checkpoint.
fn required<T: std::str::FromStr>(file: &TensorFile, key: &str) -> Result<T> {
    file.meta(key)?
        .ok_or_else(|| refuse(file.path(), format!("{key} is missing")))
}

impl CheckpointSet {
    /// Opens and checks the files (headers only: no tensor is read yet). Any subset of a run's
    /// files is a set; [`missing_ranks`](Self::missing_ranks) says which ranks it lacks.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<CheckpointSet> {
        let Some(first) = paths.first() else {
            return Err(PfcError::param(
                "paths",
                0,
                "give at least one checkpoint file",
            ));
        };
        let mut parts: Vec<Part> = Vec::with_capacity(paths.len());
        let mut set: Option<CheckpointSet> = None;
        for path in paths {
            let path = path.as_ref();
            let file = TensorFile::read(path)?;
            let format = file.metadata().get("format").map(String::as_str);
            if format != Some(FORMAT) {
                return Err(refuse(
                    path,
                    format!(
                        "format is {}, {FORMAT} expected (not a partial-fc checkpoint)",
                        format.unwrap_or("missing")
                    ),
                ));
            }
            let num_classes: u64 = required(&file, "num_classes")?;
            let world_size: usize = required(&file, "world_size")?;
            let rank: usize = required(&file, "rank")?;
            let shard = Shard {
                start: required(&file, "shard_start")?,
                len: required(&file, "shard_len")?,
            };
            let dim: usize = required(&file, "dim")?;
            let step: u64 = required(&file, "step")?;
            // Files from before the count was recorded: builds that took AdamW's t from the pass
            // counter, and SGD runs of one update per pass.
            let optimizer_steps: u64 = file.meta("optimizer_steps")?.unwrap_or(step);
            let seed: Option<u64> = file.meta("seed")?;
            let config: Option<String> = file.meta("config")?;
            if world_size == 0 || rank >= world_size || world_size as u64 > num_classes {
                return Err(refuse(
                    path,
                    format!("rank {rank} of world size {world_size} over {num_classes} classes"),
                ));
            }
            if dim == 0 {
                return Err(refuse(path, "dim is 0"));
            }
            if !addressable(num_classes, dim) {
                return Err(refuse(
                    path,
                    format!("{num_classes} classes × dim {dim} values cannot be addressed"),
                ));
            }
            // `load` refuses such a file (the counter could not advance): so do the set's readers,
            // rather than reshard or predict from it.
            if step == u64::MAX {
                return Err(refuse(
                    path,
                    "step is u64::MAX: the step counter could not advance",
                ));
            }
            if shard != Shard::of(num_classes, world_size, rank) {
                return Err(refuse(
                    path,
                    format!(
                        "it holds classes {}..{}, but rank {rank} of {world_size} holds {:?} of \
                         {num_classes} classes",
                        shard.start,
                        shard.end(),
                        Shard::of(num_classes, world_size, rank)
                    ),
                ));
            }
            let rows = [shard.len as usize, dim];
            let states = state_group(&file, rows)?;
            if file.shape("weight").is_none() {
                return Err(refuse(path, "weight is missing"));
            }
            match &set {
                None => {
                    set = Some(CheckpointSet {
                        parts: Vec::new(),
                        num_classes,
                        dim,
                        world_size,
                        step,
                        optimizer_steps,
                        states,
                        seed,
                        config,
                    })
                }
                Some(s) => {
                    let ours = (
                        num_classes,
                        dim,
                        world_size,
                        (step, optimizer_steps),
                        states,
                        seed,
                    );
                    let theirs = (
                        s.num_classes,
                        s.dim,
                        s.world_size,
                        (s.step, s.optimizer_steps),
                        s.states,
                        s.seed,
                    );
                    if ours != theirs {
                        type Run = (
                            u64,
                            usize,
                            usize,
                            (u64, u64),
                            &'static [&'static str],
                            Option<u64>,
                        );
                        let describe = |(c, d, k, (step, updates), m, seed): Run| {
                            format!(
                                "{c} classes, d = {d}, world size {k}, step {step}, {updates} \
                                 optimizer updates, {}, seed {}",
                                if m.is_empty() {
                                    "no optimizer state".to_string()
                                } else {
                                    format!("optimizer state {m:?}")
                                },
                                seed.map_or("not recorded".into(), |s| s.to_string())
                            )
                        };
                        // Only the update counts differ: one run whose ranks did not all update
                        // (a `step` or `discard_grad` on some ranks only), not two runs.
                        let (mut ours_same, mut theirs_same) = (ours, theirs);
                        ours_same.3 .1 = 0;
                        theirs_same.3 .1 = 0;
                        if ours_same == theirs_same {
                            return Err(refuse(
                                path,
                                format!(
                                    "its rank applied {} optimizer updates, {}'s {}: the ranks \
                                     of this run did not all update together (a step or \
                                     discard_grad on some ranks only), so their shards no \
                                     longer make one classifier",
                                    optimizer_steps,
                                    first.as_ref().display(),
                                    s.optimizer_steps
                                ),
                            ));
                        }
                        return Err(refuse(
                            path,
                            format!(
                                "it is not of the same run as {}: {} against {}",
                                first.as_ref().display(),
                                describe(ours),
                                describe(theirs)
                            ),
                        ));
                    }
                    if config != s.config {
                        return Err(refuse(
                            path,
                            format!(
                                "it is not of the same run as {}: its configuration {}",
                                first.as_ref().display(),
                                config_difference(config.as_deref(), s.config.as_deref())
                            ),
                        ));
                    }
                }
            }
            if let Some(other) = parts.iter().find(|p| p.rank == rank) {
                return Err(refuse(
                    path,
                    format!(
                        "rank {rank} is also given as {}",
                        other.file.path().display()
                    ),
                ));
            }
            parts.push(Part { file, rank, shard });
        }
        parts.sort_by_key(|p| p.rank);
        let mut set = set.expect("at least one path was read");
        set.parts = parts;
        Ok(set)
    }

    /// Number of classes of the classifier.
    pub fn num_classes(&self) -> u64 {
        self.num_classes
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// World size of the run that wrote the files.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Optimizer steps taken when the files were written.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The run's sampler seed (`LayerConfig::seed`), `None` in files written before it was
    /// recorded.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The margin, negative sampler, optimizer and update mode of the run that wrote the files,
    /// as text (`None` in files written before it was recorded). The files of a set agree on
    /// it; [`PartialFc::load_resharded`](crate::PartialFc::load_resharded) does not compare it
    /// with the loading layer's, which may change them on resume.
    pub fn config(&self) -> Option<&str> {
        self.config.as_deref()
    }

    /// Optimizer updates applied when the files were written (AdamW's t; the step counter in
    /// files written before it was recorded, whose builds counted t that way).
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer_steps
    }

    /// Whether the files hold SGD's momentum.
    pub fn has_momentum(&self) -> bool {
        self.states == ["momentum"]
    }

    /// The optimizer state tensors the files hold beside the weights: `["momentum"]` (SGD),
    /// `["exp_avg", "exp_avg_sq"]` (AdamW) or none.
    pub fn state_names(&self) -> &'static [&'static str] {
        self.states
    }

    /// The ranks of the writing run that no given file holds, in order (lazily: a crafted
    /// world size may be huge).
    pub fn missing_ranks(&self) -> impl Iterator<Item = usize> + '_ {
        self.parts
            .iter()
            .map(|p| p.rank)
            .chain(std::iter::once(self.world_size))
            .scan(0usize, |next, rank| {
                let gap = *next..rank;
                *next = rank + 1;
                Some(gap)
            })
            .flatten()
    }

    /// Whether every rank of the writing run has its file in the set.
    pub fn is_complete(&self) -> bool {
        self.parts.len() == self.world_size
    }

    /// Checks that every rank of the run has its file in the set, naming (up to 8 of) those
    /// that have none: what [`is_complete`](Self::is_complete) answers, as an error to pass on.
    ///
    /// # Errors
    ///
    /// [`PfcError::Checkpoint`](crate::PfcError::Checkpoint) naming the missing ranks.
    pub fn require_complete(&self) -> Result<()> {
        if self.is_complete() {
            return Ok(());
        }
        let missing = self.world_size - self.parts.len();
        let shown: Vec<String> = self
            .missing_ranks()
            .take(8)
            .map(|r| r.to_string())
            .collect();
        Err(refuse(
            self.parts[0].file.path(),
            format!(
                "the run had {} ranks; no file is given for rank{} {}{}",
                self.world_size,
                if missing > 1 { "s" } else { "" },
                shown.join(", "),
                if missing > 8 { ", ..." } else { "" }
            ),
        ))
    }

    /// Checks that the files hold every class of `range`, naming the first class none holds.
    pub(crate) fn require(&self, range: Shard) -> Result<()> {
        let mut next = range.start;
        for p in &self.parts {
            if p.shard.start <= next && next < p.shard.end() {
                next = p.shard.end();
            }
        }
        if next < range.end() {
            let rank = Shard::rank_of(self.num_classes, self.world_size, next).unwrap_or(0);
            return Err(refuse(
                self.parts[0].file.path(),
                format!(
                    "rank {rank}'s file of the run's {} is not among the {} given files (this \
                     is one of them); it holds class {next}, needed for classes {}..{}",
                    self.world_size,
                    self.parts.len(),
                    range.start,
                    range.end()
                ),
            ));
        }
        Ok(())
    }

    /// Values `offset .. offset + len` (row-major) of tensor `name` (`weight` or a state)
    /// over the classes from `first_class` on, gathered from the files that hold them. A value
    /// that is not finite is an error naming the file, row and column.
    pub(crate) fn read(
        &self,
        name: &str,
        first_class: u64,
        offset: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        let dim = self.dim as u64;
        let mut at = first_class * dim + offset as u64;
        let end = at + len as u64;
        let mut values = Vec::with_capacity(len);
        for p in &self.parts {
            let (lo, hi) = (p.shard.start * dim, p.shard.end() * dim);
            if at >= end || hi <= at || lo >= end {
                continue;
            }
            if lo > at {
                break; // a gap: `require` names it
            }
            let n = (hi.min(end) - at) as usize;
            let local = (at - lo) as usize;
            let block = p.file.f32_block(name, local, n)?;
            let bad = |x: &f32| !crate::layer::storable(name, *x);
            if let Some(i) = block.iter().position(bad) {
                let e = local as u64 + i as u64;
                return Err(refuse(
                    p.file.path(),
                    format!(
                        "{name} holds {} at class {}, column {}",
                        block[i],
                        p.shard.start + e / dim.max(1),
                        e % dim.max(1)
                    ),
                ));
            }
            values.extend_from_slice(&block);
            at += n as u64;
        }
        if at < end {
            self.require(Shard {
                start: at / dim.max(1),
                len: 1,
            })?;
        }
        Ok(values)
    }

    /// Writes the checkpoint that rank `rank` of a run of `world_size` ranks would have saved
    /// at this step, atomically. `progress` is called with the number of values after each
    /// block.
    pub fn write_shard(
        &self,
        world_size: usize,
        rank: usize,
        path: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        self.write_grown_shard(world_size, self.num_classes, rank, path, progress)
    }

    /// Like [`write_shard`](Self::write_shard), for a classifier of `num_classes` classes, at
    /// least the run's: the run's classes keep their weights and optimizer state, and each new
    /// class `c` (ids from the run's class count on) gets the weights a fresh layer of the
    /// run's seed gives class `c` (N(0, 0.01) keyed by seed and class id, as
    /// [`PartialFc::new`](crate::PartialFc::new) draws them) and zero optimizer state. So a
    /// classifier grows when a dataset adds identities or labels (appended after the old ids),
    /// without losing what was trained. Under AdamW the bias correction counts the run's
    /// updates, so a new class's first steps are not damped as a fresh run's are: see
    /// docs/distributed.md ("Growing the classifier") for a lower first learning rate.
    ///
    /// # Errors
    ///
    /// Those of `write_shard`; [`PfcError::Param`] for `num_classes` below the run's, one whose
    /// values cannot be addressed, or files that do not record the run's seed (an older build's,
    /// or written by hand) when classes are added.
    pub fn write_grown_shard(
        &self,
        world_size: usize,
        num_classes: u64,
        rank: usize,
        path: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        self.pending_grown_shard(world_size, num_classes, rank, path, progress)?
            .commit()
    }

    /// [`write_grown_shard`](Self::write_grown_shard) up to the rename: the file is written
    /// under a temporary name beside `path`, and takes its name when committed.
    fn pending_grown_shard(
        &self,
        world_size: usize,
        num_classes: u64,
        rank: usize,
        path: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<PendingFile> {
        let seed = self.check_growth(num_classes)?;
        check_world_size(num_classes, world_size)?;
        if rank >= world_size {
            return Err(PfcError::param(
                "rank",
                rank,
                format!("must be < world size {world_size}"),
            ));
        }
        let shard = Shard::of(num_classes, world_size, rank);
        // The run's classes in this shard come from the files; the rest are new.
        let old_end = shard.end().min(self.num_classes);
        if old_end > shard.start {
            self.require(Shard {
                start: shard.start,
                len: old_end - shard.start,
            })?;
        }
        let shape = vec![shard.len as usize, self.dim];
        let values = |name: &'static str, offset: usize, len: usize| -> Result<Vec<f32>> {
            let v = self.read_or_new(name, seed, shard.start, offset, len)?;
            progress(len as u64);
            Ok(v)
        };
        let weight = |offset, len| values("weight", offset, len);
        let states: Vec<_> = self
            .states
            .iter()
            .map(|&name| move |offset, len| values(name, offset, len))
            .collect();
        let mut tensors = vec![OutTensor::F32Blocks("weight", shape.clone(), &weight)];
        for (name, read) in self.states.iter().zip(&states) {
            tensors.push(OutTensor::F32Blocks(name, shape.clone(), read));
        }
        let meta = metadata(
            num_classes,
            world_size,
            rank,
            shard,
            self.dim,
            self.step,
            self.optimizer_steps,
            self.seed,
            self.config.as_deref(),
        );
        write_pending(path, &tensors, meta)
    }

    /// Values a whole rewrite for any world size reads: weights and optimizer state of every
    /// class.
    pub fn total_values(&self) -> u64 {
        self.total_values_grown(self.num_classes)
    }

    /// Values a whole rewrite for a classifier grown to `num_classes` classes reads or draws
    /// ([`reshard_grown`]).
    pub fn total_values_grown(&self, num_classes: u64) -> u64 {
        let tensors = 1 + self.states.len() as u64;
        tensors
            .saturating_mul(num_classes)
            .saturating_mul(self.dim as u64)
    }

    /// Gives files that do not record the run's seed (hand-written, imported from PyTorch, or
    /// an older build's) the one it used (`LayerConfig::seed`), so that the classifier can be
    /// grown ([`write_grown_shard`](Self::write_grown_shard)): the new classes' weights are
    /// drawn from it, and the written files record it. Files that record a seed keep theirs.
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] when the files record another seed: growing with a seed other than
    /// the run's would give the new classes other weights than a layer of that run draws.
    pub fn assume_seed(&mut self, seed: u64) -> Result<()> {
        match self.seed {
            Some(recorded) if recorded != seed => Err(PfcError::param(
                "seed",
                seed,
                format!("the files record the run's seed {recorded}: leave the seed out"),
            )),
            _ => {
                self.seed = Some(seed);
                Ok(())
            }
        }
    }

    /// Checks a class count to grow the run's classifier to, and returns the seed the new
    /// classes' weights are drawn from (`None` when no class is added).
    fn check_growth(&self, num_classes: u64) -> Result<Option<u64>> {
        if num_classes < self.num_classes {
            return Err(PfcError::param(
                "num_classes",
                num_classes,
                format!(
                    "the files hold {} classes: a classifier can grow, not shrink (dropping \
                     classes would renumber the labels after them)",
                    self.num_classes
                ),
            ));
        }
        if !addressable(num_classes, self.dim) {
            return Err(PfcError::param(
                "num_classes",
                num_classes,
                format!(
                    "{num_classes} classes × dim {} values cannot be addressed",
                    self.dim
                ),
            ));
        }
        if num_classes == self.num_classes {
            return Ok(None);
        }
        self.seed.map(Some).ok_or_else(|| {
            PfcError::param(
                "num_classes",
                num_classes,
                "the files do not record the run's `seed` metadata (written by hand, e.g. \
                 imported from PyTorch, or by an older build), which the new classes' weights \
                 are drawn from: give it (CheckpointSet::assume_seed, `pfc reshard --seed`; \
                 the run's LayerConfig::seed, 24301 unless the run chose another) or add a \
                 `seed` entry to every file's metadata",
            )
        })
    }

    /// Like [`read`](Self::read), for a classifier grown past the run's classes: values of
    /// classes from `num_classes` on are a fresh layer's (the weights drawn from `seed` as
    /// `PartialFc::new` draws them, optimizer state zero).
    fn read_or_new(
        &self,
        name: &str,
        seed: Option<u64>,
        first_class: u64,
        offset: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        let dim = self.dim as u64;
        let start = first_class * dim + offset as u64;
        let old_values = self.num_classes * dim;
        let from_files = old_values.saturating_sub(start).min(len as u64) as usize;
        let mut values = if from_files > 0 {
            self.read(name, first_class, offset, from_files)?
        } else {
            Vec::with_capacity(len)
        };
        let fresh = len - from_files;
        if fresh > 0 {
            let at = start + from_files as u64;
            match (name, seed) {
                ("weight", Some(seed)) => {
                    // Whole rows are drawn; the block may begin and end inside one.
                    let (row, skip) = (at / dim, (at % dim) as usize);
                    let rows = (skip + fresh).div_ceil(self.dim);
                    let drawn =
                        crate::init::normal_rows(seed, row, rows, self.dim, crate::init::INIT_STD);
                    values.extend_from_slice(&drawn[skip..skip + fresh]);
                }
                ("weight", None) => {
                    return Err(PfcError::Shape(format!(
                        "class {} is past the run's {} classes and no seed was given",
                        at / dim,
                        self.num_classes
                    )))
                }
                _ => values.resize(len, 0.0),
            }
        }
        Ok(values)
    }
}

/// Whether `num_classes × dim` values can be addressed, on this machine too: every class's values
/// are addressed by class × dim, so no shard of a classifier beyond it could be read.
fn addressable(num_classes: u64, dim: usize) -> bool {
    num_classes
        .checked_mul(dim as u64)
        .is_some_and(|values| usize::try_from(values).is_ok())
}

/// Checks that `num_classes` can be split over `world_size` ranks as the layer splits them.
/// The most files one reshard writes: a set of a million ranks is past any cluster this crate
/// knows of, and a larger `world_size` (a typo: `--world-size 1000000000`) would first try to
/// allocate the list of its output names (24 bytes each) and abort the process.
pub const MAX_RESHARD_WORLD: usize = 1 << 20;

fn check_world_size(num_classes: u64, world_size: usize) -> Result<()> {
    if world_size > MAX_RESHARD_WORLD {
        return Err(PfcError::param(
            "world_size",
            world_size,
            format!("a reshard writes at most {MAX_RESHARD_WORLD} files"),
        ));
    }
    if world_size == 0 || world_size as u64 > num_classes {
        return Err(PfcError::param(
            "world_size",
            world_size,
            format!("must be between 1 and the number of classes ({num_classes})"),
        ));
    }
    if num_classes.div_ceil(world_size as u64) > i32::MAX as u64 {
        return Err(PfcError::param(
            "world_size",
            world_size,
            "a shard may hold at most 2^31 - 1 classes: use more ranks",
        ));
    }
    Ok(())
}

/// The metadata a checkpoint of `shard` carries (what [`PartialFc::load`] checks).
///
/// [`PartialFc::load`]: crate::PartialFc::load
#[allow(clippy::too_many_arguments)]
pub(crate) fn metadata(
    num_classes: u64,
    world_size: usize,
    rank: usize,
    shard: Shard,
    dim: usize,
    step: u64,
    optimizer_steps: u64,
    seed: Option<u64>,
    config: Option<&str>,
) -> HashMap<String, String> {
    let mut meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("num_classes", num_classes.to_string()),
        ("world_size", world_size.to_string()),
        ("rank", rank.to_string()),
        ("shard_start", shard.start.to_string()),
        ("shard_len", shard.len.to_string()),
        ("dim", dim.to_string()),
        ("step", step.to_string()),
        ("optimizer_steps", optimizer_steps.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(seed) = seed {
        meta.insert("seed".into(), seed.to_string());
    }
    if let Some(config) = config {
        meta.insert("config".into(), config.to_string());
    }
    meta
}

/// The file name [`reshard`] gives rank `rank` of `world_size`.
pub fn shard_file_name(world_size: usize, rank: usize) -> String {
    format!("rank{rank}-of-{world_size}.safetensors")
}

/// Makes `out_dir` if missing, refusing a path that is a file and a folder whose parent does
/// not exist (a mistyped path should fail, not grow a tree of folders). Returns whether it made
/// the folder.
fn prepare_out_dir(out_dir: &Path) -> Result<bool> {
    let refuse_dir = |reason: String| PfcError::param("out_dir", out_dir.display(), reason);
    if out_dir.is_dir() {
        return Ok(false);
    }
    if out_dir.exists() {
        return Err(refuse_dir("is a file; the new files need a folder".into()));
    }
    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(refuse_dir(format!(
            "its parent folder {} does not exist",
            parent.display()
        )));
    }
    std::fs::create_dir(out_dir).map_err(|source| PfcError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    Ok(true)
}

/// An error in writing or renaming one rank's file, as a checkpoint error that names the output
/// and says `reason` (which rank, and what of it failed).
fn of_rank(path: &Path, e: PfcError, reason: impl FnOnce(&PfcError) -> String) -> PfcError {
    match e {
        PfcError::Io { .. } | PfcError::Format { .. } | PfcError::Checkpoint { .. } => {
            refuse(path, reason(&e))
        }
        other => other,
    }
}

/// Writes rank `r`'s file of `world_size` to `outputs[r]`, for every rank, all or none: each
/// file is written and flushed to the disk under a temporary name beside its output first, and
/// only once every rank's is do they take their names, one rename each. An error while writing
/// (a value that is not finite in an input, a full disk) removes the temporary files written so
/// far and leaves every output name as it was. The renames are not one transaction: should one
/// fail (an error of the file system between two renames; an output name that is not a regular file is refused while writing, before any), the ranks before it already have their new
/// files, and the error says so; the temporary files of it and the ranks after it are removed.
fn write_all_ranks(
    set: &CheckpointSet,
    world_size: usize,
    num_classes: u64,
    outputs: &[PathBuf],
    progress: &dyn Fn(u64),
) -> Result<()> {
    // Dropped on an error, the files written so far are removed.
    let mut pending = Vec::with_capacity(outputs.len());
    for (rank, path) in outputs.iter().enumerate() {
        let file = set
            .pending_grown_shard(world_size, num_classes, rank, path, progress)
            .map_err(|e| {
                of_rank(path, e, |e| {
                    format!("writing rank {rank} of {world_size}: {e}")
                })
            })?;
        pending.push(file);
    }
    for (rank, (file, path)) in pending.into_iter().zip(outputs).enumerate() {
        file.commit().map_err(|e| {
            of_rank(path, e, |e| {
                let before = match rank {
                    0 => "no output was replaced".to_string(),
                    1 => "rank 0's output is already the new file".to_string(),
                    _ => format!(
                        "ranks 0 to {}'s outputs are already the new files",
                        rank - 1
                    ),
                };
                format!("renaming rank {rank} of {world_size} into place: {e} ({before})")
            })
        })?;
    }
    Ok(())
}

/// Rewrites a run's checkpoint files (`paths`: every rank's) for `world_size` ranks, into
/// `out_dir` as [`shard_file_name`]s, and returns their paths in rank order. World size 1
/// merges the classifier into one file. The files are written as a set, all or none: each to a
/// temporary file beside its name, and only once every rank's is complete and flushed to the
/// disk are they renamed into place. Should a rank fail (a value that is not finite in the
/// inputs, a full disk), the error says which, and `out_dir` is left as it was: no new file
/// (a folder made for them is removed), every old file of an output's name intact. The renames
/// are one per file, not a transaction: should one fail, the ranks before it have their new
/// files, as the error says. The temporary files of all ranks are on the disk at once, beside
/// the old files they replace. An output path that is one of the inputs is refused before
/// anything is written; another file of an output's name is replaced (`pfc reshard` refuses
/// that unless given `--force`). `progress` gets the number of values after each block (of
/// [`CheckpointSet::total_values`] in all). `out_dir` is created if missing; its parent must
/// exist.
///
/// ```
/// use partial_fc::checkpoint::{reshard, CheckpointSet};
/// use partial_fc::{collective::ThreadGroup, Collective, CpuBackend, LayerConfig, PartialFc};
/// let dir = tempfile::tempdir().unwrap();
/// let root = dir.path().to_path_buf();
/// let saved = ThreadGroup::run(2, move |comm| {
///     let path = root.join(format!("old{}.safetensors", comm.rank()));
///     let layer = PartialFc::new(LayerConfig::new(10, 4, 2), CpuBackend, comm).unwrap();
///     layer.save(&path).unwrap();
///     (path, layer.weight().unwrap())
/// });
/// let paths: Vec<_> = saved.iter().map(|(p, _)| p.clone()).collect();
/// let merged = reshard(&paths, 1, &dir.path().join("merged"), &|_| {}).unwrap();
/// let one = CheckpointSet::open(&merged).unwrap();
/// assert_eq!((one.world_size(), one.num_classes()), (1, 10));
/// ```
pub fn reshard<P: AsRef<Path>>(
    paths: &[P],
    world_size: usize,
    out_dir: &Path,
    progress: &dyn Fn(u64),
) -> Result<Vec<PathBuf>> {
    reshard_grown(paths, world_size, None, None, out_dir, progress)
}

/// Like [`reshard`], for a classifier grown to `num_classes` classes (`None`: the run's):
/// each new class, with an id from the run's class count on, starts as a fresh layer's
/// (see [`CheckpointSet::write_grown_shard`]), the run's classes keep their weights and
/// optimizer state. `seed`: the run's `LayerConfig::seed`, which the new classes' weights are
/// drawn from, for files that do not record it (hand-written or imported ones,
/// [`CheckpointSet::assume_seed`]); `None` takes the files' own. `progress` then counts the new classes' values too (of
/// [`CheckpointSet::total_values_grown`] in all). The new files load with
/// [`PartialFc::load_resharded`](crate::PartialFc::load_resharded) into a layer of
/// `num_classes` classes.
///
/// ```
/// use partial_fc::checkpoint::{reshard_grown, CheckpointSet};
/// use partial_fc::{collective::SingleRank, CpuBackend, LayerConfig, PartialFc};
/// let dir = tempfile::tempdir().unwrap();
/// let old = dir.path().join("old.safetensors");
/// PartialFc::new(LayerConfig::new(10, 4, 2), CpuBackend, SingleRank).unwrap().save(&old).unwrap();
/// let grown =
///     reshard_grown(&[&old], 2, Some(15), None, &dir.path().join("grown"), &|_| {}).unwrap();
/// let mut layer = PartialFc::new(LayerConfig::new(15, 4, 2), CpuBackend, SingleRank).unwrap();
/// layer.load_resharded(&grown).unwrap(); // classes 0..10 trained, 10..15 new
/// ```
///
/// # Errors
///
/// Those of [`reshard`], of [`CheckpointSet::assume_seed`] and of
/// [`CheckpointSet::write_grown_shard`].
pub fn reshard_grown<P: AsRef<Path>>(
    paths: &[P],
    world_size: usize,
    num_classes: Option<u64>,
    seed: Option<u64>,
    out_dir: &Path,
    progress: &dyn Fn(u64),
) -> Result<Vec<PathBuf>> {
    let mut set = CheckpointSet::open(paths)?;
    if let Some(seed) = seed {
        set.assume_seed(seed)?;
    }
    let num_classes = num_classes.unwrap_or(set.num_classes);
    set.check_growth(num_classes)?;
    check_world_size(num_classes, world_size)?;
    set.require_complete()?;
    let outputs: Vec<PathBuf> = (0..world_size)
        .map(|r| out_dir.join(shard_file_name(world_size, r)))
        .collect();
    // An output never replaces an input: the run's own files would be gone once renamed over.
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    for input in paths {
        let input = canonical(input.as_ref());
        if let Some(out) = outputs
            .iter()
            .find(|o| canonical(o) == input && input.is_some())
        {
            return Err(PfcError::param(
                "out_dir",
                out_dir.display(),
                format!(
                    "{} is one of the input files: write the new files elsewhere",
                    out.display()
                ),
            ));
        }
    }
    let created = prepare_out_dir(out_dir)?;
    let written = write_all_ranks(&set, world_size, num_classes, &outputs, progress);
    if written.is_err() && created {
        // Removed only if empty (a rename that failed midway leaves the ranks before it).
        let _ = std::fs::remove_dir(out_dir);
    }
    written.map(|()| outputs)
}
