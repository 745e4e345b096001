//! The layer's memory: the planner's shape of it (`step_shape`), the bytes it allocated
//! (`memory_report`) and the planner's prediction of them (`planned_memory`).

use super::buffers::{Logits, Packed, U16Pair};
use super::PartialFc;
use crate::backend::{Backend, Collective};
use crate::config::{LayerConfig, NegativeSampler, StateDtype};
use crate::plan::buffers::{step_buffers, Component, StepShape};
use crate::plan::{Dtype, LogitsMode};
use crate::shard::Shard;

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    pub(super) fn shape_of(config: &LayerConfig, shard: Shard, world: usize) -> StepShape {
        StepShape {
            shard_classes: shard.len,
            world_size: world as u64,
            batch_per_rank: config.batch_per_rank as u64,
            dim: config.dim as u64,
            sample_rate: config.sample_rate,
            weight_dtype: Dtype::F32,
            optimizer_states: config.optimizer.map_or(0, |o| o.state_names().len() as u64),
            state_dtype: config
                .optimizer
                .map_or(Dtype::F32, |o| match o.state_dtype() {
                    StateDtype::F32 => Dtype::F32,
                    StateDtype::Bf16 => Dtype::Bf16,
                }),
            update: config.update,
            logits: LogitsMode::Materialized,
            wire_dtype: config.wire,
            grad_wire_dtype: config.grad_wire,
            hard_negatives: matches!(config.sampler, NegativeSampler::Hard { .. }),
            gemm_precision: config.precision,
        }
    }

    /// The planner's view of this layer (for comparing prediction and allocation).
    pub fn step_shape(&self) -> StepShape {
        Self::shape_of(&self.config, self.shard, self.comm.world_size())
    }

    /// Bytes this layer really allocated, by component (the planner's names), in report order.
    pub fn memory_report(&self) -> Vec<(Component, u64)> {
        let b = &self.backend;
        let f = |buf: &B::Buf<f32>| b.len(buf) as u64 * 4;
        let fo = |buf: &Option<B::Buf<f32>>| buf.as_ref().map_or(0, f);
        let u16_pair = |pair: &U16Pair<B>| {
            pair.as_ref()
                .map_or(0, |(send, recv)| (b.len(send) + b.len(recv)) as u64 * 2)
        };
        let x = &self.bufs;
        vec![
            (Component::WeightShard, f(&x.weight)),
            (Component::WeightGrad, fo(&x.weight_grad)),
            (
                Component::OptimizerState,
                x.states.iter().map(|m| m.bytes(b)).sum(),
            ),
            (Component::SampledWeights, f(&x.sampled_weights)),
            (Component::SampledWeightsGrad, f(&x.sampled_weights_grad)),
            (Component::WeightNorms, f(&x.weight_norms)),
            (
                Component::GatheredEmbeddings,
                match &x.packed {
                    Packed::F32(_, recv) => f(recv),
                    Packed::Half(_, recv) => b.len(recv) as u64 * 2,
                },
            ),
            (Component::NormalizedEmbeddings, f(&x.x_hat)),
            (Component::EmbeddingNorms, f(&x.x_norms)),
            (Component::EmbeddingsGrad, f(&x.x_grad)),
            (
                Component::Logits,
                match &x.logits {
                    Logits::F32(l) => f(l),
                    Logits::Half(l, _) => b.len(l) as u64 * 2,
                },
            ),
            (
                Component::Labels,
                b.len(&x.gathered_labels) as u64 * 8 + b.len(&x.local_labels) as u64 * 4,
            ),
            (Component::SampledIndex, b.len(&x.sampled_index) as u64 * 4),
            (Component::SamplerKeys, b.len(&x.keys) as u64 * 8),
            (
                Component::HardNegativeScratch,
                fo(&x.scores) + fo(&x.chunk_weights) + fo(&x.chunk_cosines),
            ),
            (
                Component::RowStats,
                f(&x.row_max)
                    + f(&x.row_sum)
                    + f(&x.target_cos)
                    + f(&x.row_loss)
                    + x.margin_table
                        .as_ref()
                        .map_or(0, |(own, all)| f(own) + f(all)),
            ),
            (Component::GemmOperands, b.gemm_operand_bytes()),
            (
                Component::CollectiveStaging,
                f(&x.staging)
                    + match &x.packed {
                        Packed::F32(send, _) => f(send),
                        Packed::Half(send, _) => b.len(send) as u64 * 2,
                    }
                    + u16_pair(&x.grad_wire),
            ),
        ]
    }

    /// The planner's prediction for this layer, by component.
    pub fn planned_memory(&self) -> Vec<(Component, u64)> {
        step_buffers(&self.step_shape())
    }
}
