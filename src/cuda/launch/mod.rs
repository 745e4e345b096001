//! `impl Backend for CudaBackend`: argument checks, launch shapes and cuBLAS calls. The kernels
//! themselves live in `cuda/*.cu` under the same names as their CPU references.
//!
//! Every buffer is checked against the length its shape needs (products checked for overflow)
//! before a kernel is queued. Index and label *values* in device buffers are not: checking them
//! would cost a download and a synchronization per call. The layer produces them itself (its
//! sampler, its label localization, after checking the user's labels on the host); a caller of
//! the `Backend` trait that passes its own must keep them in range, as the CPU backend checks.

use super::{dev, CudaBackend, Precision};
use crate::backend::{AdamWStep, Backend, Elem, LogitsShape, SampleArgs, StateBuf};
use crate::config::MarginParams;
use crate::error::{PfcError, Result};
use crate::plan::Dtype;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

/// Threads per block of the row kernels: one block per row ([`per_row`]), or one warp per row,
/// `ROW_THREADS / 32` rows a block ([`per_warp_row`]).
const ROW_THREADS: u32 = 256;
// The kernels' block reductions and the warp-per-row layout assume whole warps.
const _: () = assert!(ROW_THREADS.is_multiple_of(32));
/// Threads per block of the element-wise kernels.
const ELEM_THREADS: u32 = 256;
/// Classes per block of the compaction (SCAN_BLOCK in sampling.cu).
const SCAN_BLOCK: usize = 1024;
/// Threads per block of the radix passes (SELECT_THREADS in sampling.cu).
const SELECT_THREADS: usize = 1024;
/// Histogram bins of one radix digit (BINS in sampling.cu).
const SELECT_BINS: usize = 2048;
/// u64 words of the select state (sampling.cu).
const SELECT_STATE: usize = 7;
/// Word of the select state holding the candidates of the last plain call.
const STATE_LAST_CANDIDATES: usize = 6;
/// Word of the select state holding the distinct positives.
const STATE_POSITIVES: usize = 3;
/// Word of the select state holding the number of classes selected.
const STATE_SELECTED: usize = 4;
/// Rows whose labels `compact_selected`'s last block remaps itself (REMAP_IN_LAST_BLOCK in
/// sampling.cu); more get the `remap_labels` kernel.
const REMAP_IN_LAST_BLOCK: usize = 2048;
/// Length of the plain sampler's candidate list (the keys of the first digit's bin): random high
/// words spread over 1024 first-digit bins, so a bin holds about `shard / 1024` keys (standard
/// deviation about the square root of that); positives have a bin of their own, at most one per
/// row. Four times the mean plus the rows and a margin never overflows in practice; an overflow
/// would only make the last block of `collect_candidates` walk all keys.
fn candidate_capacity(shard: usize, rows: usize) -> usize {
    (4 * shard.div_ceil(1024) + rows + 4096).min(shard)
}

/// The digits of the high key word: the S-th largest high word, ties resolved by class order.
const HIGH_DIGITS: [(i32, i32); 3] = [(53, 11), (42, 11), (32, 10)];
/// All digits of the key: the exact S-th largest key.
const ALL_DIGITS: [(i32, i32); 6] = [(53, 11), (42, 11), (32, 10), (21, 11), (10, 11), (0, 10)];

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
/// row_sum, target_cos and row_loss. One list, so that no variant forgets one (the f32 pass
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
    for (buf, name) in stats
        .into_iter()
        .zip(["row_max", "row_sum", "target_cos", "row_loss"])
    {
        if buf.len() < rows {
            return need(buf, rows, &format!("{what} {name}"));
        }
    }
    Ok(())
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| PfcError::Shape(format!("{what} = {v} exceeds i32::MAX")))
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

/// The kernels' code of a 16-bit dtype (common.cuh `HALF_F16` = 1, `HALF_BF16` = 2); `None`
/// for f32.
fn half_code(dtype: Dtype) -> Option<i32> {
    match dtype {
        Dtype::F16 => Some(1),
        Dtype::Bf16 => Some(2),
        Dtype::F32 => None,
    }
}

/// The 16-bit code of the logits for the `*16` softmax kernels.
fn half_kind(dtype: Dtype, what: &str) -> Result<i32> {
    half_code(dtype).ok_or_else(|| {
        PfcError::Shape(format!(
            "{what}: 16-bit cosines need dtype bf16 or f16, not f32"
        ))
    })
}

/// The device pointer of a held 16-bit operand (with its stream-sync guard).
fn a16_ptr<'a>(
    slot: &'a Option<CudaSlice<u16>>,
    stream: &'a std::sync::Arc<cudarc::driver::CudaStream>,
) -> Result<(u64, cudarc::driver::SyncOnDrop<'a>)> {
    slot.as_ref()
        .map(|buf| buf.device_ptr(stream))
        .ok_or_else(|| PfcError::Device("16-bit GEMM operand missing".into()))
}

