//! Step files: one forward/backward pass described by a safetensors file (inputs, parameters in
//! the metadata, and optionally the expected outputs), as produced by the published PyTorch
//! implementation for parity tests, and as read and written by `pfc step`.
//!
//! Tensors: `embeddings` `[B, d]` f32, `labels` `[B]` i64, `weight` `[C, d]` f32, optionally
//! `sampled_index` `[S]` i64 (sorted global ids; used instead of drawing a sample). Outputs:
//! `loss` `[1]`, `grad_embeddings` `[B, d]`, `grad_weight` `[C, d]` (dense, zero outside the sample),
//! `sampled_index` `[S]`. Metadata: scale, m1, m2, m3, sample_rate, interclass_filter, grad_mode
//! ("straight-through" or "exact"), classes.

use crate::backend::{Backend, Collective};
use crate::collective::{HostStaged, ThreadGroup};
use crate::config::{GradMode, LayerConfig, Margin};
use crate::cpu::CpuBackend;
use crate::error::{PfcError, Result};
use crate::layer::PartialFc;
use crate::shard::Shard;
use crate::tensor_file::{write_atomic, OutTensor, TensorFile};
use std::collections::HashMap;
use std::path::Path;

/// The inputs and parameters of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCase {
    /// `[B, d]` embeddings, row-major.
    pub embeddings: Vec<f32>,
    /// `[B]` global labels.
    pub labels: Vec<i64>,
    /// `[C, d]` class centers.
    pub weight: Vec<f32>,
    /// Embedding dimension d.
    pub dim: usize,
    /// Number of classes C.
    pub num_classes: u64,
    /// The sample to use (sorted global ids), when given.
    pub sampled_index: Option<Vec<i64>>,
    /// Sample rate r.
    pub sample_rate: f64,
    /// Margin and its options.
    pub margin: Margin,
    /// Seed of the sampler when the sample is drawn.
    pub seed: u64,
}

/// The outputs of one step, gathered over all ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// Mean loss over the batch.
    pub loss: f32,
    /// `[B, d]` gradient of the loss with respect to the embeddings.
    pub grad_embeddings: Vec<f32>,
    /// `[C, d]` gradient with respect to the class centers, zero outside the sample.
    pub grad_weight: Vec<f32>,
    /// Sorted global ids of the sampled classes.
    pub sampled_index: Vec<i64>,
}

fn bad(file: &TensorFile, reason: String) -> PfcError {
    PfcError::Format {
        path: file.path().to_path_buf(),
        // The reasons quote the file's metadata (a grad_mode of any length).
        reason: crate::tensor_file::printable(&reason),
    }
}

impl StepCase {
    /// Reads the inputs and parameters of a step file.
    pub fn read(path: &Path) -> Result<StepCase> {
        let file = TensorFile::read(path)?;
        let (embeddings, eshape) = file.require("embeddings", file.f32("embeddings"))?;
        let (labels, lshape) = file.require("labels", file.i64("labels"))?;
        let (weight, wshape) = file.require("weight", file.f32("weight"))?;
        if eshape.len() != 2 || lshape != [eshape[0]] || wshape.len() != 2 || wshape[1] != eshape[1]
        {
            return Err(bad(
                &file,
                format!("shapes embeddings {eshape:?}, labels {lshape:?}, weight {wshape:?} do not agree"),
            ));
        }
        let sampled_index = match file.i64("sampled_index")? {
            Some((v, shape)) if shape.len() == 1 => Some(v),
            Some((_, shape)) => {
                return Err(bad(
                    &file,
                    format!("sampled_index has shape {shape:?}: a list of class ids is expected"),
                ))
            }
            None => None,
        };
        let classes: u64 = file.meta("classes")?.unwrap_or(wshape[0] as u64);
        if classes != wshape[0] as u64 {
            return Err(bad(
                &file,
                format!(
                    "metadata classes = {classes} but weight has {} rows",
                    wshape[0]
                ),
            ));
        }
        let grad_mode = match file.metadata().get("grad_mode").map(String::as_str) {
            None | Some("straight-through") => GradMode::StraightThrough,
            Some("exact") => GradMode::Exact,
            Some(other) => return Err(bad(&file, format!("unknown grad_mode {other:?}"))),
        };
        let mut margin = Margin::combined(
            file.meta("scale")?.unwrap_or(64.0),
            file.meta("m1")?.unwrap_or(1.0),
            file.meta("m2")?.unwrap_or(0.5),
            file.meta("m3")?.unwrap_or(0.0),
        );
        margin.grad_mode = grad_mode;
        // As the flag: a threshold <= 0 disables the filter, NaN is refused (it compared false
        // with everything and disabled the filter silently).
        let filter = file.meta::<f64>("interclass_filter")?;
        if filter.is_some_and(f64::is_nan) {
            return Err(bad(
                &file,
                "interclass_filter = NaN is not a threshold (give 0 to disable the filter)".into(),
            ));
        }
        margin.interclass_filter = filter.filter(|t| *t > 0.0);
        Ok(StepCase {
            dim: eshape[1],
            embeddings,
            labels,
            weight,
            num_classes: classes,
            sampled_index,
            sample_rate: file.meta("sample_rate")?.unwrap_or(1.0),
            margin,
            seed: file.meta("seed")?.unwrap_or(0x5eed),
        })
    }

