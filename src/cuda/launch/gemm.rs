//! The step's GEMMs through cuBLAS: `gemm_nt`, `gemm_nn`, `gemm_tn` and `gemm_backward` (f32
//! logits), `gemm_nt16` and `gemm_backward16` (16-bit logits); CPU references: src/cpu/gemm.rs.
//! They launch no kernel of `cuda/` themselves: the glue is the translation of the crate's
//! row-major products into column-major cuBLAS calls, `cublasSgemm` in f32 precision and, in
//! bf16/f16, `cublasGemmEx` over the 16-bit operand copies that `precision.rs` casts and keeps.

use super::common::{i32_of, need_product};
use super::precision::{a16_ptr, GemmOperands};
use crate::backend::Backend;
use crate::cuda::{dev, CudaBackend, Precision};
use crate::error::{PfcError, Result};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

impl CudaBackend {
    pub(super) fn launch_gemm_nt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(a, [m, k], "gemm_nt a")?;
        need_product(b, [n, k], "gemm_nt b")?;
        need_product(c, [m, n], "gemm_nt c")?;
        // cᵀ[n×m] = b[n×k] · aᵀ: b is col-major k×n (op T), a is col-major k×m (op N).
        self.gemm_rowmajor(
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            m,
            n,
            k,
            (b, k, n * k),
            (a, k, m * k),
            c,
            false,
        )
    }

    pub(super) fn launch_gemm_nn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(a, [m, k], "gemm_nn a")?;
        need_product(b, [k, n], "gemm_nn b")?;
        need_product(c, [m, n], "gemm_nn c")?;
        // cᵀ = bᵀ · aᵀ: b is col-major n×k (op N, ld n), a is col-major k×m (op N, ld k).
        self.gemm_rowmajor(
            CUBLAS_OP_N,
            CUBLAS_OP_N,
            m,
            n,
            k,
            (b, n, k * n),
            (a, k, m * k),
            c,
            false,
        )
    }

    pub(super) fn launch_gemm_tn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(a, [k, m], "gemm_tn a")?;
        need_product(b, [k, n], "gemm_tn b")?;
        need_product(c, [m, n], "gemm_tn c")?;
        // cᵀ = bᵀ · a: b is col-major n×k (op N, ld n), a is col-major m×k (op T, ld m).
        self.gemm_rowmajor(
            CUBLAS_OP_N,
            CUBLAS_OP_T,
            m,
            n,
            k,
            (b, n, k * n),
            (a, m, k * m),
            c,
            false,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_gemm_backward(
        &self,
        rows: usize,
        cols: usize,
        dim: usize,
        grad_logits: &CudaSlice<f32>,
        w_hat: &CudaSlice<f32>,
        x_hat: &CudaSlice<f32>,
        grad_x: &mut CudaSlice<f32>,
        grad_w: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(grad_logits, [rows, cols], "gemm_backward grad_logits")?;
        need_product(w_hat, [cols, dim], "gemm_backward w_hat")?;
        need_product(x_hat, [rows, dim], "gemm_backward x_hat")?;
        need_product(grad_x, [rows, dim], "gemm_backward grad_x")?;
        need_product(grad_w, [cols, dim], "gemm_backward grad_w")?;
        // As gemm_nn(rows, dim, cols) then gemm_tn(cols, dim, rows); the second reuses the
        // 16-bit copy of the logits' gradient the first made.
        self.gemm_rowmajor(
            CUBLAS_OP_N,
            CUBLAS_OP_N,
            rows,
            dim,
            cols,
            (w_hat, dim, cols * dim),
            (grad_logits, cols, rows * cols),
            grad_x,
            false,
        )?;
        self.gemm_rowmajor(
            CUBLAS_OP_N,
            CUBLAS_OP_T,
            cols,
            dim,
            rows,
            (x_hat, dim, rows * dim),
            (grad_logits, cols, rows * cols),
            grad_w,
            true,
        )
    }

    pub(super) fn launch_gemm_nt16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<u16>,
    ) -> Result<()> {
        let (cast, dtype, _) = self.half_types()?;
        need_product(a, [m, k], "gemm_nt16 a")?;
        need_product(b, [n, k], "gemm_nt16 b")?;
        need_product(c, [m, n], "gemm_nt16 c")?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return self.zero(c, m * n);
        }
        let mut held = self
            .gemm_operands
            .lock()
            .map_err(|_| PfcError::Device("the GEMM operand buffers' lock is poisoned".into()))?;
        let GemmOperands {
            a: a_slot,
            b: b_slot,
            forward,
        } = &mut *held;
        let a16 = self.operand_buffer(a_slot, m * k)?;
        self.cast_into(cast, a, a16, m * k)?;
        let b16 = self.operand_buffer(b_slot, n * k)?;
        self.cast_into(cast, b, b16, n * k)?;
        let stream = &self.stream;
        *forward = Some((a.device_ptr(stream).0, m * k, b.device_ptr(stream).0, n * k));
        let (ap, _ga) = a16_ptr(a_slot, stream)?;
        let (bp, _gb) = a16_ptr(b_slot, stream)?;
        let (cp, _gc) = c.device_ptr_mut(stream);
        // cᵀ[n×m] = b[n×k] · aᵀ, as gemm_nt. SAFETY: a, b, c checked above; the copies hold
        // m·k and n·k elements.
        unsafe {
            self.gemm_ex(
                (CUBLAS_OP_T, CUBLAS_OP_N),
                (m, n, k),
                (bp, k),
                (ap, k),
                dtype,
                (cp, dtype),
                1.0,
            )
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_gemm_backward16(
        &self,
        rows: usize,
        cols: usize,
        dim: usize,
        grad_logits: &CudaSlice<u16>,
        alpha: f32,
        w_hat: &CudaSlice<f32>,
        x_hat: &CudaSlice<f32>,
        grad_x: &mut CudaSlice<f32>,
        grad_w: &mut CudaSlice<f32>,
        reuse_operands: bool,
    ) -> Result<()> {
        let (cast, dtype, _) = self.half_types()?;
        need_product(grad_logits, [rows, cols], "gemm_backward16 grad_logits")?;
        need_product(w_hat, [cols, dim], "gemm_backward16 w_hat")?;
        need_product(x_hat, [rows, dim], "gemm_backward16 x_hat")?;
        need_product(grad_x, [rows, dim], "gemm_backward16 grad_x")?;
        need_product(grad_w, [cols, dim], "gemm_backward16 grad_w")?;
        if dim == 0 {
            return Ok(());
        }
        if rows == 0 || cols == 0 {
            self.zero(grad_x, rows * dim)?;
            return self.zero(grad_w, cols * dim);
        }
        let mut held = self
            .gemm_operands
            .lock()
            .map_err(|_| PfcError::Device("the GEMM operand buffers' lock is poisoned".into()))?;
        let GemmOperands {
            a: a_slot,
            b: b_slot,
            forward,
        } = &mut *held;
        let stream = &self.stream;
        // Reuse only the copies gemm_nt16 made of these very buffers (nothing else has used the
        // slots since); otherwise cast again.
        let these = (
            x_hat.device_ptr(stream).0,
            rows * dim,
            w_hat.device_ptr(stream).0,
            cols * dim,
        );
        if !(reuse_operands && *forward == Some(these)) {
            let x16 = self.operand_buffer(a_slot, rows * dim)?;
            self.cast_into(cast, x_hat, x16, rows * dim)?;
            let w16 = self.operand_buffer(b_slot, cols * dim)?;
            self.cast_into(cast, w_hat, w16, cols * dim)?;
            *forward = Some(these);
        }
        let (xp, _gx) = a16_ptr(a_slot, stream)?;
        let (wp, _gw) = a16_ptr(b_slot, stream)?;
        let (gp, _gg) = grad_logits.device_ptr(stream);
        {
            let (cp, _gc) = grad_x.device_ptr_mut(stream);
            // grad_x[rows×dim] = g[rows×cols] · ŵ[cols×dim], as gemm_nn(rows, dim, cols).
            // SAFETY: every buffer checked above against these shapes.
            unsafe {
                self.gemm_ex(
                    (CUBLAS_OP_N, CUBLAS_OP_N),
                    (rows, dim, cols),
                    (wp, dim),
                    (gp, cols),
                    dtype,
                    (cp, cudaDataType::CUDA_R_32F),
                    alpha,
                )?;
            }
        }
        let (cp, _gc) = grad_w.device_ptr_mut(stream);
        // grad_w[cols×dim] = gᵀ · x̂[rows×dim], as gemm_tn(cols, dim, rows).
        // SAFETY: as above.
        unsafe {
            self.gemm_ex(
                (CUBLAS_OP_N, CUBLAS_OP_T),
                (cols, dim, rows),
                (xp, dim),
                (gp, cols),
                dtype,
                (cp, cudaDataType::CUDA_R_32F),
                alpha,
            )
        }
    }

    /// Row-major `c[m×n] = op(a) · op(b)` through column-major cuBLAS: a row-major matrix is its
    /// transpose in column-major, so cuBLAS computes `cᵀ = op(b)ᵀ · op(a)ᵀ` with the operands
    /// swapped. `(tb, ta)` are the cuBLAS ops of the swapped operands, `ldb`/`lda` their leading
    /// dimensions (row lengths in row-major).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sgemm_rowmajor<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        tb: cublasOperation_t,
        ta: cublasOperation_t,
        m: usize,
        n: usize,
        k: usize,
        b: &B,
        ldb: usize,
        a: &A,
        lda: usize,
        c: &mut C,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        // cudarc makes the context current for launches and copies but not for cuBLAS calls: a
        // GEMM that is a thread's first CUDA call, or follows another device's work on it,
        // would otherwise run in the wrong context.
        self.ctx.bind_to_thread().map_err(dev("cuBLAS context"))?;
        let cfg = GemmConfig {
            transa: tb,
            transb: ta,
            m: i32_of(n, "gemm n")?,
            n: i32_of(m, "gemm m")?,
            k: i32_of(k.max(1), "gemm k")?,
            alpha: if k == 0 { 0.0 } else { 1.0 },
            lda: i32_of(ldb.max(1), "gemm ldb")?,
            ldb: i32_of(lda.max(1), "gemm lda")?,
            beta: 0.0,
            ldc: i32_of(n, "gemm ldc")?,
        };
        // SAFETY: the callers checked every buffer against m, n, k.
        unsafe { self.blas.gemm(cfg, b, a, c) }.map_err(dev("cublasSgemm"))
    }

    /// The step's GEMMs: [`CudaBackend::sgemm_rowmajor`] in f32, or with both operands rounded
    /// to bf16/f16 (`a_len`, `b_len` elements) and `cublasGemmEx` with f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm_rowmajor(
        &self,
        tb: cublasOperation_t,
        ta: cublasOperation_t,
        m: usize,
        n: usize,
        k: usize,
        (b, ldb, b_len): (&CudaSlice<f32>, usize, usize),
        (a, lda, a_len): (&CudaSlice<f32>, usize, usize),
        c: &mut CudaSlice<f32>,
        a_already_cast: bool,
    ) -> Result<()> {
        let (kernel, dtype) = match self.precision {
            Precision::F32 => return self.sgemm_rowmajor(tb, ta, m, n, k, b, ldb, a, lda, c),
            Precision::Bf16 => ("cast_f32_to_bf16", cudaDataType::CUDA_R_16BF),
            Precision::F16 => ("cast_f32_to_f16", cudaDataType::CUDA_R_16F),
        };
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return self.zero(c, m * n);
        }
        // The operand buffers stay locked until cuBLAS is queued; stream order then keeps the
        // next GEMM's casts behind this one's reads.
        let mut held = self
            .gemm_operands
            .lock()
            .map_err(|_| PfcError::Device("the GEMM operand buffers' lock is poisoned".into()))?;
        let GemmOperands {
            a: a_slot,
            b: b_slot,
            forward,
        } = &mut *held;
        *forward = None;
        let b16 = self.operand_buffer(b_slot, b_len)?;
        self.cast_into(kernel, b, b16, b_len)?;
        // `a_already_cast`: the previous GEMM of this backend cast this same `a` into the slot
        // (the backward pair sharing the logits' gradient), and stream order keeps it there.
        let a_ready = a_already_cast && a_slot.as_ref().is_some_and(|s| s.len() >= a_len);
        if !a_ready {
            let a16 = self.operand_buffer(a_slot, a_len)?;
            self.cast_into(kernel, a, a16, a_len)?;
        }
        let stream = &self.stream;
        let (bp, _gb) = b_slot
            .as_ref()
            .map(|b16| b16.device_ptr(stream))
            .ok_or_else(|| PfcError::Device("16-bit GEMM operand b missing".into()))?;
        let (ap, _ga) = a_slot
            .as_ref()
            .map(|a16| a16.device_ptr(stream))
            .ok_or_else(|| PfcError::Device("16-bit GEMM operand a missing".into()))?;
        let (cp, _gc) = c.device_ptr_mut(stream);
        // SAFETY: the callers checked a, b, c against m, n, k; the 16-bit copies hold at least
        // as many elements.
        unsafe {
            self.gemm_ex(
                (tb, ta),
                (m, n, k),
                (bp, ldb),
                (ap, lda),
                dtype,
                (cp, cudaDataType::CUDA_R_32F),
                1.0,
            )
        }
    }

    /// `cublasGemmEx` on raw device pointers, row-major as [`CudaBackend::sgemm_rowmajor`]:
    /// `c[m×n] = alpha · op(a) · op(b)` with 16-bit `a`/`b` of type `ab`, `c` of type `c_type`,
    /// f32 accumulation (`CUBLAS_COMPUTE_32F`, whose alpha and beta are f32).
    ///
    /// # Safety
    /// The pointers must be live device allocations of this context holding the elements the
    /// shapes and leading dimensions address.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_ex(
        &self,
        (tb, ta): (cublasOperation_t, cublasOperation_t),
        (m, n, k): (usize, usize, usize),
        (bp, ldb): (u64, usize),
        (ap, lda): (u64, usize),
        ab: cudaDataType,
        (cp, c_type): (u64, cudaDataType),
        alpha: f32,
    ) -> Result<()> {
        let beta = 0.0f32;
        // See `sgemm_rowmajor`: cuBLAS runs in the thread's current context.
        self.ctx.bind_to_thread().map_err(dev("cuBLAS context"))?;
        cudarc::cublas::result::gemm_ex(
            *self.blas.handle(),
            tb,
            ta,
            i32_of(n, "gemm n")?,
            i32_of(m, "gemm m")?,
            i32_of(k, "gemm k")?,
            &alpha as *const f32 as *const _,
            bp as *const _,
            ab,
            i32_of(ldb.max(1), "gemm ldb")?,
            ap as *const _,
            ab,
            i32_of(lda.max(1), "gemm lda")?,
            &beta as *const f32 as *const _,
            cp as *mut _,
            c_type,
            i32_of(n, "gemm ldc")?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(dev("cublasGemmEx"))
    }
}
