//! Launches cuda/margin_softmax.cu: the margin softmax in three passes (`margin_rowmax`,
//! `exp_rowsum`, `softmax_loss_grad`) or fused in one (`margin_softmax_fused`), over f32 logits
//! or, the `16` forms, over 16-bit cosines (CPU references: src/cpu/margin_softmax.rs and
//! src/cpu/margin_softmax16.rs). Each is checks and one launch of a block per row; the helpers
//! here turn a `LogitsShape` and `MarginParams` into the kernels' ints and `struct Margin`
//! ([`MarginArgs`]), and check the per-row buffers of the third pass in one list.

use super::common::{half_code, i32_of, launch, need, per_row};
use crate::backend::LogitsShape;
use crate::config::{MarginParams, ROW_MARGIN_FLOATS};
use crate::cuda::{dev, CudaBackend};
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, PushKernelArg, SyncOnDrop};

/// `MarginParams` as the kernels take it (struct Margin in margin_softmax.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct MarginArgs {
    scale: f32,
    m1: f32,
    m2: f32,
    m3: f32,
    exact_grad: i32,
    fallback: i32,
    fallback_cos: f32,
    fallback_mm: f32,
    has_filter: i32,
    filter: f32,
}
// SAFETY: plain-old-data with the C layout of `struct Margin`.
unsafe impl DeviceRepr for MarginArgs {}

impl From<&MarginParams> for MarginArgs {
    fn from(p: &MarginParams) -> Self {
        MarginArgs {
            scale: p.scale,
            m1: p.m1,
            m2: p.m2,
            m3: p.m3,
            exact_grad: p.exact_grad as i32,
            fallback: p.fallback as i32,
            fallback_cos: p.fallback_cos,
            fallback_mm: p.fallback_mm,
            has_filter: p.filter.is_some() as i32,
            filter: p.filter.unwrap_or(0.0),
        }
    }
}

/// The per-row buffers pass 3 reads or writes (f32 and 16-bit alike): labels, then row_max,
/// row_sum, target_cos and row_loss (2 x rows: the losses, then the target cosines). One list, so that no variant forgets one (the f32 pass
/// once checked only labels and row_loss).
fn need_pass3_rows(
    what: &str,
    rows: usize,
    labels: &CudaSlice<i32>,
    stats: [&CudaSlice<f32>; 4],
) -> Result<()> {
    // The message is formatted only for a short buffer: this runs on every launch.
    if labels.len() < rows {
        return need(labels, rows, &format!("{what} labels"));
    }
    // row_loss takes each row's loss and then its target cosine: 2 x rows.
    for ((buf, name), len) in stats
        .into_iter()
        .zip(["row_max", "row_sum", "target_cos", "row_loss"])
        .zip([rows, rows, rows, 2 * rows])
    {
        if buf.len() < len {
            return need(buf, len, &format!("{what} {name}"));
        }
    }
    Ok(())
}

/// The row count, row length and margin of the margin-softmax kernels, as they take them.
fn softmax_args(shape: LogitsShape, margin: &MarginParams) -> Result<(i32, i32, i32, MarginArgs)> {
    let (rows, cols, ld) = shape_args(shape)?;
    Ok((rows, cols, ld, MarginArgs::from(margin)))
}

/// A logits shape as the kernels' `(rows, cols, ld)` ints.
fn shape_args(shape: LogitsShape) -> Result<(i32, i32, i32)> {
    Ok((
        i32_of(shape.rows, "rows")?,
        i32_of(shape.cols, "cols")?,
        i32_of(shape.ld, "ld")?,
    ))
}

/// The 16-bit code of the logits for the `*16` softmax kernels.
fn half_kind(dtype: Dtype, what: &str) -> Result<i32> {
    half_code(dtype).ok_or_else(|| {
        PfcError::Shape(format!(
            "{what}: 16-bit cosines need dtype bf16 or f16, not f32"
        ))
    })
}

