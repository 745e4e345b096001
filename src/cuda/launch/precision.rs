//! Launches cuda/precision.cu: the casts of f32 GEMM operands to bf16/f16 (src/cuda/mod.rs
//! `Precision`), and the 16-bit copies they fill ([`GemmOperands`]), kept for the backend's life
//! so that a layer's GEMMs allocate nothing and the backward GEMMs can reuse the forward copies.
//! The GEMMs that read the copies are in `gemm.rs`.

use super::common::{grid_stride, need};
use crate::cuda::{dev, CudaBackend, Precision};
use crate::error::{PfcError, Result};
use cudarc::cublas::sys::cudaDataType;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

/// The 16-bit copies of the step's GEMM operands, kept for the backend's life: `a` receives each
/// GEMM's `a` argument, `b` its `b` (the sizes of `StepShape::gemm_operand_lens`).
#[derive(Default)]
pub(crate) struct GemmOperands {
    pub(super) a: Option<CudaSlice<u16>>,
    pub(super) b: Option<CudaSlice<u16>>,
    /// What `a` and `b` hold when the last GEMM was `gemm_nt16`: the device address and length
    /// of the f32 `x̂` and `ŵ` it cast. `gemm_backward16` reuses the copies only if they are of
    /// the very buffers it is given; every other GEMM clears it.
    pub(super) forward: Option<(u64, usize, u64, usize)>,
}

impl GemmOperands {
    /// Bytes held.
    pub(super) fn bytes(&self) -> u64 {
        let len = |s: &Option<CudaSlice<u16>>| s.as_ref().map_or(0, |b| b.len() as u64);
        2 * (len(&self.a) + len(&self.b))
    }
}

/// The device pointer of a held 16-bit operand (with its stream-sync guard).
pub(super) fn a16_ptr<'a>(
    slot: &'a Option<CudaSlice<u16>>,
    stream: &'a std::sync::Arc<cudarc::driver::CudaStream>,
) -> Result<(u64, cudarc::driver::SyncOnDrop<'a>)> {
    slot.as_ref()
        .map(|buf| buf.device_ptr(stream))
        .ok_or_else(|| PfcError::Device("16-bit GEMM operand missing".into()))
}

impl CudaBackend {
    /// The cast kernel and cuBLAS type of this backend's 16-bit precision; an error in f32.
    pub(super) fn half_types(&self) -> Result<(&'static str, cudaDataType, i32)> {
        match self.precision {
            Precision::Bf16 => Ok(("cast_f32_to_bf16", cudaDataType::CUDA_R_16BF, 2)),
            Precision::F16 => Ok(("cast_f32_to_f16", cudaDataType::CUDA_R_16F, 1)),
            Precision::F32 => Err(PfcError::param(
                "precision",
                "f32",
                "16-bit logits need bf16 or f16 GEMM precision",
            )),
        }
    }

    /// The 16-bit operand buffer in `slot`, grown to `len` elements if it is shorter (only
    /// outside a layer, which reserves the planner's sizes up front: then this never allocates).
    pub(super) fn operand_buffer<'s>(
        &self,
        slot: &'s mut Option<CudaSlice<u16>>,
        len: usize,
    ) -> Result<&'s mut CudaSlice<u16>> {
        let short = match slot.as_ref() {
            Some(buf) => buf.len() < len,
            None => true,
        };
        if short {
            // Drop the old buffer first: its stream-ordered free runs after the GEMMs that read it.
            *slot = None;
            *slot = Some(self.alloc_operand(len)?);
        }
        slot.as_mut()
            .ok_or_else(|| PfcError::Device("16-bit GEMM operand missing".into()))
    }

    pub(super) fn alloc_operand(&self, len: usize) -> Result<CudaSlice<u16>> {
        self.stream.alloc_zeros::<u16>(len.max(1)).map_err(|e| {
            PfcError::Device(format!(
                "allocating {} bytes for a 16-bit GEMM operand: {e:?}",
                2 * len.max(1)
            ))
        })
    }

    /// Rounds the first `len` elements of `src` into `dst` with `kernel` (cuda/precision.cu).
    pub(super) fn cast_into(
        &self,
        kernel: &'static str,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<u16>,
        len: usize,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        need(src, len, "gemm operand")?;
        need(dst, len, "gemm operand copy")?;
        let len_u = len as u64;
        let mut builder = self.stream.launch_builder(self.func(kernel)?);
        builder.arg(src).arg(dst).arg(&len_u);
        // SAFETY: (const float*, u16*, unsigned long long) as in cuda/precision.cu; src and dst
        // hold len.
        unsafe { builder.launch(grid_stride(len)) }.map_err(dev("launch cast"))?;
        Ok(())
    }
}