fn need<T: Elem>(buf: &CudaSlice<T>, len: usize, what: &str) -> Result<()> {
    if buf.len() < len {
        return Err(PfcError::Shape(format!(
            "{what}: buffer of {} elements, {len} needed",
            buf.len()
        )));
    }
    Ok(())
}

/// [`need`] of `a · b` elements; a product past `usize::MAX` needs more than any buffer holds
/// (a wrapped product would pass the check and send a kernel past the buffer's end).
fn need_product<T: Elem>(buf: &CudaSlice<T>, [a, b]: [usize; 2], what: &str) -> Result<()> {
    need(buf, a.saturating_mul(b), what)
}

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, `ROW_THREADS / 32` rows per block (cuda/normalize.cu says why).
fn per_warp_row(rows: usize) -> LaunchConfig {
    let rows_per_block = (ROW_THREADS / 32) as usize;
    LaunchConfig {
        grid_dim: (rows.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

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

fn per_elem(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(ELEM_THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid of the grid-stride kernels (the casts of cuda/wire.cu, the dense optimizer updates):
/// one thread per element up to 2^16 blocks, beyond that each thread loops (the grid's x
/// dimension could hold more, but more blocks than the device runs at once only add
/// scheduling).
fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(ELEM_THREADS as usize).clamp(1, 1 << 16) as u32,
            1,
            1,
        ),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn single_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// How a chunk's cosines are laid out (see `CudaBackend::score_class_chunk`).
#[derive(Clone, Copy)]
enum CosineLayout {
    /// `len × rows`: a class's cosines with every row are contiguous.
    ClassesByRows,
    /// `rows × len`: a row's cosines with every class are contiguous.
    RowsByClasses,
}

/// Launches a kernel: `launch!(self, "name", cfg, arg, arg, ...)`, each arg a reference.
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        let f = $self.func($name)?;
        let mut builder = $self.stream.launch_builder(f);
        $(builder.arg($arg);)*
        // SAFETY: argument types and counts match the kernel's signature in cuda/*.cu, and the
        // callers checked buffer lengths against the sizes the kernel touches.
        unsafe { builder.launch($cfg) }.map_err(dev(concat!("launch ", $name)))?;
    }};
}

impl CudaBackend {
    /// A device-to-host copy that has finished when it returns. cudarc's copy is
    /// `cuMemcpyDtoHAsync` into pageable memory, which CUDA documents as returning once the copy
    /// is complete; the stream sync states that here instead of resting on it, and costs nothing
    /// when the copy already blocked.
    fn read_back<T: DeviceRepr, S: DevicePtr<T>>(&self, src: &S) -> Result<Vec<T>> {
        let host = self.stream.clone_dtoh(src).map_err(dev("download"))?;
        self.stream.synchronize().map_err(dev("download"))?;
        Ok(host)
    }

    /// The shared first half of `class_max_cosine` and `class_top_k`: normalizes the classes
    /// `classes` of `weight` into `chunk_weights`, then scores them
    /// against the `rows` normalized embeddings `x_hat` into `cosines`, in the layout the
    /// caller's reduction reads (a class's cosines contiguous for a per-class max, a row's for a
    /// per-row top k). The caller checked every size. Neither caller needs the centers' norms:
    /// the normalization writes them to the head of `cosines`, which the GEMM then overwrites
    /// (same stream), so scoring allocates no scratch after the ranks agreed to run.
    #[allow(clippy::too_many_arguments)]
    fn score_class_chunk(
        &self,
        weight: &CudaSlice<f32>,
        classes: std::ops::Range<usize>,
        dim: usize,
        x_hat: &CudaSlice<f32>,
        rows: usize,
        chunk_weights: &mut CudaSlice<f32>,
        cosines: &mut CudaSlice<f32>,
        layout: CosineLayout,
    ) -> Result<()> {
        let len = classes.len();
        let (len_i, dim_i) = (i32_of(len, "chunk")?, i32_of(dim, "dim")?);
        let w = weight.slice(classes.start * dim..classes.end * dim);
        let mut norms = cosines.slice_mut(0..len);
        launch!(
            self,
            "normalize_rows",
            per_warp_row(len),
            &w,
            &len_i,
            &dim_i,
            &mut *chunk_weights,
            &mut norms
        );
        match layout {
            // cosines[len × rows] = chunk_weights[len × dim] · x_hatᵀ
            CosineLayout::ClassesByRows => self.sgemm_rowmajor(
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                len,
                rows,
                dim,
                x_hat,
                dim,
                &*chunk_weights,
                dim,
                cosines,
            ),
            // cosines[rows × len] = x_hat[rows × dim] · chunk_weights[len × dim]ᵀ
            CosineLayout::RowsByClasses => self.sgemm_rowmajor(
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                rows,
                len,
                dim,
                &*chunk_weights,
                dim,
                x_hat,
                dim,
                cosines,
            ),
        }
    }

    /// Row-major `c[m×n] = op(a) · op(b)` through column-major cuBLAS: a row-major matrix is its
    /// transpose in column-major, so cuBLAS computes `cᵀ = op(b)ᵀ · op(a)ᵀ` with the operands
    /// swapped. `(tb, ta)` are the cuBLAS ops of the swapped operands, `ldb`/`lda` their leading
    /// dimensions (row lengths in row-major).
    #[allow(clippy::too_many_arguments)]
    fn sgemm_rowmajor<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
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

    /// `sample_classes` below the trivial case: the design is in cuda/sampling.cu's header.
    fn sample_on_device(
        &self,
        args: &SampleArgs,
        labels: &mut CudaSlice<i32>,
        scores: Option<&CudaSlice<f32>>,
        keys: &mut CudaSlice<u64>,
        sampled: &mut CudaSlice<i32>,
        scratch: &mut SampleScratch,
    ) -> Result<usize> {
        let shard = args.shard_len;
        let shard_i = i32_of(shard, "shard_len")?;
        let rows_i = i32_of(args.rows, "rows")?;
        let capacity = sampled.len().min(shard);
        let capacity_i = i32_of(capacity, "sampled capacity")?;
        let hard_possible = scores.is_some() && args.hard_fraction > 0.0;
        let init = |s: &mut SampleScratch, k: u64, reset: i32| -> Result<()> {
            launch!(
                self,
                "sampling_init",
                single_block(1024),
                &mut s.state,
                &mut s.hist,
                &k,
                &reset
            );
            Ok(())
        };
        let num_sample = args.num_sample as u64;
        launch!(
            self,
            "random_keys",
            Self::select_grid(shard),
            &mut *keys,
            &shard_i,
            &args.shard_start,
            &args.seed,
            &args.step,
            &mut scratch.hist
        );
        // With hard negatives the first digit is picked later, over the final keys.
        let select_first = i32::from(!hard_possible);
        let force_cfg = LaunchConfig {
            grid_dim: (args.rows.div_ceil(SELECT_THREADS).max(1) as u32, 1, 1),
            block_dim: (SELECT_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "force_positives",
            force_cfg,
            &*labels,
            &rows_i,
            &mut *keys,
            &mut scratch.state,
            &mut scratch.hist,
            &num_sample,
            &select_first
        );
        // With hard negatives: their keys in place, and the distinct positives.
        let hard_positives = if hard_possible {
            // The hard share depends on the positives: one 8-byte download.
            let positives = self
                .read_back(&scratch.state.slice(STATE_POSITIVES..STATE_POSITIVES + 1))?[0]
                as usize;
            let fill = args.num_sample.saturating_sub(positives);
            let hard = ((args.hard_fraction as f64 * fill as f64).round() as usize).min(fill);
            if let (Some(scores), true) = (scores, hard > 0) {
                need(scores, shard, "sample_classes scores")?;
                launch!(
                    self,
                    "score_keys",
                    per_elem(shard),
                    &mut *keys,
                    scores,
                    &shard_i
                );
                init(scratch, (positives + hard) as u64, 0)?;
                self.radix_passes(keys, shard, &ALL_DIGITS, scratch)?;
                launch!(
                    self,
                    "promote_chosen",
                    per_elem(shard),
                    &mut *keys,
                    &shard_i,
                    &scratch.state,
                    &args.shard_start,
                    &args.seed,
                    &args.step
                );
            }
            Some(positives)
        } else {
            None
        };
        let blocks = shard.div_ceil(SCAN_BLOCK);
        if scratch.counts.len() < blocks {
            scratch.counts = self.alloc::<u64>(blocks)?;
        }
        let scan_cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (SCAN_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        if let Some(positives) = hard_positives {
            init(scratch, args.num_sample.max(positives) as u64, 0)?;
            self.radix_passes(keys, shard, &HIGH_DIGITS, scratch)?;
            // Its last block scans the block counts.
            launch!(
                self,
                "count_selected",
                scan_cfg,
                &*keys,
                &shard_i,
                &mut scratch.state,
                &mut scratch.counts
            );
        } else {
            // The first digit was picked by force_positives; the other two from the keys of its
            // bin (sampling.cu, header step 4).
            let list_len = self
                .sampler_candidates
                .unwrap_or_else(|| candidate_capacity(shard, args.rows));
            if scratch.candidates.len() < list_len.max(1) {
                scratch.candidates = self.alloc::<u64>(list_len.max(1))?;
            }
            let list_len_i = i32_of(list_len, "sampler candidates")?;
            scratch.list_len = Some(list_len);
            // Its last block picks the two digits from the list and scans the block counts.
            launch!(
                self,
                "collect_candidates",
                scan_cfg,
                &*keys,
                &shard_i,
                &mut scratch.state,
                &mut scratch.counts,
                &mut scratch.candidates,
                &list_len_i,
                &mut scratch.hist
            );
        }
        // Its last block remaps the labels, unless there are many.
        launch!(
            self,
            "compact_selected",
            scan_cfg,
            &*keys,
            &shard_i,
            &mut scratch.state,
            &scratch.counts,
            &mut *sampled,
            &capacity_i,
            &mut *labels,
            &rows_i
        );
        if args.rows > REMAP_IN_LAST_BLOCK {
            launch!(
                self,
                "remap_labels",
                per_elem(args.rows),
                labels,
                &rows_i,
                &*sampled,
                &scratch.state,
                &capacity_i
            );
        }
        // The one host sync of the plain sampler.
        let n =
            self.read_back(&scratch.state.slice(STATE_SELECTED..STATE_SELECTED + 1))?[0] as usize;
        if n > capacity {
            return Err(PfcError::Shape(format!(
                "sample_classes: {n} classes selected (the distinct positives exceed the sample), \
                 but the sampled buffer holds {capacity}"
            )));
        }
        if n < args.num_sample {
            return Err(PfcError::Device(format!(
                "sampler selected {n} classes, at least {} expected (radix select invariant broken)",
                args.num_sample
            )));
        }
        Ok(n)
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

    /// The cast kernel and cuBLAS type of this backend's 16-bit precision; an error in f32.
    fn half_types(&self) -> Result<(&'static str, cudaDataType, i32)> {
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
    fn operand_buffer<'s>(
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

    fn alloc_operand(&self, len: usize) -> Result<CudaSlice<u16>> {
        self.stream.alloc_zeros::<u16>(len.max(1)).map_err(|e| {
            PfcError::Device(format!(
                "allocating {} bytes for a 16-bit GEMM operand: {e:?}",
                2 * len.max(1)
            ))
        })
    }

    /// Rounds the first `len` elements of `src` into `dst` with `kernel` (cuda/precision.cu).
    fn cast_into(
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

    /// Grid of the histogram passes: enough blocks of 1024 threads to fill the device, each
    /// walking several keys.
    fn select_grid(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(SELECT_THREADS * 8).clamp(1, 264) as u32, 1, 1),
            block_dim: (SELECT_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Radix passes over the digits `(shift, bits)` (MSB first) of the keys that agree with the
    /// prefix in `state[0]`; each pass's last block extends the prefix (sampling.cu).
    fn radix_passes(
        &self,
        keys: &CudaSlice<u64>,
        n: usize,
        digits: &[(i32, i32)],
        scratch: &mut SampleScratch,
    ) -> Result<()> {
        let n_i = i32_of(n, "shard_len")?;
        for &(shift, bits) in digits {
            launch!(
                self,
                "radix_pass",
                Self::select_grid(n),
                keys,
                &n_i,
                &mut scratch.state,
                &shift,
                &bits,
                &mut scratch.hist
            );
        }
        Ok(())
    }

    /// For tests: the keys the last plain `sample_classes` put on its candidate list, and the
    /// list's length (more keys than that took the slow path); `None` before any such call.
    pub(crate) fn candidates_seen(&self) -> Result<Option<(u64, usize)>> {
        let guard = self
            .sample_scratch
            .lock()
            .map_err(|_| PfcError::Device("sampler scratch lock poisoned".into()))?;
        let Some((scratch, list_len)) = guard.as_ref().and_then(|s| Some((s, s.list_len?))) else {
            return Ok(None);
        };
        let word = STATE_LAST_CANDIDATES;
        let seen = self.read_back(&scratch.state.slice(word..word + 1))?[0];
        Ok(Some((seen, list_len)))
    }

    /// The select state and histogram of `sample_classes`, allocated once per backend.
    fn take_scratch(&self) -> Result<SampleScratch> {
        let cached = self.sample_scratch.lock().ok().and_then(|mut s| s.take());
        match cached {
            Some(s) => Ok(s),
            None => Ok(SampleScratch {
                state: self.alloc::<u64>(SELECT_STATE)?,
                hist: self.alloc::<u32>(SELECT_BINS)?,
                counts: self.alloc::<u64>(1)?,
                candidates: self.alloc::<u64>(1)?,
                list_len: None,
            }),
        }
    }
}

/// The 16-bit copies of the step's GEMM operands, kept for the backend's life: `a` receives each
/// GEMM's `a` argument, `b` its `b` (the sizes of `StepShape::gemm_operand_lens`).
#[derive(Default)]
pub(crate) struct GemmOperands {
    a: Option<CudaSlice<u16>>,
    b: Option<CudaSlice<u16>>,
    /// What `a` and `b` hold when the last GEMM was `gemm_nt16`: the device address and length
    /// of the f32 `x̂` and `ŵ` it cast. `gemm_backward16` reuses the copies only if they are of
    /// the very buffers it is given; every other GEMM clears it.
    forward: Option<(u64, usize, u64, usize)>,
}

impl GemmOperands {
    /// Bytes held.
    fn bytes(&self) -> u64 {
        let len = |s: &Option<CudaSlice<u16>>| s.as_ref().map_or(0, |b| b.len() as u64);
        2 * (len(&self.a) + len(&self.b))
    }
}

/// Device scratch of the sampler (sampling.cu): select state words, digit histogram, block
/// counts, and the candidate list of the plain sampler.
pub(crate) struct SampleScratch {
    state: CudaSlice<u64>,
    hist: CudaSlice<u32>,
    counts: CudaSlice<u64>,
    candidates: CudaSlice<u64>,
    /// The candidate list's length in the last plain call (`None` before one).
    list_len: Option<usize>,
}

impl Backend for CudaBackend {
    type Buf<T: Elem> = CudaSlice<T>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return self.stream.null().map_err(dev("alloc"));
        }
        self.stream.alloc_zeros(len).map_err(|e| {
            PfcError::Device(format!(
                "allocating {} bytes on the GPU: {e:?}",
                len * std::mem::size_of::<T>()
            ))
        })
    }

    fn len<T: Elem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn upload_at<T: Elem>(&self, host: &[T], dst: &mut CudaSlice<T>, offset: usize) -> Result<()> {
        need(dst, offset.saturating_add(host.len()), "upload")?;
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, &mut dst.slice_mut(offset..offset + host.len()))
            .map_err(dev("upload"))
    }

    fn download_at<T: Elem>(
        &self,
        src: &CudaSlice<T>,
        offset: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        need(src, offset.saturating_add(len), "download_at")?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.read_back(&src.slice(offset..offset + len))
    }

    fn copy<T: Elem>(&self, src: &CudaSlice<T>, dst: &mut CudaSlice<T>, len: usize) -> Result<()> {
        need(src, len, "copy source")?;
        need(dst, len, "copy destination")?;
        if len == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(&src.slice(..len), &mut dst.slice_mut(..len))
            .map_err(dev("copy"))
    }

    fn zero<T: Elem>(&self, buf: &mut CudaSlice<T>, len: usize) -> Result<()> {
        need(buf, len, "zero")?;
        if len == 0 {
            return Ok(());
        }
        self.stream
            .memset_zeros(&mut buf.slice_mut(..len))
            .map_err(dev("zero"))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev("synchronize"))
    }

    fn set_gemm_precision(&mut self, precision: Precision) -> Result<()> {
        self.precision = precision;
        Ok(())
    }

    /// Exactly `a_len` and `b_len` elements (the planner's sizes), replacing what was held.
    fn reserve_gemm_operands(&mut self, a_len: usize, b_len: usize) -> Result<()> {
        let a = (a_len > 0).then(|| self.alloc_operand(a_len)).transpose()?;
        let b = (b_len > 0).then(|| self.alloc_operand(b_len)).transpose()?;
        let held = self
            .gemm_operands
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *held = GemmOperands {
            a,
            b,
            forward: None,
        };
        Ok(())
    }

    fn gemm_operand_bytes(&self) -> u64 {
        match self.gemm_operands.lock() {
            Ok(held) => held.bytes(),
            Err(poisoned) => poisoned.into_inner().bytes(),
        }
    }

    fn localize_labels(
        &self,
        global: &CudaSlice<i64>,
        rows: usize,
        shard_start: u64,
        shard_len: usize,
        local: &mut CudaSlice<i32>,
    ) -> Result<()> {
        need(global, rows, "localize_labels global")?;
        need(local, rows, "localize_labels local")?;
        // Local ids are int: a larger shard would truncate them (as on the CPU).
        i32_of(shard_len, "localize_labels: shard_len")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, len_u) = (i32_of(rows, "rows")?, shard_len as u64);
        launch!(
            self,
            "localize_labels",
            per_elem(rows),
            global,
            &rows_i,
            &shard_start,
            &len_u,
            local
        );
        Ok(())
    }

    fn sample_classes(
        &self,
        args: &SampleArgs,
        labels: &mut CudaSlice<i32>,
        scores: Option<&CudaSlice<f32>>,
        keys: &mut CudaSlice<u64>,
        sampled: &mut CudaSlice<i32>,
    ) -> Result<usize> {
        let shard = args.shard_len;
        let shard_i = i32_of(shard, "shard_len")?;
        need(labels, args.rows, "sample_classes labels")?;
        if args.num_sample >= shard {
            need(sampled, shard, "sample_classes sampled")?;
            if shard > 0 {
                launch!(self, "iota", per_elem(shard), sampled, &shard_i);
            }
            return Ok(shard);
        }
        need(keys, shard, "sample_classes keys")?;
        need(sampled, args.num_sample, "sample_classes sampled")?;
        let mut scratch = self.take_scratch()?;
        let result = self.sample_on_device(args, labels, scores, keys, sampled, &mut scratch);
        // The kernels leave the scratch zeroed for the next call, unless the call failed midway.
        if result.is_ok() {
            if let Ok(mut slot) = self.sample_scratch.lock() {
                *slot = Some(scratch);
            }
        }
        result
    }

    fn class_max_cosine(
        &self,
        weight: &CudaSlice<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &CudaSlice<f32>,
        row_labels: &CudaSlice<i64>,
        rows: usize,
        chunk_weights: &mut CudaSlice<f32>,
        chunk_cosines: &mut CudaSlice<f32>,
        scores: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(weight, [shard_len, dim], "class_max_cosine weight")?;
        need(row_labels, rows, "class_max_cosine row_labels")?;
        need_product(x_hat, [rows, dim], "class_max_cosine x_hat")?;
        need(scores, shard_len, "class_max_cosine scores")?;
        if shard_len == 0 || rows == 0 || dim == 0 {
            return Ok(());
        }
        let chunk = (chunk_weights.len() / dim)
            .min(chunk_cosines.len() / rows)
            .max(1);
        need_product(
            chunk_weights,
            [chunk.min(shard_len), dim],
            "class_max_cosine chunk_weights",
        )?;
        need_product(
            chunk_cosines,
            [chunk.min(shard_len), rows],
            "class_max_cosine chunk_cosines",
        )?;
        let rows_i = i32_of(rows, "rows")?;
        for start in (0..shard_len).step_by(chunk) {
            let len = chunk.min(shard_len - start);
            let len_i = len as i32;
            let mut out = scores.slice_mut(start..start + len);
            self.score_class_chunk(
                weight,
                start..start + len,
                dim,
                x_hat,
                rows,
                chunk_weights,
                chunk_cosines,
                CosineLayout::ClassesByRows,
            )?;
            launch!(
                self,
                "row_max_into",
                per_row(len),
                &*chunk_cosines,
                row_labels,
                &len_i,
                &rows_i,
                &mut out
            );
        }
        Ok(())
    }

    fn class_top_k(
        &self,
        weight: &CudaSlice<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        chunk_weights: &mut CudaSlice<f32>,
        chunk_cosines: &mut CudaSlice<f32>,
        top_scores: &mut CudaSlice<f32>,
        top_ids: &mut CudaSlice<i32>,
    ) -> Result<()> {
        crate::cpu::top_k::check_k(k)?;
        need_product(weight, [shard_len, dim], "class_top_k weight")?;
        need_product(x_hat, [rows, dim], "class_top_k x_hat")?;
        need_product(top_scores, [rows, k], "class_top_k top_scores")?;
        need_product(top_ids, [rows, k], "class_top_k top_ids")?;
        i32_of(shard_len, "shard_len")?;
        let chunk = crate::cpu::top_k::chunk_len(
            chunk_weights.len(),
            chunk_cosines.len(),
            dim,
            rows,
            shard_len,
        );
        need_product(chunk_weights, [chunk, dim], "class_top_k chunk_weights")?;
        need_product(chunk_cosines, [chunk, rows], "class_top_k chunk_cosines")?;
        self.upload_at(&vec![f32::NEG_INFINITY; rows * k], top_scores, 0)?;
        self.upload_at(&vec![-1i32; rows * k], top_ids, 0)?;
        if shard_len == 0 || rows == 0 || dim == 0 {
            return Ok(());
        }
        let k_i = i32_of(k, "k")?;
        for start in (0..shard_len).step_by(chunk) {
            let len = chunk.min(shard_len - start);
            let (len_i, start_i) = (len as i32, start as i32);
            self.score_class_chunk(
                weight,
                start..start + len,
                dim,
                x_hat,
                rows,
                chunk_weights,
                chunk_cosines,
                CosineLayout::RowsByClasses,
            )?;
            launch!(
                self,
                "top_k_merge",
                per_row(rows),
                &*chunk_cosines,
                &len_i,
                &start_i,
                &k_i,
                &mut *top_scores,
                &mut *top_ids
            );
        }
        Ok(())
    }

    fn unpack_normalize_f32(
        &self,
        packed: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        labels: &mut CudaSlice<i64>,
        x_hat: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(
            packed,
            [rows, dim.saturating_add(2)],
            "unpack_normalize_f32 packed",
        )?;
        need(labels, rows, "unpack_normalize_f32 labels")?;
        need_product(x_hat, [rows, dim], "unpack_normalize_f32 x_hat")?;
        need(norms, rows, "unpack_normalize_f32 norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "unpack_normalize_f32",
            per_warp_row(rows),
            packed,
            &rows_i,
            &dim_i,
            labels,
            x_hat,
            norms
        );
        Ok(())
    }

    fn gather_normalize_rows(
        &self,
        weight: &CudaSlice<f32>,
        dim: usize,
        index: &CudaSlice<i32>,
        count: usize,
        out: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(index, count, "gather_normalize_rows index")?;
        need_product(out, [count, dim], "gather_normalize_rows out")?;
        need(norms, count, "gather_normalize_rows norms")?;
        if count == 0 {
            return Ok(());
        }
        let (dim_i, count_i) = (i32_of(dim, "dim")?, i32_of(count, "count")?);
        launch!(
            self,
            "gather_normalize_rows",
            per_warp_row(count),
            weight,
            &dim_i,
            index,
            &count_i,
            out,
            norms
        );
        Ok(())
    }

    fn pack_embeddings(
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

    fn unpack_normalize(
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

    fn cast_to_wire(
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

    fn cast_from_wire(
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

    fn normalize_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        out: &mut CudaSlice<f32>,
        norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need_product(x, [rows, dim], "normalize_rows x")?;
        need_product(out, [rows, dim], "normalize_rows out")?;
        need(norms, rows, "normalize_rows norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "normalize_rows",
            per_warp_row(rows),
            x,
            &rows_i,
            &dim_i,
            out,
            norms
        );
        Ok(())
    }

    fn gemm_nt(
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

    fn gemm_nn(
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

    fn gemm_tn(
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

    fn gemm_backward(
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

    fn margin_rowmax(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
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
            row_max,
            target_cos
        );
        Ok(())
    }

    fn exp_rowsum(
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

    fn softmax_loss_grad(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
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
            row_max,
            row_sum,
            target_cos,
            &grad_scale,
            row_loss
        );
        Ok(())
    }

    fn margin_softmax_fused(
        &self,
        logits: &mut CudaSlice<f32>,
        shape: LogitsShape,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(logits, shape.len()?, "margin_softmax_fused logits")?;
        need(labels, shape.rows, "margin_softmax_fused labels")?;
        need(row_loss, shape.rows, "margin_softmax_fused row_loss")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
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
            &grad_scale,
            row_loss
        );
        Ok(())
    }

    fn logits_dtype(&self) -> Dtype {
        match self.precision {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::Bf16,
            Precision::F16 => Dtype::F16,
        }
    }

    fn gemm_nt16(
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

    fn gemm_backward16(
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

    fn margin_rowmax16(
        &self,
        cos: &CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
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
            row_max,
            target_cos
        );
        Ok(())
    }

    fn exp_rowsum16(
        &self,
        cos: &CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
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
            row_max,
            row_sum
        );
        Ok(())
    }

    fn softmax_loss_grad16(
        &self,
        cos: &mut CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
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
            row_max,
            row_sum,
            target_cos,
            &grad_scale,
            row_loss
        );
        Ok(())
    }

    fn margin_softmax_fused16(
        &self,
        cos: &mut CudaSlice<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let kind = half_kind(dtype, "margin_softmax_fused16")?;
        need(cos, shape.len()?, "margin_softmax_fused16 cos")?;
        need(labels, shape.rows, "margin_softmax_fused16 labels")?;
        need(row_loss, shape.rows, "margin_softmax_fused16 row_loss")?;
        if shape.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, ld_i, p) = softmax_args(shape, margin)?;
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
            &grad_scale,
            row_loss
        );
        Ok(())
    }

    fn normalize_backward(
        &self,
        grad: &mut CudaSlice<f32>,
        x_hat: &CudaSlice<f32>,
        norms: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        need_product(grad, [rows, dim], "normalize_backward grad")?;
        need_product(x_hat, [rows, dim], "normalize_backward x_hat")?;
        need(norms, rows, "normalize_backward norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "normalize_backward",
            per_warp_row(rows),
            grad,
            x_hat,
            norms,
            &rows_i,
            &dim_i
        );
        Ok(())
    }

    fn scatter_rows(
        &self,
        rows: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        dense: &mut CudaSlice<f32>,
        shard_len: usize,
    ) -> Result<()> {
        need_product(rows, [count, dim], "scatter_rows rows")?;
        need(index, count, "scatter_rows index")?;
        need_product(dense, [shard_len, dim], "scatter_rows dense")?;
        self.zero(dense, shard_len * dim)?;
        if count == 0 {
            return Ok(());
        }
        let (count_i, dim_i) = (i32_of(count, "count")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "scatter_rows",
            per_row(count),
            rows,
            index,
            &count_i,
            &dim_i,
            dense
        );
        Ok(())
    }

    fn sgd_momentum_sparse(
        &self,
        weight: &mut CudaSlice<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        need_product(grad, [count, dim], "sgd_momentum_sparse grad")?;
        need(index, count, "sgd_momentum_sparse index")?;
        momentum.need(self, self.len(weight), "sgd_momentum_sparse")?;
        if count == 0 {
            return Ok(());
        }
        let (count_i, dim_i) = (i32_of(count, "count")?, i32_of(dim, "dim")?);
        let cfg = per_row(count);
        macro_rules! sparse {
            ($name:literal, $v:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    weight,
                    $v,
                    grad,
                    index,
                    &count_i,
                    &dim_i,
                    &lr,
                    &mu,
                    &weight_decay
                )
            };
        }
        match momentum {
            StateBuf::F32(v) => sparse!("sgd_momentum_sparse", v),
            StateBuf::Bf16(v) => sparse!("sgd_momentum_sparse_bf16", v),
        }
        Ok(())
    }

    fn sgd_momentum_dense(
        &self,
        weight: &mut CudaSlice<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        len: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        need(weight, len, "sgd_momentum_dense weight")?;
        momentum.need(self, len, "sgd_momentum_dense")?;
        need(grad, len, "sgd_momentum_dense grad")?;
        if len == 0 {
            return Ok(());
        }
        let len_u = len as u64;
        let cfg = grid_stride(len);
        macro_rules! dense {
            ($name:literal, $v:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    weight,
                    $v,
                    grad,
                    &len_u,
                    &lr,
                    &mu,
                    &weight_decay
                )
            };
        }
        match momentum {
            StateBuf::F32(v) => dense!("sgd_momentum_dense", v),
            StateBuf::Bf16(v) => dense!("sgd_momentum_dense_bf16", v),
        }
        Ok(())
    }

    fn supports_adamw(&self) -> bool {
        true
    }

    fn adamw_sparse(
        &self,
        weight: &mut CudaSlice<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        step: AdamWStep,
    ) -> Result<()> {
        need_product(grad, [count, dim], "adamw_sparse grad")?;
        need(index, count, "adamw_sparse index")?;
        exp_avg.need(self, self.len(weight), "adamw_sparse exp_avg")?;
        exp_avg_sq.need(self, self.len(weight), "adamw_sparse exp_avg_sq")?;
        if count == 0 {
            return Ok(());
        }
        let (count_i, dim_i) = (i32_of(count, "count")?, i32_of(dim, "dim")?);
        let cfg = per_row(count);
        let s = step.scalars();
        macro_rules! sparse {
            ($name:literal, $m:expr, $v:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    weight,
                    $m,
                    $v,
                    grad,
                    index,
                    &count_i,
                    &dim_i,
                    &s.decay,
                    &s.beta1,
                    &s.beta2,
                    &s.step_size,
                    &s.inv_sqrt_bias2,
                    &s.eps,
                    &s.seed,
                    &s.t
                )
            };
        }
        match (exp_avg, exp_avg_sq) {
            (StateBuf::F32(m), StateBuf::F32(v)) => sparse!("adamw_sparse_f32", m, v),
            (StateBuf::Bf16(m), StateBuf::Bf16(v)) => sparse!("adamw_sparse_bf16", m, v),
            _ => return Err(crate::backend::mixed_moments()),
        }
        Ok(())
    }

    fn adamw_dense(
        &self,
        weight: &mut CudaSlice<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &CudaSlice<f32>,
        len: usize,
        step: AdamWStep,
    ) -> Result<()> {
        need(weight, len, "adamw_dense weight")?;
        exp_avg.need(self, len, "adamw_dense exp_avg")?;
        exp_avg_sq.need(self, len, "adamw_dense exp_avg_sq")?;
        need(grad, len, "adamw_dense grad")?;
        if len == 0 {
            return Ok(());
        }
        let len_u = len as u64;
        let cfg = grid_stride(len);
        let s = step.scalars();
        macro_rules! dense {
            ($name:literal, $m:expr, $v:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    weight,
                    $m,
                    $v,
                    grad,
                    &len_u,
                    &s.decay,
                    &s.beta1,
                    &s.beta2,
                    &s.step_size,
                    &s.inv_sqrt_bias2,
                    &s.eps,
                    &s.seed,
                    &s.t
                )
            };
        }
        match (exp_avg, exp_avg_sq) {
            (StateBuf::F32(m), StateBuf::F32(v)) => dense!("adamw_dense_f32", m, v),
            (StateBuf::Bf16(m), StateBuf::Bf16(v)) => dense!("adamw_dense_bf16", m, v),
            _ => return Err(crate::backend::mixed_moments()),
        }
        Ok(())
    }
}