    /// Checks that the fields agree (they are public and may be built by hand).
    pub fn validate(&self) -> Result<()> {
        let (b, d, c) = (self.batch(), self.dim, self.num_classes as usize);
        if d == 0 || b == 0 || c == 0 {
            return Err(PfcError::Shape(format!(
                "a step needs a batch, a dimension and classes (batch {b}, dim {d}, classes {c})"
            )));
        }
        if self.embeddings.len() != b.saturating_mul(d) || self.weight.len() != c.saturating_mul(d)
        {
            return Err(PfcError::Shape(format!(
                "embeddings hold {} values and weight {}, but batch {b}, classes {c} and dim {d} \
                 need {} and {}",
                self.embeddings.len(),
                self.weight.len(),
                b.saturating_mul(d),
                c.saturating_mul(d)
            )));
        }
        Ok(())
    }

    /// Batch size B.
    pub fn batch(&self) -> usize {
        self.labels.len()
    }

    /// The layer configuration of one rank of `world_size`.
    pub fn layer_config(&self, world_size: usize) -> Result<LayerConfig> {
        self.validate()?;
        let b = self.batch();
        if world_size == 0 || world_size > b {
            return Err(PfcError::param(
                "world_size",
                world_size,
                format!("must lie in [1, batch = {b}]"),
            ));
        }
        let mut cfg = LayerConfig::new(self.num_classes, self.dim, b.div_ceil(world_size));
        cfg.sample_rate = self.sample_rate;
        cfg.margin = self.margin;
        cfg.optimizer = None;
        cfg.seed = self.seed;
        Ok(cfg)
    }

    /// Runs this rank's part of the step on any backend and collective: the rows are split over
    /// ranks as the classes are (`B/k` consecutive rows, one more for the first `B mod k` ranks),
    /// and the rank takes the shard of classes the published split gives it. Returns the
    /// loss, the rank's embedding gradient rows, its dense shard gradient and its sample.
    pub fn run_rank<B: Backend, C: Collective<B>>(
        &self,
        backend: B,
        comm: C,
    ) -> Result<RankResult> {
        let world = comm.world_size();
        let rank = comm.rank();
        let mut cfg = self.layer_config(world)?;
        let d = self.dim;
        let rows = Shard::of(self.batch() as u64, world, rank);
        let (r0, r1) = (rows.start as usize, rows.end() as usize);
        let shard = Shard::of(self.num_classes, world, rank);
        // The file's (or the command line's) rate is checked before a given sample may raise
        // it: `max` would otherwise turn a NaN into the sample's own rate.
        cfg.validate(world)?;
        if let Some(index) = &self.sampled_index {
            // A given sample need not split over the shards as the layer's own sampler would:
            // size this rank's buffers for its part of it.
            let here = index.iter().filter(|&&c| shard.contains(c)).count() as f64;
            let rate = ((here + 0.5) / shard.len as f64).min(1.0);
            cfg.sample_rate = cfg.sample_rate.max(rate);
        }
        let mut layer = PartialFc::zeroed(cfg, backend, comm)?;
        let rows = shard.start as usize * d..shard.end() as usize * d;
        layer.set_weight(&self.weight[rows])?;
        let x = &self.embeddings[r0 * d..r1 * d];
        let labels = &self.labels[r0..r1];
        let out = match &self.sampled_index {
            Some(index) => layer.forward_backward_with_sample(x, labels, index)?,
            None => layer.forward_backward(x, labels)?,
        };
        Ok(RankResult {
            loss: out.loss,
            grad_embeddings: out.grad_embeddings,
            grad_weight: layer.weight_grad_dense()?,
            sampled_index: layer.sampled_classes()?,
        })
    }