impl CudaBackend {
    /// A per-row margin table as the kernels' `const float* row_margins`: its device address
    /// (checked to hold [`ROW_MARGIN_FLOATS`] floats for each of `rows`), or 0 for none. The
    /// guard orders the table's use on this stream, as cudarc's launch arguments do.
    fn row_margins_arg<'a>(
        &'a self,
        table: Option<&'a CudaSlice<f32>>,
        rows: usize,
        what: &str,
    ) -> Result<(u64, Option<SyncOnDrop<'a>>)> {
        let Some(t) = table else {
            return Ok((0, None));
        };
        need(t, rows * ROW_MARGIN_FLOATS, &format!("{what} row_margins"))?;
        let (ptr, guard) = t.device_ptr(&self.stream);
        Ok((ptr, Some(guard)))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_margin_rowmax(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &mut CudaSlice<f32>,
        target_cos: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(logits, shape.len()?, "margin_rowmax logits")?;
        need(labels, shape.rows, "margin_rowmax labels")?;
        need(row_max, shape.rows, "margin_rowmax row_max")?;
        need(target_cos, shape.rows, "margin_rowmax target_cos")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
        let (rm, _rm) = self.row_margins_arg(row_margins, shape.rows, "margin_rowmax")?;
        launch!(
            self,
            "margin_rowmax",
            per_row(shape.rows),
            logits,
            &rows_i,
            &cols_i,
            &ld_i,
            labels,
            &p,
            &rm,
            row_max,
            target_cos
        );
        Ok(())
    }

    pub(super) fn launch_exp_rowsum(
        &self,
        logits: &CudaSlice<f32>,
        shape: LogitsShape,
        row_max: &CudaSlice<f32>,
        row_sum: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(logits, shape.len()?, "exp_rowsum logits")?;
        need(row_max, shape.rows, "exp_rowsum row_max")?;
        need(row_sum, shape.rows, "exp_rowsum row_sum")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i) = shape_args(shape)?;
        launch!(
            self,
            "exp_rowsum",
            per_row(shape.rows),
            logits,
            &rows_i,
            &cols_i,
            &ld_i,
            row_max,
            row_sum
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_softmax_loss_grad(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &CudaSlice<f32>,
        row_sum: &CudaSlice<f32>,
        target_cos: &CudaSlice<f32>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(logits, shape.len()?, "softmax_loss_grad logits")?;
        let stats = [row_max, row_sum, target_cos, &*row_loss];
        need_pass3_rows("softmax_loss_grad", shape.rows, labels, stats)?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
        let (rm, _rm) = self.row_margins_arg(row_margins, shape.rows, "softmax_loss_grad")?;
        launch!(
            self,
            "softmax_loss_grad",
            per_row(shape.rows),
            logits,
            &rows_i,
            &cols_i,
            &ld_i,
            labels,
            &p,
            &rm,
            row_max,
            row_sum,
            target_cos,
            &grad_scale,
            row_loss
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_margin_softmax_fused(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(logits, shape.len()?, "margin_softmax_fused logits")?;
        need(labels, shape.rows, "margin_softmax_fused labels")?;
        need(row_loss, 2 * shape.rows, "margin_softmax_fused row_loss")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
        let (rm, _rm) = self.row_margins_arg(row_margins, shape.rows, "margin_softmax_fused")?;
        launch!(
            self,
            "margin_softmax_fused",
            per_row(shape.rows),
            logits,
            &rows_i,
            &cols_i,
            &ld_i,
            labels,
            &p,
            &rm,
            &grad_scale,
            row_loss
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_margin_rowmax16(
        &self,
        cos: &CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &mut CudaSlice<f32>,
        target_cos: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let kind = half_kind(dtype, "margin_rowmax16")?;
        need(cos, shape.len()?, "margin_rowmax16 cos")?;
        need(labels, shape.rows, "margin_rowmax16 labels")?;
        need(row_max, shape.rows, "margin_rowmax16 row_max")?;
        need(target_cos, shape.rows, "margin_rowmax16 target_cos")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
        let (rm, _rm) = self.row_margins_arg(row_margins, shape.rows, "margin_rowmax16")?;
        launch!(
            self,
            "margin_rowmax16",
            per_row(shape.rows),
            cos,
            &rows_i,
            &cols_i,
            &ld_i,
            &kind,
            labels,
            &p,
            &rm,
            row_max,
            target_cos
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_exp_rowsum16(
        &self,
        cos: &CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &CudaSlice<f32>,
        row_sum: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let kind = half_kind(dtype, "exp_rowsum16")?;
        need(cos, shape.len()?, "exp_rowsum16 cos")?;
        need(labels, shape.rows, "exp_rowsum16 labels")?;
        need(row_max, shape.rows, "exp_rowsum16 row_max")?;
        need(row_sum, shape.rows, "exp_rowsum16 row_sum")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
        let (rm, _rm) = self.row_margins_arg(row_margins, shape.rows, "exp_rowsum16")?;
        launch!(
            self,
            "exp_rowsum16",
            per_row(shape.rows),
            cos,
            &rows_i,
            &cols_i,
            &ld_i,
            &kind,
            labels,
            &p,
            &rm,
            row_max,
            row_sum
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_softmax_loss_grad16(
        &self,
        cos: &mut CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        row_max: &CudaSlice<f32>,
        row_sum: &CudaSlice<f32>,
        target_cos: &CudaSlice<f32>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let kind = half_kind(dtype, "softmax_loss_grad16")?;
        need(cos, shape.len()?, "softmax_loss_grad16 cos")?;
        let stats = [row_max, row_sum, target_cos, &*row_loss];
        need_pass3_rows("softmax_loss_grad16", shape.rows, labels, stats)?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
        let (rm, _rm) = self.row_margins_arg(row_margins, shape.rows, "softmax_loss_grad16")?;
        launch!(
            self,
            "softmax_loss_grad16",
            per_row(shape.rows),
            cos,
            &rows_i,
            &cols_i,
            &ld_i,
            &kind,
            labels,
            &p,
            &rm,
            row_max,
            row_sum,
            target_cos,
            &grad_scale,
            row_loss
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_margin_softmax_fused16(
        &self,
        cos: &mut CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_margins: Option<&CudaSlice<f32>>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let kind = half_kind(dtype, "margin_softmax_fused16")?;
        need(cos, shape.len()?, "margin_softmax_fused16 cos")?;
        need(labels, shape.rows, "margin_softmax_fused16 labels")?;
        need(row_loss, 2 * shape.rows, "margin_softmax_fused16 row_loss")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
        let (rm, _rm) = self.row_margins_arg(row_margins, shape.rows, "margin_softmax_fused16")?;
        launch!(
            self,
            "margin_softmax_fused16",
            per_row(shape.rows),
            cos,
            &rows_i,
            &cols_i,
            &ld_i,
            &kind,
            labels,
            &p,
            &rm,
            &grad_scale,
            row_loss
        );
        Ok(())
    }

    /// Per-row weights on the f32 logits' gradient (`scale_rows` in margin_softmax.cu).
    pub(super) fn launch_scale_rows(
        &self,
        g: &mut CudaSlice<f32>,
        shape: LogitsShape,
        weights: &CudaSlice<f32>,
    ) -> Result<()> {
        need(g, shape.len()?, "scale_rows logits")?;
        need(weights, shape.rows, "scale_rows weights")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, _, ld_i) = shape_args(shape)?;
        launch!(
            self,
            "scale_rows",
            per_row(shape.rows),
            g,
            &rows_i,
            &ld_i,
            weights
        );
        Ok(())
    }

    /// Per-row weights on 16-bit logits (`scale_rows16`).
    pub(super) fn launch_scale_rows16(
        &self,
        g: &mut CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        weights: &CudaSlice<f32>,
    ) -> Result<()> {
        let kind = half_kind(dtype, "scale_rows16")?;
        need(g, shape.len()?, "scale_rows16 logits")?;
        need(weights, shape.rows, "scale_rows16 weights")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, _, ld_i) = shape_args(shape)?;
        launch!(
            self,
            "scale_rows16",
            per_row(shape.rows),
            g,
            &rows_i,
            &ld_i,
            &kind,
            weights
        );
        Ok(())
    }
}
