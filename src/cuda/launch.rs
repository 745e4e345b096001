//! `impl Backend for CudaBackend`: argument checks, launch shapes and cuBLAS calls. The kernels
//! themselves live in `cuda/*.cu` under the same names as their CPU references.

use super::{dev, CudaBackend};
use crate::backend::{Backend, Elem, SampleArgs};
use crate::config::MarginParams;
use crate::error::{PfcError, Result};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

/// Threads per block of the row kernels (one block per row).
const ROW_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels.
const ELEM_THREADS: u32 = 256;
/// Classes per block of the compaction (SCAN_BLOCK in sampling.cu).
const SCAN_BLOCK: usize = 1024;

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

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| PfcError::Shape(format!("{what} = {v} exceeds i32::MAX")))
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

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn per_elem(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(ELEM_THREADS as usize).max(1) as u32, 1, 1),
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

    /// The k-th largest key (device-side state: threshold in `state[0]`).
    fn radix_select(
        &self,
        keys: &CudaSlice<u64>,
        n: usize,
        k: usize,
        state: &mut CudaSlice<u64>,
        hist: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let n_i = i32_of(n, "shard_len")?;
        let k_u = k as u64;
        launch!(
            self,
            "radix_select_init",
            single_block(256),
            &mut *state,
            &mut *hist,
            &k_u
        );
        let blocks = n.div_ceil(ELEM_THREADS as usize).clamp(1, 1024);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ELEM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        for digit in (0..8).rev() {
            let shift: i32 = digit * 8;
            launch!(
                self,
                "radix_histogram",
                cfg,
                keys,
                &n_i,
                &*state,
                &shift,
                &mut *hist
            );
            launch!(
                self,
                "radix_select_digit",
                single_block(256),
                &mut *state,
                &shift,
                &mut *hist
            );
        }
        Ok(())
    }
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
        need(dst, offset + host.len(), "upload")?;
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, &mut dst.slice_mut(offset..offset + host.len()))
            .map_err(dev("upload"))
    }

    fn download<T: Elem>(&self, src: &CudaSlice<T>, len: usize) -> Result<Vec<T>> {
        need(src, len, "download")?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(&src.slice(..len))
            .map_err(dev("download"))
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
        let rows_i = i32_of(args.rows, "rows")?;
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
        launch!(
            self,
            "random_keys",
            per_elem(shard),
            &mut *keys,
            &shard_i,
            &args.shard_start,
            &args.seed,
            &args.step
        );
        // The number of distinct positives decides the sample size: count them on the host
        // (the gathered batch is small next to the shard).
        let mut positives: Vec<i32> = self
            .download(labels, args.rows)?
            .into_iter()
            .filter(|&l| l >= 0)
            .collect();
        positives.sort_unstable();
        positives.dedup();
        let positives = positives.len();
        need(sampled, positives, "sample_classes sampled")?;
        if args.rows > 0 {
            launch!(
                self,
                "force_positives",
                per_elem(args.rows),
                &*labels,
                &rows_i,
                &mut *keys
            );
        }
        let mut state = self.alloc::<u64>(2)?;
        let mut hist = self.alloc::<u32>(256)?;
        let total = if positives >= args.num_sample {
            positives
        } else {
            let fill = args.num_sample - positives;
            let hard = match scores {
                Some(_) => ((args.hard_fraction as f64 * fill as f64).round() as usize).min(fill),
                None => 0,
            };
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
                self.radix_select(keys, shard, positives + hard, &mut state, &mut hist)?;
                launch!(
                    self,
                    "promote_chosen",
                    per_elem(shard),
                    &mut *keys,
                    &shard_i,
                    &state,
                    &args.shard_start,
                    &args.seed,
                    &args.step
                );
            }
            args.num_sample
        };
        self.radix_select(keys, shard, total, &mut state, &mut hist)?;
        let blocks = shard.div_ceil(SCAN_BLOCK);
        let blocks_i = i32_of(blocks, "blocks")?;
        let mut counts = self.alloc::<u32>(blocks + 1)?;
        let scan_cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (SCAN_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "count_selected",
            scan_cfg,
            &*keys,
            &shard_i,
            &state,
            &mut counts
        );
        launch!(
            self,
            "scan_block_counts",
            single_block(1024),
            &mut counts,
            &blocks_i
        );
        launch!(
            self,
            "compact_selected",
            scan_cfg,
            &*keys,
            &shard_i,
            &state,
            &counts,
            &mut *sampled
        );
        let n = self
            .stream
            .clone_dtoh(&counts.slice(blocks..blocks + 1))
            .map_err(dev("download"))?[0] as usize;
        if n != total {
            return Err(PfcError::Device(format!(
                "sampler selected {n} classes, {total} expected (radix select invariant broken)"
            )));
        }
        if args.rows > 0 {
            let n_i = n as i32;
            launch!(
                self,
                "remap_labels",
                per_elem(args.rows),
                labels,
                &rows_i,
                &*sampled,
                &n_i
            );
        }
        Ok(n)
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
        need(weight, shard_len * dim, "class_max_cosine weight")?;
        need(row_labels, rows, "class_max_cosine row_labels")?;
        need(x_hat, rows * dim, "class_max_cosine x_hat")?;
        need(scores, shard_len, "class_max_cosine scores")?;
        if shard_len == 0 || rows == 0 || dim == 0 {
            return Ok(());
        }
        let chunk = (chunk_weights.len() / dim)
            .min(chunk_cosines.len() / rows)
            .max(1);
        need(
            chunk_weights,
            chunk.min(shard_len) * dim,
            "class_max_cosine chunk_weights",
        )?;
        need(
            chunk_cosines,
            chunk.min(shard_len) * rows,
            "class_max_cosine chunk_cosines",
        )?;
        let mut norms = self.alloc::<f32>(chunk)?;
        let (dim_i, rows_i) = (i32_of(dim, "dim")?, i32_of(rows, "rows")?);
        for start in (0..shard_len).step_by(chunk) {
            let len = chunk.min(shard_len - start);
            let len_i = len as i32;
            let w = weight.slice(start * dim..(start + len) * dim);
            launch!(
                self,
                "normalize_rows",
                per_row(len),
                &w,
                &len_i,
                &dim_i,
                &mut *chunk_weights,
                &mut norms
            );
            // cosines[len × rows] = chunk_weights[len × dim] · x_hatᵀ
            self.sgemm_rowmajor(
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                len,
                rows,
                dim,
                x_hat,
                dim,
                &*chunk_weights,
                dim,
                &mut *chunk_cosines,
            )?;
            let mut out = scores.slice_mut(start..start + len);
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
        need(out, count * dim, "gather_normalize_rows out")?;
        need(norms, count, "gather_normalize_rows norms")?;
        if count == 0 {
            return Ok(());
        }
        let (dim_i, count_i) = (i32_of(dim, "dim")?, i32_of(count, "count")?);
        launch!(
            self,
            "gather_normalize_rows",
            per_row(count),
            weight,
            &dim_i,
            index,
            &count_i,
            out,
            norms
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
        need(x, rows * dim, "normalize_rows x")?;
        need(out, rows * dim, "normalize_rows out")?;
        need(norms, rows, "normalize_rows norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "normalize_rows",
            per_row(rows),
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
        need(a, m * k, "gemm_nt a")?;
        need(b, n * k, "gemm_nt b")?;
        need(c, m * n, "gemm_nt c")?;
        // cᵀ[n×m] = b[n×k] · aᵀ: b is col-major k×n (op T), a is col-major k×m (op N).
        self.sgemm_rowmajor(CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, b, k, a, k, c)
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
        need(a, m * k, "gemm_nn a")?;
        need(b, k * n, "gemm_nn b")?;
        need(c, m * n, "gemm_nn c")?;
        // cᵀ = bᵀ · aᵀ: b is col-major n×k (op N, ld n), a is col-major k×m (op N, ld k).
        self.sgemm_rowmajor(CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, b, n, a, k, c)
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
        need(a, k * m, "gemm_tn a")?;
        need(b, k * n, "gemm_tn b")?;
        need(c, m * n, "gemm_tn c")?;
        // cᵀ = bᵀ · a: b is col-major n×k (op N, ld n), a is col-major m×k (op T, ld m).
        self.sgemm_rowmajor(CUBLAS_OP_N, CUBLAS_OP_T, m, n, k, b, n, a, m, c)
    }

    fn margin_rowmax(
        &self,
        logits: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_max: &mut CudaSlice<f32>,
        target_cos: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(logits, rows * cols, "margin_rowmax logits")?;
        need(labels, rows, "margin_rowmax labels")?;
        need(row_max, rows, "margin_rowmax row_max")?;
        need(target_cos, rows, "margin_rowmax target_cos")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, p) = (
            i32_of(rows, "rows")?,
            i32_of(cols, "cols")?,
            MarginArgs::from(margin),
        );
        launch!(
            self,
            "margin_rowmax",
            per_row(rows),
            logits,
            &rows_i,
            &cols_i,
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
        rows: usize,
        cols: usize,
        row_max: &CudaSlice<f32>,
        row_sum: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(logits, rows * cols, "exp_rowsum logits")?;
        need(row_max, rows, "exp_rowsum row_max")?;
        need(row_sum, rows, "exp_rowsum row_sum")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i) = (i32_of(rows, "rows")?, i32_of(cols, "cols")?);
        launch!(
            self,
            "exp_rowsum",
            per_row(rows),
            logits,
            &rows_i,
            &cols_i,
            row_max,
            row_sum
        );
        Ok(())
    }

    fn softmax_loss_grad(
        &self,
        logits: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        labels: &CudaSlice<i32>,
        margin: &MarginParams,
        row_max: &CudaSlice<f32>,
        row_sum: &CudaSlice<f32>,
        target_cos: &CudaSlice<f32>,
        grad_scale: f32,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need(logits, rows * cols, "softmax_loss_grad logits")?;
        need(labels, rows, "softmax_loss_grad labels")?;
        need(row_loss, rows, "softmax_loss_grad row_loss")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, p) = (
            i32_of(rows, "rows")?,
            i32_of(cols, "cols")?,
            MarginArgs::from(margin),
        );
        launch!(
            self,
            "softmax_loss_grad",
            per_row(rows),
            logits,
            &rows_i,
            &cols_i,
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

    fn normalize_backward(
        &self,
        grad: &mut CudaSlice<f32>,
        x_hat: &CudaSlice<f32>,
        norms: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        need(grad, rows * dim, "normalize_backward grad")?;
        need(x_hat, rows * dim, "normalize_backward x_hat")?;
        need(norms, rows, "normalize_backward norms")?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, dim_i) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "normalize_backward",
            per_row(rows),
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
        need(rows, count * dim, "scatter_rows rows")?;
        need(index, count, "scatter_rows index")?;
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
        momentum: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        count: usize,
        dim: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        need(grad, count * dim, "sgd_momentum_sparse grad")?;
        need(index, count, "sgd_momentum_sparse index")?;
        if count == 0 {
            return Ok(());
        }
        let (count_i, dim_i) = (i32_of(count, "count")?, i32_of(dim, "dim")?);
        launch!(
            self,
            "sgd_momentum_sparse",
            per_row(count),
            weight,
            momentum,
            grad,
            index,
            &count_i,
            &dim_i,
            &lr,
            &mu,
            &weight_decay
        );
        Ok(())
    }

    fn sgd_momentum_dense(
        &self,
        weight: &mut CudaSlice<f32>,
        momentum: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        len: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        need(weight, len, "sgd_momentum_dense weight")?;
        need(momentum, len, "sgd_momentum_dense momentum")?;
        need(grad, len, "sgd_momentum_dense grad")?;
        if len == 0 {
            return Ok(());
        }
        let len_u = len as u64;
        let cfg = LaunchConfig {
            grid_dim: (len.div_ceil(ELEM_THREADS as usize).min(65_535) as u32, 1, 1),
            block_dim: (ELEM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "sgd_momentum_dense",
            cfg,
            weight,
            momentum,
            grad,
            &len_u,
            &lr,
            &mu,
            &weight_decay
        );
        Ok(())
    }
}
