//! The backend trait: the kernels of one Partial FC step, implemented once per device family.
//!
//! Each method is one kernel (or one GEMM). The CPU backend's implementation of each method is a
//! small reference function in `src/cpu/`, and the CUDA backend's kernel in `cuda/` carries the
//! same name, so the pair can be read side by side and tested against each other. The training
//! step itself ([`crate::PartialFc`], in `crate::layer`) is written once, generic over this trait.

use crate::config::{GemmPrecision, MarginParams};
use crate::error::{PfcError, Result};
use crate::plan::Dtype;

mod logits_shape;
pub use logits_shape::{LogitsShape, LOGITS_ROW_ALIGN};

/// The error of a default method that a backend does not implement.
fn unsupported(backend: &str, what: &str) -> PfcError {
    PfcError::BackendUnavailable(format!("the {backend} backend has no {what}"))
}

/// Element types that buffers hold.
#[cfg(not(feature = "cuda"))]
pub trait Elem: Copy + Default + Send + Sync + std::fmt::Debug + 'static {}
/// Element types that buffers hold (device-representable when the `cuda` feature is on).
#[cfg(feature = "cuda")]
pub trait Elem:
    Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
{
}
impl Elem for f32 {}
impl Elem for i32 {}
impl Elem for i64 {}
impl Elem for u64 {}
impl Elem for u32 {}
impl Elem for u16 {}

/// Arguments of the sampler kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleArgs {
    /// Classes in this rank's shard.
    pub shard_len: usize,
    /// Global id of the shard's first class (the generator is keyed by global class id).
    pub shard_start: u64,
    /// Target sample size before positives, `floor(r · shard)`.
    pub num_sample: usize,
    /// Rows of the gathered batch.
    pub rows: usize,
    /// Generator seed.
    pub seed: u64,
    /// Step counter (the generator's second key).
    pub step: u64,
    /// Of the negative slots, how many are filled by the highest `scores` (hard negatives).
    pub hard_fraction: f32,
}

/// An optimizer-state buffer in its storage dtype ([`crate::StateDtype`]): f32 values, or
/// bfloat16 bit patterns.
pub enum StateBuf<B: Backend + ?Sized> {
    /// f32 values.
    F32(B::Buf<f32>),
    /// bfloat16 bit patterns (the upper half of the f32 they round).
    Bf16(B::Buf<u16>),
}

impl<B: Backend> StateBuf<B> {
    /// A zeroed buffer of `len` values of `dtype`.
    pub fn alloc(backend: &B, dtype: crate::StateDtype, len: usize) -> Result<Self> {
        Ok(match dtype {
            crate::StateDtype::F32 => StateBuf::F32(backend.alloc(len)?),
            crate::StateDtype::Bf16 => StateBuf::Bf16(backend.alloc(len)?),
        })
    }

    /// Its storage dtype.
    pub fn dtype(&self) -> crate::StateDtype {
        match self {
            StateBuf::F32(_) => crate::StateDtype::F32,
            StateBuf::Bf16(_) => crate::StateDtype::Bf16,
        }
    }

    /// Number of values.
    pub fn len(&self, backend: &B) -> usize {
        match self {
            StateBuf::F32(b) => backend.len(b),
            StateBuf::Bf16(b) => backend.len(b),
        }
    }

    /// A typed error unless it holds at least `len` values (`what` names the caller).
    pub fn need(&self, backend: &B, len: usize, what: &str) -> Result<()> {
        if self.len(backend) < len {
            return Err(PfcError::Shape(format!(
                "{what}: momentum of {} values, {len} needed",
                self.len(backend)
            )));
        }
        Ok(())
    }

    /// Bytes it occupies.
    pub fn bytes(&self, backend: &B) -> u64 {
        self.len(backend) as u64 * self.dtype().bytes()
    }

    /// The first `len` values, widened to f32 (exact for bf16).
    pub fn download(&self, backend: &B, len: usize) -> Result<Vec<f32>> {
        self.download_at(backend, 0, len)
    }

    /// Values `offset .. offset + len`, widened to f32 (exact for bf16).
    pub fn download_at(&self, backend: &B, offset: usize, len: usize) -> Result<Vec<f32>> {
        match self {
            StateBuf::F32(b) => backend.download_at(b, offset, len),
            StateBuf::Bf16(b) => Ok(backend
                .download_at(b, offset, len)?
                .into_iter()
                .map(|v| half::bf16::from_bits(v).to_f32())
                .collect()),
        }
    }

    /// Uploads `values` from offset 0, rounded to the storage dtype (to nearest even).
    pub fn upload(&mut self, backend: &B, values: &[f32]) -> Result<()> {
        self.upload_at(backend, values, 0)
    }