    /// Runs the step on the CPU with `world_size` ranks as threads and gathers the outputs.
    pub fn run_threads(&self, world_size: usize) -> Result<StepResult> {
        check_thread_ranks(world_size)?;
        self.layer_config(world_size)?;
        gather(ThreadGroup::run(world_size, |comm| {
            self.run_rank(CpuBackend, comm)
        }))
    }

    /// Runs the step on any backend with `world_size` virtual ranks: each rank a thread with its
    /// own backend from `make` (say, `CudaBackend::new(0)`: k shards on one device), talking
    /// through a host-staged thread group.
    pub fn run_virtual_ranks<B: Backend>(
        &self,
        world_size: usize,
        make: impl Fn() -> Result<B> + Sync,
    ) -> Result<StepResult> {
        check_thread_ranks(world_size)?;
        self.layer_config(world_size)?;
        gather(ThreadGroup::run(world_size, |comm| {
            self.run_rank(make()?, HostStaged::new(comm))
        }))
    }
}

/// Most ranks [`StepCase::run_threads`] and [`StepCase::run_virtual_ranks`] run, a thread
/// each: thousands of threads, each with its buffers and all of them in every collective, take
/// minutes for one step (a typo more likely than a plan; real world sizes run one process each).
pub const MAX_THREAD_RANKS: usize = 256;

fn check_thread_ranks(world_size: usize) -> Result<()> {
    if world_size > MAX_THREAD_RANKS {
        return Err(PfcError::param(
            "world_size",
            world_size,
            format!("at most {MAX_THREAD_RANKS} ranks run as threads of one process"),
        ));
    }
    Ok(())
}

/// Concatenates the ranks' parts in rank order; reports the rank whose input was at fault rather
/// than its peers' "rank r rejected".
fn gather(parts: Vec<Result<RankResult>>) -> Result<StepResult> {
    if let Some(i) = parts
        .iter()
        .position(|p| matches!(p, Err(e) if !matches!(e, PfcError::Collective(_))))
        .or_else(|| parts.iter().position(|p| p.is_err()))
    {
        return Err(parts
            .into_iter()
            .nth(i)
            .and_then(|p| p.err())
            .expect("an error"));
    }
    let mut result = StepResult {
        loss: 0.0,
        grad_embeddings: Vec::new(),
        grad_weight: Vec::new(),
        sampled_index: Vec::new(),
    };
    for (rank, part) in parts.into_iter().enumerate() {
        let part = part?;
        if rank == 0 {
            result.loss = part.loss;
        }
        result.grad_embeddings.extend(part.grad_embeddings);
        result.grad_weight.extend(part.grad_weight);
        result.sampled_index.extend(part.sampled_index);
    }
    Ok(result)
}

/// One rank's part of a step's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct RankResult {
    /// Mean loss over the whole batch.
    pub loss: f32,
    /// Gradient of the rank's own embedding rows.
    pub grad_embeddings: Vec<f32>,
    /// Dense gradient of the rank's shard, zero outside its sample.
    pub grad_weight: Vec<f32>,
    /// The rank's sorted sampled global class ids.
    pub sampled_index: Vec<i64>,
}

/// Expected outputs stored in a step file (golden files hold them).
pub fn read_expected(path: &Path) -> Result<StepResult> {
    let file = TensorFile::read(path)?;
    let (loss, _) = file.require("loss", file.f32("loss"))?;
    Ok(StepResult {
        loss: *loss
            .first()
            .ok_or_else(|| bad(&file, "loss is empty".into()))?,
        grad_embeddings: file
            .require("grad_embeddings", file.f32("grad_embeddings"))?
            .0,
        grad_weight: file.require("grad_weight", file.f32("grad_weight"))?.0,
        sampled_index: file
            .i64("sampled_index")?
            .map(|(v, _)| v)
            .unwrap_or_default(),
    })
}

/// Writes a step's outputs (atomically).
pub fn write_result(
    path: &Path,
    case: &StepCase,
    result: &StepResult,
    world_size: usize,
) -> Result<()> {
    let (b, d, c) = (case.batch(), case.dim, case.num_classes as usize);
    let loss = [result.loss];
    let mut meta = HashMap::new();
    meta.insert("world_size".to_string(), world_size.to_string());
    meta.insert("classes".to_string(), case.num_classes.to_string());
    write_atomic(
        path,
        &[
            OutTensor::F32("loss", vec![1], &loss),
            OutTensor::F32("grad_embeddings", vec![b, d], &result.grad_embeddings),
            OutTensor::F32("grad_weight", vec![c, d], &result.grad_weight),
            OutTensor::I64(
                "sampled_index",
                vec![result.sampled_index.len()],
                &result.sampled_index,
            ),
        ],
        meta,
    )
}
