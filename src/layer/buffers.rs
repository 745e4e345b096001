//! The layer's device buffers (`Buffers`), the all-gather's wire-format buffers (`Packed`) and
//! the logits (`Logits`), whose methods run the softmax passes in the dtype the backend keeps
//! them in.

use crate::backend::{Backend, LogitsShape, StateBuf};
use crate::config::MarginParams;
use crate::error::Result;
use crate::plan::Dtype;

/// A send and a receive buffer of 16-bit words, present only when a wire dtype is 16-bit.
pub(super) type U16Pair<B> = Option<(<B as Backend>::Buf<u16>, <B as Backend>::Buf<u16>)>;

pub(super) struct Buffers<B: Backend> {
    pub(super) weight: B::Buf<f32>,
    pub(super) weight_grad: Option<B::Buf<f32>>,
    /// The optimizer's state tensors, in
    /// [`Optimizer::state_names`](crate::config::Optimizer::state_names) order (none without one).
    pub(super) states: Vec<StateBuf<B>>,
    pub(super) sampled_weights: B::Buf<f32>,
    pub(super) sampled_weights_grad: B::Buf<f32>,
    pub(super) weight_norms: B::Buf<f32>,
    pub(super) x_hat: B::Buf<f32>,
    pub(super) x_norms: B::Buf<f32>,
    pub(super) x_grad: B::Buf<f32>,
    pub(super) logits: Logits<B>,
    pub(super) gathered_labels: B::Buf<i64>,
    pub(super) local_labels: B::Buf<i32>,
    pub(super) sampled_index: B::Buf<i32>,
    pub(super) keys: B::Buf<u64>,
    pub(super) scores: Option<B::Buf<f32>>,
    pub(super) chunk_weights: Option<B::Buf<f32>>,
    pub(super) chunk_cosines: Option<B::Buf<f32>>,
    pub(super) row_max: B::Buf<f32>,
    pub(super) row_sum: B::Buf<f32>,
    pub(super) target_cos: B::Buf<f32>,
    pub(super) row_loss: B::Buf<f32>,
    pub(super) staging: B::Buf<f32>,
    /// The all-gather's send (N rows) and receive (N·k rows) buffers in the wire format.
    pub(super) packed: Packed<B>,
    /// Send (N·k × d) and receive (N × d) buffers of the gradient's 16-bit reduce-scatter
    /// (`None` when `grad_wire` is f32).
    pub(super) grad_wire: U16Pair<B>,
    /// This rank's rows (N) and every rank's (N·k) of the per-row margin table
    /// ([`PassOptions`](super::PassOptions)), allocated at the first pass that has one.
    pub(super) margin_table: Option<(B::Buf<f32>, B::Buf<f32>)>,
}

/// Send and receive buffers of the embedding all-gather in the wire format: each row's values
/// then its i64 label (two f32 words, or four 16-bit words; src/cpu/wire.rs), packed on the host
/// where the embeddings arrive, so a step makes one upload and one all-gather for both.
pub(super) enum Packed<B: Backend> {
    F32(B::Buf<f32>, B::Buf<f32>),
    Half(B::Buf<u16>, B::Buf<u16>),
}

/// The logits, in the dtype the backend keeps them in ([`Backend::logits_dtype`]): f32, or with
/// 16-bit GEMMs the GEMMs' 16-bit type. Its methods pick the softmax passes of that dtype, so the
/// step is written once for both.
pub(super) enum Logits<B: Backend> {
    F32(B::Buf<f32>),
    Half(B::Buf<u16>, Dtype),
}

/// The all-reduced row max and row sum and the raw target cosines, for pass 3.
type RowStatBufs<'a, B> = (
    &'a <B as Backend>::Buf<f32>,
    &'a <B as Backend>::Buf<f32>,
    &'a <B as Backend>::Buf<f32>,
);

impl<B: Backend> Logits<B> {
    /// The scale the softmax folds into the logits' gradient for a loss averaged with `mean`
    /// (= 1/rows). 16-bit logits keep it out, as the backward GEMMs' alpha: `p · s / rows` of a
    /// non-target is ~1e-9 at 100k classes and 1024 rows, below f16's smallest normal (6e-5),
    /// while `p · s` stays in range (the same reason mixed-precision training scales its loss).
    pub(super) fn softmax_grad_scale(&self, mean: f32) -> f32 {
        match self {
            Logits::F32(_) => mean,
            Logits::Half(..) => 1.0,
        }
    }

    /// Each row of the logits' gradient times its weight (`forward_backward_weighted`).
    pub(super) fn scale_rows(
        &mut self,
        b: &B,
        shape: LogitsShape,
        weights: &B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(g) => b.scale_rows(g, shape, weights),
            Logits::Half(g, dt) => b.scale_rows16(g, shape, *dt, weights),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fused(
        &mut self,
        b: &B,
        shape: LogitsShape,
        labels: &B::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&B::Buf<f32>>,
        grad_scale: f32,
        row_loss: &mut B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(l) => {
                b.margin_softmax_fused(l, shape, labels, margin, row_margins, grad_scale, row_loss)
            }
            Logits::Half(l, dt) => b.margin_softmax_fused16(
                l,
                shape,
                *dt,
                labels,
                margin,
                row_margins,
                grad_scale,
                row_loss,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rowmax(
        &mut self,
        b: &B,
        shape: LogitsShape,
        labels: &B::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&B::Buf<f32>>,
        row_max: &mut B::Buf<f32>,
        target_cos: &mut B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(l) => {
                b.margin_rowmax(l, shape, labels, margin, row_margins, row_max, target_cos)
            }
            Logits::Half(l, dt) => b.margin_rowmax16(
                l,
                shape,
                *dt,
                labels,
                margin,
                row_margins,
                row_max,
                target_cos,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn exp_rowsum(
        &self,
        b: &B,
        shape: LogitsShape,
        labels: &B::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&B::Buf<f32>>,
        row_max: &B::Buf<f32>,
        row_sum: &mut B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(l) => b.exp_rowsum(l, shape, row_max, row_sum),
            Logits::Half(l, dt) => {
                b.exp_rowsum16(l, shape, *dt, labels, margin, row_margins, row_max, row_sum)
            }
        }
    }

    /// Pass 3; `stats` are the all-reduced row max and sum and the raw target cosines.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn loss_grad(
        &mut self,
        b: &B,
        shape: LogitsShape,
        labels: &B::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&B::Buf<f32>>,
        (row_max, row_sum, target_cos): RowStatBufs<'_, B>,
        grad_scale: f32,
        row_loss: &mut B::Buf<f32>,
    ) -> Result<()> {
        match self {
            Logits::F32(l) => b.softmax_loss_grad(
                l,
                shape,
                labels,
                margin,
                row_margins,
                row_max,
                row_sum,
                target_cos,
                grad_scale,
                row_loss,
            ),
            Logits::Half(l, dt) => b.softmax_loss_grad16(
                l,
                shape,
                *dt,
                labels,
                margin,
                row_margins,
                row_max,
                row_sum,
                target_cos,
                grad_scale,
                row_loss,
            ),
        }
    }
}
