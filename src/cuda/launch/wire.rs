//! Launches cuda/wire.cu: the 16-bit packed rows of the embedding all-gather (`pack_embeddings`,
//! `unpack_normalize`) and the casts around the 16-bit reduce-scatter of the embedding gradient
//! (`cast_to_wire`, `cast_from_wire`); CPU references: src/cpu/wire.rs. Each is checks and one
//! launch; the wire format reaches the kernels as their `wire` code ([`wire_code`]), which f32
//! lacks: f32 values travel unpacked.

use super::common::{grid_stride, half_code, i32_of, launch, need, need_product, per_row};
use crate::cuda::{dev, CudaBackend};
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use cudarc::driver::{CudaSlice, PushKernelArg};

/// The `wire` argument of cuda/wire.cu ([`half_code`]); f32 is not a 16-bit format (the
/// packed rows and the casts are refused for it: f32 values travel as they are).
fn wire_code(wire: Dtype) -> Result<i32> {
    half_code(wire).ok_or_else(|| {
        PfcError::param(
            "wire",
            "f32",
            "the 16-bit wire formats are f16 and bf16; f32 values are sent unpacked",
        )
    })
}

impl CudaBackend {
    pub(super) fn launch_pack_embeddings(
        &self,
        x: &CudaSlice<f32>,
        labels: &CudaSlice<i64>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        packed: &mut CudaSlice<u16>,
    ) -> Result<()> {
        need_product(x, [rows, dim], "pack_embeddings x")?;
        need(labels, rows, "pack_embeddings labels")?;
        need_product(
            packed,
            [rows, dim.saturating_add(4)],
            "pack_embeddings packed",
        )?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i, wire_i) =
            (i32_of(rows, "rows")?, i32_of(dim, "dim")?, wire_code(wire)?);
        launch!(
            self,
            "pack_embeddings",
            per_row(rows),
            x,
            labels,
            &rows_i,
            &dim_i,
            &wire_i,
            packed
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_unpack_normalize(
        &self,
        packed: &CudaSlice<u16>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        labels: &mut CudaSlice<i64>,
        x_hat: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(
            packed,
            [rows, dim.saturating_add(4)],
            "unpack_normalize packed",
        )?;
        need(labels, rows, "unpack_normalize labels")?;
        need_product(x_hat, [rows, dim], "unpack_normalize x_hat")?;
        need(norms, rows, "unpack_normalize norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i, wire_i) =
            (i32_of(rows, "rows")?, i32_of(dim, "dim")?, wire_code(wire)?);
        launch!(
            self,
            "unpack_normalize",
            per_row(rows),
            packed,
            &rows_i,
            &dim_i,
            &wire_i,
            labels,
            x_hat,
            norms
        );
        Ok(())
    }

    pub(super) fn launch_cast_to_wire(
        &self,
        x: &CudaSlice<f32>,
        len: usize,
        wire: Dtype,
        out: &mut CudaSlice<u16>,
    ) -> Result<()> {
        let wire_i = wire_code(wire)?;
        need(x, len, "cast_to_wire x")?;
        need(out, len, "cast_to_wire out")?;
        if len == 0 {
            return Ok(());
        }
        let n = len as u64;
        launch!(self, "cast_to_wire", grid_stride(len), x, &n, &wire_i, out);
        Ok(())
    }

    pub(super) fn launch_cast_from_wire(
        &self,
        x: &CudaSlice<u16>,
        len: usize,
        wire: Dtype,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let wire_i = wire_code(wire)?;
        need(x, len, "cast_from_wire x")?;
        need(out, len, "cast_from_wire out")?;
        if len == 0 {
            return Ok(());
        }
        let n = len as u64;
        launch!(
            self,
            "cast_from_wire",
            grid_stride(len),
            x,
            &n,
            &wire_i,
            out
        );
        Ok(())
    }
}