    /// Uploads `values` from element `offset`, rounded to the storage dtype (to nearest even).
    pub fn upload_at(&mut self, backend: &B, values: &[f32], offset: usize) -> Result<()> {
        match self {
            StateBuf::F32(b) => backend.upload_at(values, b, offset),
            StateBuf::Bf16(b) => {
                // In blocks, so that a shard-sized second copy never exists on the host.
                const BLOCK: usize = 1 << 22;
                for (i, block) in values.chunks(BLOCK).enumerate() {
                    let bits: Vec<u16> = block
                        .iter()
                        .map(|&v| half::bf16::from_f32(v).to_bits())
                        .collect();
                    backend.upload_at(&bits, b, offset + i * BLOCK)?;
                }
                Ok(())
            }
        }
    }
}

/// Reduction of an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
}

/// Kernels of the Partial FC step on one device.
///
/// Shapes are row-major; `rows × cols` buffers may be longer than needed (they are allocated for
/// the worst case), only the prefix is read or written.
pub trait Backend: Send + Sync + 'static {
    /// A buffer of `T` on the device.
    type Buf<T: Elem>: Send + Sync;

    /// Short name for reports ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// A zeroed buffer of `len` elements.
    fn alloc<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    /// Number of elements of a buffer.
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// Copies `host` into `dst` starting at element `offset`.
    fn upload_at<T: Elem>(&self, host: &[T], dst: &mut Self::Buf<T>, offset: usize) -> Result<()>;
    /// Copies `host` into the start of `dst`.
    fn upload<T: Elem>(&self, host: &[T], dst: &mut Self::Buf<T>) -> Result<()> {
        self.upload_at(host, dst, 0)
    }
    /// Copies elements `offset .. offset + len` of `src` to the host. Required, with
    /// [`download`](Self::download) defined by it, so that streaming a shard through the host in
    /// blocks (checkpoints, host-side prediction) reads each block once: a range built from a
    /// prefix download would read the shard's start again for every block.
    fn download_at<T: Elem>(&self, src: &Self::Buf<T>, offset: usize, len: usize)
        -> Result<Vec<T>>;
    /// Copies the first `len` elements of `src` to the host.
    fn download<T: Elem>(&self, src: &Self::Buf<T>, len: usize) -> Result<Vec<T>> {
        self.download_at(src, 0, len)
    }
    /// Copies the first `len` elements of `src` into `dst`.
    fn copy<T: Elem>(&self, src: &Self::Buf<T>, dst: &mut Self::Buf<T>, len: usize) -> Result<()>;
    /// Sets the first `len` elements to zero.
    fn zero<T: Elem>(&self, buf: &mut Self::Buf<T>, len: usize) -> Result<()>;
    /// Waits for all queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Sets the operand precision of `gemm_nt`, `gemm_nn` and `gemm_tn` (their outputs and
    /// accumulation stay f32). A 16-bit precision also makes [`Self::logits_dtype`] that type, so
    /// the layer keeps its logits in it ([`Self::gemm_nt16`] rounds its output to it). The
    /// default accepts only [`GemmPrecision::F32`] and answers anything else with
    /// [`PfcError::Param`]: a backend that can multiply 16-bit operands overrides it. The layer
    /// calls it once, at construction.
    fn set_gemm_precision(&mut self, precision: GemmPrecision) -> Result<()> {
        match precision {
            GemmPrecision::F32 => Ok(()),
            other => Err(PfcError::param(
                "precision",
                other,
                format!("the {} backend multiplies in f32 only", self.name()),
            )),
        }
    }

    /// Allocates, once, the buffers that hold the 16-bit copies of the GEMM operands: `a_len`
    /// elements for each GEMM's `a`, `b_len` for its `b` (the sizes the planner computes,
    /// `StepShape::gemm_operand_lens`), so that no GEMM allocates. `(0, 0)` in f32. The default
    /// holds nothing and accepts only `(0, 0)`.
    fn reserve_gemm_operands(&mut self, a_len: usize, b_len: usize) -> Result<()> {
        if a_len == 0 && b_len == 0 {
            Ok(())
        } else {
            Err(PfcError::param(
                "precision",
                "16-bit",
                format!(
                    "the {} backend keeps no 16-bit GEMM operands ({a_len} + {b_len} requested)",
                    self.name()
                ),
            ))
        }
    }

    /// Bytes the backend holds for 16-bit GEMM operands (the planner's `gemm_operands`).
    fn gemm_operand_bytes(&self) -> u64 {
        0
    }

    /// Global labels → shard-local ids (`label − start`), or −1 where the class lives elsewhere.
    fn localize_labels(
        &self,
        global: &Self::Buf<i64>,
        rows: usize,
        shard_start: u64,
        shard_len: usize,
        local: &mut Self::Buf<i32>,
    ) -> Result<()>;

    /// Samples classes of the shard: every positive of `labels` (shard-local, −1 = elsewhere),
    /// filled up to `num_sample` with negatives (hard ones by `scores`, then random), written
    /// sorted to `sampled`; `labels` are remapped in place to positions in `sampled`. Returns
    /// the number of sampled classes.
    fn sample_classes(
        &self,
        args: &SampleArgs,
        labels: &mut Self::Buf<i32>,
        scores: Option<&Self::Buf<f32>>,
        keys: &mut Self::Buf<u64>,
        sampled: &mut Self::Buf<i32>,
    ) -> Result<usize>;

    /// Per class of the shard, its best cosine against any of the `rows` normalized embeddings
    /// (the hard-negative score), computed `chunk` classes at a time in the given scratch. Rows
    /// whose gathered label is −1 are padding of a ragged batch and are skipped.
    #[allow(clippy::too_many_arguments)]
    fn class_max_cosine(
        &self,
        weight: &Self::Buf<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &Self::Buf<f32>,
        row_labels: &Self::Buf<i64>,
        rows: usize,
        chunk_weights: &mut Self::Buf<f32>,
        chunk_cosines: &mut Self::Buf<f32>,
        scores: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Per row of the `rows` normalized embeddings, the `k` classes of the shard with the
    /// highest cosine (normalized centers), best first, ties to the smaller id: shard-local ids
    /// in `top_ids`, cosines in `top_scores` (`rows × k`; (−∞, −1) where the shard holds fewer
    /// than k classes). Computed `chunk` classes at a time in the given scratch, as
    /// [`class_max_cosine`](Self::class_max_cosine); `k` is at most
    /// [`TOP_K_MAX`](crate::cpu::top_k::TOP_K_MAX).
    ///
    /// The default runs on the host: it downloads the batch and a chunk of the shard at a time
    /// (as many classes as the scratch holds, at most
    /// [`HOST_CHUNK_MAX`](crate::cpu::top_k::HOST_CHUNK_MAX)) and computes with the CPU
    /// reference, so that a backend written before this method still predicts (slowly); the
    /// CPU and CUDA backends override it.
    #[allow(clippy::too_many_arguments)]
    fn class_top_k(
        &self,
        weight: &Self::Buf<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &Self::Buf<f32>,
        rows: usize,
        k: usize,
        chunk_weights: &mut Self::Buf<f32>,
        chunk_cosines: &mut Self::Buf<f32>,
        top_scores: &mut Self::Buf<f32>,
        top_ids: &mut Self::Buf<i32>,
    ) -> Result<()> {
        // Both outputs are checked before either is written, so a short `top_ids` leaves
        // `top_scores` untouched.
        for (len, name) in [
            (self.len(top_scores), "top_scores"),
            (self.len(top_ids), "top_ids"),
        ] {
            if len < rows.saturating_mul(k) {
                return Err(PfcError::Shape(format!(
                    "class_top_k {name}: {len} values, need rows {rows} × k {k}"
                )));
            }
        }
        let scratch = (self.len(chunk_weights), self.len(chunk_cosines));
        let (scores, ids) = crate::cpu::top_k::class_top_k_on_host(
            self, weight, shard_len, dim, x_hat, rows, k, scratch,
        )?;
        self.upload_at(&scores, top_scores, 0)?;
        self.upload_at(&ids, top_ids, 0)
    }

    /// Packs `rows` embeddings (f32, `rows × dim`) and their labels for the wire: each row becomes
    /// `dim` 16-bit values in `wire` (f16 or bf16, round to nearest even) followed by its i64
    /// label as four 16-bit words, so one all-gather moves both. The layer packs on the host
    /// (`cpu::wire::pack_embeddings`, where its embeddings arrive); this is the device version,
    /// for embeddings that already live on the device.
    #[allow(clippy::too_many_arguments)]
    #[allow(unused_variables)] // the default answers without looking at the arguments
    fn pack_embeddings(
        &self,
        x: &Self::Buf<f32>,
        labels: &Self::Buf<i64>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        packed: &mut Self::Buf<u16>,
    ) -> Result<()> {
        Err(unsupported(self.name(), "pack_embeddings"))
    }

    /// Unpacks `rows` gathered rows of [`Backend::pack_embeddings`] fused with their L2
    /// normalization: normalized embeddings, norms and labels.
    #[allow(clippy::too_many_arguments)]
    fn unpack_normalize(
        &self,
        packed: &Self::Buf<u16>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        labels: &mut Self::Buf<i64>,
        x_hat: &mut Self::Buf<f32>,
        norms: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Rounds the first `len` values of `x` to the 16-bit `wire` dtype (f16 or bf16, round to
    /// nearest even, as [`Backend::pack_embeddings`]) into `out`: the embedding gradient before
    /// its reduce-scatter in the wire dtype (`LayerConfig::grad_wire`), which halves its bytes.
    /// `Dtype::F32` is not a 16-bit format: [`PfcError::Param`].
    fn cast_to_wire(
        &self,
        x: &Self::Buf<f32>,
        len: usize,
        wire: Dtype,
        out: &mut Self::Buf<u16>,
    ) -> Result<()>;

    /// Widens the first `len` 16-bit `wire` values of `x` to f32 into `out` (exact): the
    /// reduce-scattered gradient back in f32. `Dtype::F32` is refused as in
    /// [`Backend::cast_to_wire`].
    fn cast_from_wire(
        &self,
        x: &Self::Buf<u16>,
        len: usize,
        wire: Dtype,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Unpacks `rows` gathered rows of the f32 wire format (`dim` values, then the i64 label's
    /// bits as two f32 words, low first; `cpu::wire::pack_embeddings_f32`) fused with their L2
    /// normalization: normalized embeddings, norms (the same bits as
    /// [`Backend::normalize_rows`]) and labels.
    fn unpack_normalize_f32(
        &self,
        packed: &Self::Buf<f32>,
        rows: usize,
        dim: usize,
        labels: &mut Self::Buf<i64>,
        x_hat: &mut Self::Buf<f32>,
        norms: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// `out[i] = weight[index[i]] / ‖weight[index[i]]‖`, norms kept for the backward pass.
    fn gather_normalize_rows(
        &self,
        weight: &Self::Buf<f32>,
        dim: usize,
        index: &Self::Buf<i32>,
        count: usize,
        out: &mut Self::Buf<f32>,
        norms: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// `out[i] = x[i] / ‖x[i]‖` for `rows` rows, norms kept.
    fn normalize_rows(
        &self,
        x: &Self::Buf<f32>,
        rows: usize,
        dim: usize,
        out: &mut Self::Buf<f32>,
        norms: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// `c[m × n] = a[m × k] · b[n × k]ᵀ` (logits from embeddings and class centers).
    #[allow(clippy::too_many_arguments)]
    fn gemm_nt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Self::Buf<f32>,
        b: &Self::Buf<f32>,
        c: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// `c[m × n] = a[m × k] · b[k × n]` (embedding gradient from logit gradient and centers).
    #[allow(clippy::too_many_arguments)]
    fn gemm_nn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Self::Buf<f32>,
        b: &Self::Buf<f32>,
        c: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// `c[m × n] = a[k × m]ᵀ · b[k × n]` (center gradient from logit gradient and embeddings).
    #[allow(clippy::too_many_arguments)]
    fn gemm_tn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Self::Buf<f32>,
        b: &Self::Buf<f32>,
        c: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// The two GEMMs of the backward pass, which share the logits' gradient `g` (`rows × cols`):
    /// `grad_x[rows × dim] = g · ŵ` and `grad_w[cols × dim] = gᵀ · x̂`. A backend with 16-bit GEMM
    /// operands converts `g` once for both; the default makes the two calls.
    #[allow(clippy::too_many_arguments)]
    fn gemm_backward(
        &self,
        rows: usize,
        cols: usize,
        dim: usize,
        grad_logits: &Self::Buf<f32>,
        w_hat: &Self::Buf<f32>,
        x_hat: &Self::Buf<f32>,
        grad_x: &mut Self::Buf<f32>,
        grad_w: &mut Self::Buf<f32>,
    ) -> Result<()> {
        self.gemm_nn(rows, dim, cols, grad_logits, w_hat, grad_x)?;
        self.gemm_tn(cols, dim, rows, grad_logits, x_hat, grad_w)
    }

    /// Pass 1 of the margin softmax: clamp cosines to [−1, 1], filter, apply the margin to each
    /// row's target (labels: position in the sample, −1 = not here), scale, and write each row's
    /// local max to `row_max` and its raw target cosine to `target_cos`.
    ///
    /// Every softmax method takes the logits' [`LogitsShape`]: `cols` columns hold classes, rows
    /// are `ld` elements apart. No pass uses a value of the padding columns `cols..ld` (a
    /// vectorized pass may load them and store them back unchanged); the passes that write the
    /// gradient ([`Self::softmax_loss_grad`], [`Self::margin_softmax_fused`] and their
    /// 16-bit forms) write zeros there, so a backward GEMM over all `ld` columns adds nothing.
    #[allow(clippy::too_many_arguments)]
    fn margin_rowmax(
        &self,
        logits: &mut Self::Buf<f32>,
        shape: LogitsShape,
        labels: &Self::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&Self::Buf<f32>>,
        row_max: &mut Self::Buf<f32>,
        target_cos: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Pass 2: `row_sum[i] = Σ_j exp(logit[i, j] − row_max[i])` over this rank's columns.
    fn exp_rowsum(
        &self,
        logits: &Self::Buf<f32>,
        shape: LogitsShape,
        row_max: &Self::Buf<f32>,
        row_sum: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Pass 3: per-row loss `−log p(target)` (0 where the target lives elsewhere) into
    /// `row_loss[..rows]`, the raw target cosine of pass 1 (`target_cos`; 0 where the target
    /// lives elsewhere) into `row_loss[rows..2·rows]`, so that one all-reduce of `2·rows` sums
    /// both over ranks, and the gradient with respect to the clamped cosine written over the
    /// logits: `(p − onehot) · (d logit / d cos) · grad_scale`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_loss_grad(
        &self,
        logits: &mut Self::Buf<f32>,
        shape: LogitsShape,
        labels: &Self::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&Self::Buf<f32>>,
        row_max: &Self::Buf<f32>,
        row_sum: &Self::Buf<f32>,
        target_cos: &Self::Buf<f32>,
        grad_scale: f32,
        row_loss: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// The whole margin softmax for a world of one, in one kernel: what [`Self::margin_rowmax`],
    /// [`Self::exp_rowsum`] and [`Self::softmax_loss_grad`] compute with nothing all-reduced
    /// between them (same encodings, loss and gradient; only the sum's rounding differs), but
    /// reading the logits twice and writing them once. Used when the world size is 1; the
    /// three passes stay for k > 1 ranks, whose softmax needs the all-reduces. `row_loss` holds
    /// `2·rows` as in [`Self::softmax_loss_grad`]: the losses, then the raw target cosines.
    #[allow(clippy::too_many_arguments)]
    fn margin_softmax_fused(
        &self,
        logits: &mut Self::Buf<f32>,
        shape: LogitsShape,
        labels: &Self::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&Self::Buf<f32>>,
        grad_scale: f32,
        row_loss: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// The dtype the step keeps its logits in: `F32`, or with 16-bit GEMM operands that 16-bit
    /// type, as PyTorch's autocast does: [`Self::gemm_nt16`] writes the cosines in it, the `*16`
    /// softmax passes read them and write the gradient over them in it, and
    /// [`Self::gemm_backward16`] reads that gradient directly: half the bytes of the logits
    /// buffer, and no cast of it on either side. The default (a backend that
    /// multiplies in f32 only) is `F32`.
    fn logits_dtype(&self) -> Dtype {
        Dtype::F32
    }

    /// The logits GEMM with 16-bit output: `c[m×n] = a[m×k] · b[n×k]ᵀ` with both operands
    /// rounded to [`Self::logits_dtype`], f32 accumulation, and `c` rounded to it. The 16-bit
    /// copies of `a` and `b` stay in the backend's operand buffers for
    /// [`Self::gemm_backward16`]. Only backends with 16-bit GEMMs implement it.
    #[allow(unused_variables)] // the default answers without looking at the arguments
    fn gemm_nt16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Self::Buf<f32>,
        b: &Self::Buf<f32>,
        c: &mut Self::Buf<u16>,
    ) -> Result<()> {
        Err(unsupported(self.name(), "16-bit GEMMs"))
    }

    /// The backward GEMMs on a 16-bit logits gradient `g` (`rows × cols`):
    /// `grad_x = alpha · g · ŵ` and `grad_w = alpha · gᵀ · x̂`, f32 results. With
    /// `reuse_operands`, the caller promises that `x̂` and `ŵ` are unchanged since this backend's
    /// last GEMM, [`Self::gemm_nt16`] on these same buffers, and the 16-bit copies it made are
    /// used as they are (the step passes `true`); a backend still casts again if its last GEMM was
    /// anything else. Without it the copies are made again. `alpha` carries the softmax's
    /// `1/rows` here rather than in `g`, so that f16's range holds `g` (see the `*16` passes).
    #[allow(clippy::too_many_arguments)]
    #[allow(unused_variables)] // the default answers without looking at the arguments
    fn gemm_backward16(
        &self,
        rows: usize,
        cols: usize,
        dim: usize,
        grad_logits: &Self::Buf<u16>,
        alpha: f32,
        w_hat: &Self::Buf<f32>,
        x_hat: &Self::Buf<f32>,
        grad_x: &mut Self::Buf<f32>,
        grad_w: &mut Self::Buf<f32>,
        reuse_operands: bool,
    ) -> Result<()> {
        Err(unsupported(self.name(), "16-bit GEMMs"))
    }

    /// Pass 1 on 16-bit cosines (`dtype` bf16 or f16): the row max of the margin logits and the
    /// raw target cosine, as [`Self::margin_rowmax`] computes them on the widened cosines, but
    /// reading only: `s·cos` rounded to 16 bits would lose too much, so passes 2 and 3
    /// recompute it (see `src/cpu/margin_softmax16.rs`).
    #[allow(clippy::too_many_arguments)]
    #[allow(unused_variables)] // the default answers without looking at the arguments
    fn margin_rowmax16(
        &self,
        cos: &Self::Buf<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Self::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&Self::Buf<f32>>,
        row_max: &mut Self::Buf<f32>,
        target_cos: &mut Self::Buf<f32>,
    ) -> Result<()> {
        Err(unsupported(self.name(), "margin_rowmax16"))
    }

    /// Pass 2 on 16-bit cosines: `row_sum[i] = Σ_j exp(z[i, j] − row_max[i])` with the margin
    /// logits `z` recomputed from the cosines.
    #[allow(clippy::too_many_arguments)]
    #[allow(unused_variables)] // the default answers without looking at the arguments
    fn exp_rowsum16(
        &self,
        cos: &Self::Buf<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Self::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&Self::Buf<f32>>,
        row_max: &Self::Buf<f32>,
        row_sum: &mut Self::Buf<f32>,
    ) -> Result<()> {
        Err(unsupported(self.name(), "exp_rowsum16"))
    }

    /// Pass 3 on 16-bit cosines: [`Self::softmax_loss_grad`]'s loss, target cosines and
    /// gradient, the gradient rounded to `dtype` over the cosines (f16 saturating at ±65504).
    #[allow(clippy::too_many_arguments)]
    #[allow(unused_variables)] // the default answers without looking at the arguments
    fn softmax_loss_grad16(
        &self,
        cos: &mut Self::Buf<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Self::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&Self::Buf<f32>>,
        row_max: &Self::Buf<f32>,
        row_sum: &Self::Buf<f32>,
        target_cos: &Self::Buf<f32>,
        grad_scale: f32,
        row_loss: &mut Self::Buf<f32>,
    ) -> Result<()> {
        Err(unsupported(self.name(), "softmax_loss_grad16"))
    }

    /// [`Self::margin_softmax_fused`] on 16-bit cosines (`row_loss` as there), the gradient
    /// rounded to `dtype`.
    #[allow(clippy::too_many_arguments)]
    #[allow(unused_variables)] // the default answers without looking at the arguments
    fn margin_softmax_fused16(
        &self,
        cos: &mut Self::Buf<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Self::Buf<i32>,
        margin: &MarginParams,
        row_margins: Option<&Self::Buf<f32>>,
        grad_scale: f32,
        row_loss: &mut Self::Buf<f32>,
    ) -> Result<()> {
        Err(unsupported(self.name(), "margin_softmax_fused16"))
    }

    /// `g[i][j] *= weights[i]` for `shape.rows` rows of `shape.ld` f32 values: the logits'
    /// gradient of each row times its weight (`PartialFc::forward_backward_weighted`).
    ///
    /// The default runs on the host (downloads, scales with the CPU reference, uploads), so that
    /// a backend written before this method still weighs rows (slowly); the CPU and CUDA
    /// backends override it.
    fn scale_rows(
        &self,
        g: &mut Self::Buf<f32>,
        shape: LogitsShape,
        weights: &Self::Buf<f32>,
    ) -> Result<()> {
        let len = shape.len()?;
        let mut host = self.download(g, len)?;
        let w = self.download(weights, shape.rows)?;
        crate::cpu::row_scale::scale_rows(&mut host, shape.rows, shape.ld, &w);
        self.upload(&host, g)
    }

    /// [`Self::scale_rows`] on 16-bit logits (`dtype` bf16 or f16), each value rounded back to
    /// `dtype`. The default runs on the host, as `scale_rows`'s.
    fn scale_rows16(
        &self,
        g: &mut Self::Buf<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        weights: &Self::Buf<f32>,
    ) -> Result<()> {
        crate::collective::check_16_bit(dtype)?;
        let len = shape.len()?;
        let mut host = self.download(g, len)?;
        let w = self.download(weights, shape.rows)?;
        crate::cpu::row_scale::scale_rows16(&mut host, shape.rows, shape.ld, dtype, &w);
        self.upload(&host, g)
    }

    /// Backward of `x̂ = x / ‖x‖`, in place: `g ← (g − x̂ (g · x̂)) / ‖x‖`.
    fn normalize_backward(
        &self,
        grad: &mut Self::Buf<f32>,
        x_hat: &Self::Buf<f32>,
        norms: &Self::Buf<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()>;

    /// `dense[index[i]] = rows[i]` for the sampled rows, after zeroing `dense` (`shard × dim`).
    fn scatter_rows(
        &self,
        rows: &Self::Buf<f32>,
        index: &Self::Buf<i32>,
        count: usize,
        dim: usize,
        dense: &mut Self::Buf<f32>,
        shard_len: usize,
    ) -> Result<()>;

    /// `dense[index[i]] += rows[i]` for the sampled rows (each index at most once): a pass's
    /// gradient added to those accumulated before it (`forward_backward_accumulate`).
    ///
    /// The default runs on the host (downloads the rows, the index and `dense`, adds with the
    /// CPU reference, uploads `dense`), so that a backend written before this method still
    /// accumulates (slowly); the CPU and CUDA backends override it.
    fn scatter_add_rows(
        &self,
        rows: &Self::Buf<f32>,
        index: &Self::Buf<i32>,
        count: usize,
        dim: usize,
        dense: &mut Self::Buf<f32>,
        shard_len: usize,
    ) -> Result<()> {
        let (Some(rows_len), Some(dense_len)) =
            (count.checked_mul(dim), shard_len.checked_mul(dim))
        else {
            return Err(PfcError::Shape(format!(
                "scatter_add_rows: {count} rows or a shard of {shard_len} × dim {dim} overflows"
            )));
        };
        let rows = self.download(rows, rows_len)?;
        let index = self.download(index, count)?;
        let mut host = self.download(dense, dense_len)?;
        crate::CpuBackend.scatter_add_rows(&rows, &index, count, dim, &mut host, shard_len)?;
        self.upload(&host, dense)
    }

    /// Sparse SGD with momentum on the sampled rows only:
    /// `v ← μ v + (g + λ w); w ← w − lr v` for `w = weight[index[i]]`, `g = grad[i]`, in f32;
    /// a bf16 momentum is widened on load and rounded (to nearest even) on store, and `w` moves
    /// by the unrounded `v`.
    #[allow(clippy::too_many_arguments)]
    fn sgd_momentum_sparse(
        &self,
        weight: &mut Self::Buf<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &Self::Buf<f32>,
        index: &Self::Buf<i32>,
        count: usize,
        dim: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()>;

    /// Dense SGD with momentum over the first `len` elements of the shard (same arithmetic as
    /// [`Backend::sgd_momentum_sparse`]).
    #[allow(clippy::too_many_arguments)]
    fn sgd_momentum_dense(
        &self,
        weight: &mut Self::Buf<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &Self::Buf<f32>,
        len: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()>;

    /// Whether [`Self::adamw_sparse`] and [`Self::adamw_dense`] are implemented (the layer asks
    /// at construction, so that an AdamW layer on a backend without it fails there, not at its
    /// first step). The default answers no.
    fn supports_adamw(&self) -> bool {
        false
    }

    /// Sparse AdamW on the sampled rows only ("lazy" Adam), for `w = weight[index[i]]`,
    /// `g = grad[i]` and their moments `m`, `v` (both in the same storage dtype):
    /// `w ← w·(1 − lr·λ); m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
    /// w ← w − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε)`, in f32, `w` moved by the unrounded
    /// moments; bf16 moments are stored by stochastic rounding with
    /// [`crate::rng::rounding_bits`]`(seed, t, element)`, element = the shard-local index of the
    /// value (low 16 bits for `m`, high 16 for `v`). The default refuses ([`PfcError::BackendUnavailable`]): a backend written before
    /// AdamW existed keeps compiling and says it lacks it.
    #[allow(clippy::too_many_arguments)]
    fn adamw_sparse(
        &self,
        weight: &mut Self::Buf<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &Self::Buf<f32>,
        index: &Self::Buf<i32>,
        count: usize,
        dim: usize,
        step: AdamWStep,
    ) -> Result<()> {
        let _ = (weight, exp_avg, exp_avg_sq, grad, index, count, dim, step);
        Err(unsupported(self.name(), "AdamW"))
    }

    /// Dense AdamW over the first `len` elements of the shard (same arithmetic as
    /// [`Backend::adamw_sparse`]); the default refuses, as there.
    #[allow(clippy::too_many_arguments)]
    fn adamw_dense(
        &self,
        weight: &mut Self::Buf<f32>,
        exp_avg: &mut StateBuf<Self>,
        exp_avg_sq: &mut StateBuf<Self>,
        grad: &Self::Buf<f32>,
        len: usize,
        step: AdamWStep,
    ) -> Result<()> {
        let _ = (weight, exp_avg, exp_avg_sq, grad, len, step);
        Err(unsupported(self.name(), "AdamW"))
    }
}

/// The error of an AdamW update given moments of two storage dtypes (they share one).
pub(crate) fn mixed_moments() -> PfcError {
    PfcError::Shape("adamw: exp_avg and exp_avg_sq must have the same storage dtype".into())
}

/// One AdamW update's hyper-parameters and its step number `t` (≥ 1), which the bias
/// corrections need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// The optimizer's settings.
    pub adamw: crate::config::AdamW,
    /// Number of this update, counted from 1 (0 is treated as 1): the bias corrections' t,
    /// [`crate::PartialFc::optimizer_steps`] after the increment.
    pub t: u64,
    /// Key of the stochastic rounding of bf16 moments (the layer's seed).
    pub seed: u64,
}

impl AdamWStep {
    /// The per-update scalars every element's update shares, computed once in f64 (so that
    /// `β₂ᵗ` for t in the millions stays exact enough) and rounded to f32.
    pub fn scalars(&self) -> crate::cpu::optimizer::AdamWScalars {
        let a = self.adamw;
        let t = self.t.max(1) as f64;
        let bias1 = 1.0 - f64::from(a.beta1).powf(t);
        let bias2 = 1.0 - f64::from(a.beta2).powf(t);
        let lr = f64::from(self.lr);
        crate::cpu::optimizer::AdamWScalars {
            decay: (1.0 - lr * f64::from(a.weight_decay)) as f32,
            beta1: a.beta1,
            beta2: a.beta2,
            step_size: (lr / bias1) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            eps: a.eps,
            seed: self.seed,
            t: self.t.max(1),
        }
    }
}

/// Communication between the ranks of a group, on a backend's buffers.
///
/// Every rank of the group calls the same operations in the same order (as with NCCL or MPI).
pub trait Collective<B: Backend>: Send {
    /// This rank's index in `[0, world_size)`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Concatenates every rank's first `count` elements of `send`, in rank order, into `recv`.
    ///
    /// One generic method rather than one per element type: an all-gather does no arithmetic,
    /// so every implementation moves any [`Elem`] the same way (NCCL as bytes), and the layer
    /// gathers f32 embeddings, i64 labels and the packed 16-bit wire format through it.
    fn all_gather<T: Elem>(
        &self,
        backend: &B,
        send: &B::Buf<T>,
        count: usize,
        recv: &mut B::Buf<T>,
    ) -> Result<()>;
    /// Reduces the first `count` elements over all ranks, result on every rank.
    fn all_reduce_f32(
        &self,
        backend: &B,
        buf: &mut B::Buf<f32>,
        count: usize,
        op: ReduceOp,
    ) -> Result<()>;
    /// Sums `send` (`world_size · count` elements) over ranks; rank i receives block i.
    fn reduce_scatter_f32(
        &self,
        backend: &B,
        send: &B::Buf<f32>,
        count: usize,
        recv: &mut B::Buf<f32>,
    ) -> Result<()>;
    /// [`Collective::reduce_scatter_f32`] in a 16-bit dtype (`Dtype::F16` or `Dtype::Bf16`):
    /// `send` holds `world_size · count` values as bit patterns of `dtype`, rank i receives the
    /// sum of block i in `dtype`. Half the bytes on the wire of the f32 call; used for the
    /// embedding gradient when `LayerConfig::grad_wire` is 16-bit.
    ///
    /// The inputs are already rounded (each rank's contribution once, by
    /// [`Backend::cast_to_wire`]); how the sum rounds is the collective's: the host collectives
    /// add the ranks' values in f32 in rank order and round the total once (deterministic, the
    /// same on every rank), NCCL adds in the 16-bit type along its ring (a rounding per hop).
    /// `Dtype::F32` is refused with [`PfcError::Param`]: use `reduce_scatter_f32`.
    fn reduce_scatter_16(
        &self,
        backend: &B,
        send: &B::Buf<u16>,
        count: usize,
        recv: &mut B::Buf<u16>,
        dtype: Dtype,
    ) -> Result<()>;
    /// Waits until every rank reaches this point.
    fn barrier(&self) -> Result<()>;
    /// Breaks the group: a rank whose own part of a collective failed before it joined (its
    /// arguments refused, a download failed) calls this, so that this rank's next call cannot
    /// pair with the peers' pending one, and every later collective of the group fails. Peers in
    /// this process (`ThreadGroup`, and `HostStaged` over it) fail at once with `reason`; NCCL
    /// aborts this rank's communicator, and peers in other processes fail through their own
    /// timeout or NCCL's error. The default does nothing: right for a group of one, and for collectives
    /// that have no way to reach their peers.
    fn abort(&self, reason: &str) {
        let _ = reason;
    }
}
