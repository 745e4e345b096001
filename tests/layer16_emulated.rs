//! The layer's 16-bit path (bf16/f16 GEMM precision: 16-bit logits, `gemm_nt16`, the `*16`
//! softmax passes, `gemm_backward16` reusing the forward's operand copies) run on the CPU.
//!
//! `Emulated16` wraps `CpuBackend` and behaves like the CUDA backend at 16-bit precision: it
//! holds the two 16-bit operand buffers the layer reserves, `gemm_nt16` rounds x̂ and ŵ into
//! them, multiplies the widened values in f32 and rounds the cosines to 16 bits, and
//! `gemm_backward16` multiplies the widened 16-bit gradient by the held copies (as they are when
//! the layer says `reuse_operands`), scaled by alpha. Every other kernel is the CPU's. It also
//! records the kernels it runs and the GEMMs' 16-bit inputs and outputs, so the tests can check
//! each stage of the step against its own error bound.
//!
//! Tests:
//! 1. memory: the layer's report equals the planner's, with 2-byte logits and 16-bit operand
//!    copies of M·d + S·d, for bf16/f16, one and three ranks, sparse and dense update;
//! 2. accuracy against the f32 CPU layer (same inputs, same seed, same sample), with bounds
//!    derived below;
//! 3. the reuse contract: the layer calls `gemm_backward16` with `reuse_operands = true` right
//!    after the softmax of the same step, and its result really comes from the held copies
//!    (corrupting them between the two GEMMs breaks test 2's comparison);
//! 4. three ranks in 16 bits give what one rank gives in 16 bits, up to f32 reduction order and
//!    one 16-bit step of the logits' gradient (three-pass softmax vs the fused one).
//!
//! ## Error model (used by tests 2 and 4)
//!
//! `u` is the 16-bit unit roundoff (bf16 2⁻⁸, f16 2⁻¹¹): rounding to nearest even moves a value
//! `v` by at most `u·|v|`, plus `τ` in f16's subnormal range (half its spacing, 2⁻²⁵; bf16 shares
//! f32's range and has no such term here). f32's unit roundoff is 2⁻²⁴ and
//! `γₙ = n·2⁻²⁴ / (1 − n·2⁻²⁴)` bounds the relative error of an n-term f32 dot product.
//!
//! **Cosines (a priori).** The f32 layer computes `c = fl(x̂·ŵ)`, the 16-bit one
//! `c̃ = narrow(fl(x̃·w̃))` with `x̃ = narrow(x̂)`, `w̃ = narrow(ŵ)`. Operand rounding moves each
//! product by at most `(2u + u²)|x̂ₖŵₖ|`, so the dot product by `(2u + u²)·Σ|x̂ₖŵₖ| ≤ (2u + u²)·ν²`
//! (Cauchy–Schwarz; `ν = 1 + (d + 4)·2⁻²⁴` bounds the norm of an f32-normalized row); each f32
//! accumulation adds `γ_d·(1 + u)²·ν²`. The result's rounding adds at most `u/2` once the
//! softmax clamps to [−1, 1] (|v| ≤ 1 rounds by at most half the spacing of [½, 1), `u/2`; a
//! value above 1 rounds to at least 1, so both clamp to 1). So
//! `|clamp(c̃) − clamp(c)| ≤ ε_c = u/2 + ((2u + u²) + 2γ_d(1 + u)²)·ν²`, and every logit moves
//! by at most `s·ε_c` (bf16, s = 64, d = 32: 0.63; f16: 0.078), the target's times the margin
//! function's largest slope near its cosine; a row's loss so by at most `s·ε_c·(1 + slope)`
//! (checked too, but loose: the tighter checks below start from the measured shifts).
//!
//! **Loss and softmax (a posteriori).** From the recorded cosines of both layers the test
//! computes each logit shift `Δz_ij = z̃_ij − z_ij` exactly (f64; the target through the margin
//! function). In exact arithmetic `p̃_j / p_j = e^{Δz_j} / Σₖ pₖ e^{Δzₖ}` lies in
//! `[e^{Δz_j − max Δz}, e^{Δz_j − min Δz}]`, so `|p̃_j − p_j| ≤ p_j·ρ_j` with
//! `ρ_j = max(e^{Δz_j − min Δz} − 1, 1 − e^{Δz_j − max Δz})`; and a row's loss
//! `−z_t + log Σ e^{z}` moves by at most `max(max Δz − Δz_t, Δz_t − min Δz)`. Both paths evaluate
//! the logits in f32 (`ε_z = s·2⁻¹⁸` covers the margin function and `s·c`, and widens every
//! `Δz` by `2ε_z` per side) and the softmax in f32 (`η_p = 2⁻¹⁷ + 4(S + 8)·2⁻²⁴` relative on p:
//! `z − max` rounded, 2-ulp exp, a sum of S terms with its online rescalings; on the loss,
//! additionally `2⁻²³·|loss|`).
//!
//! **Logits' gradient (per entry).** f32: `G = fl(s(p − y)/R)`. 16-bit: `g̃ = narrow(s(p̃ − y))`
//! and the backward GEMMs' `alpha = 1/R`, so with `P = p_j` (exact softmax of the f32 layer's
//! logits):
//! `|α·g̃ − G| ≤ α·[s·P·ρ + u·s·(|P − y| + P·ρ) + τ + 2s((η_p + 2ε_z)·P(1 + ρ) + 2⁻²³(|P − y| + Pρ))]`
//! (logit shift, 16-bit rounding of the gradient, f32 evaluation of both paths).
//!
//! **Backward GEMMs and normalization (per row / per class).** Row i of the embedding gradient
//! before the normalization's backward is `Σ_j G_ij ŵ_j` (f32) vs `α Σ_j g̃_ij w̃_j` (16-bit),
//! whose difference is `Σ_j (αg̃_ij − G_ij) w̃_j + Σ_j G_ij (w̃_j − ŵ_j)`:
//! `‖·‖ ≤ (1 + u)ν·Σ_j ΔG_ij + (uν + √d·τ)·A_i` with `ΔG` the measured per-entry differences and
//! `A_i = Σ_j |G_ij|`. The normalization's backward `(g − x̂(g·x̂)) / ‖x‖` is linear with norm
//! `1/‖x_i‖`. f32 evaluation of each path adds `κ·(1 + u)ν(A_i + ΣΔG_i)/‖x_i‖` with
//! `κ = γ_K + γ_d + (k + 8)·2⁻²⁴` (a K-term GEMM, the normalization's dot product and its few
//! roundings, alpha, and a k-rank reduce-scatter). The same holds per class with rows and
//! columns exchanged (`K = M`, no reduce-scatter), divided by the class center's norm. The
//! natural scale of row i is `ν·A_i/‖x_i‖`, an upper bound of the f32 gradient's norm; errors
//! are reported relative to it.
//!
//! **Weights after `step`.** With a zero momentum the update is `w − lr·(g + λw)`, so the
//! weights move apart by `lr` times the class gradients' difference, plus each path's f32
//! rounding: `2⁻²⁴|w'| + lr·2⁻²²(|g| + λ|w|)` per element. Unsampled rows must be identical.
//!
//! **What the bounds leave (measured, seed 3, d = 32, 24 rows, S = 180).** Cosines: bf16
//! 2.9e-3 of ε_c = 9.8e-3, f16 3.9e-4 of 1.2e-3 (largest logit shift 0.24 and 0.039). Loss: bf16
//! 3.0e-2 of 0.20 (a priori 1.55), f16 2.1e-3 of 2.3e-2. The per-entry gradient bound is
//! attained to 0.98: in a row whose target holds almost all the mass and whose target logit
//! took the largest downward shift, every other entry's probability grows by exactly
//! `e^{Δz_j − min Δz}`. The per-class bound is attained to 0.93 where one row dominates a class's
//! gradient (the triangle inequality is then an equality); relative to their scale the class
//! gradients differ by up to 23% (bf16) and 8% (f16), the embedding gradients by 10% and 1%:
//! that is the cost of 16-bit cosines at s = 64 (s·2⁻⁹ = 0.125 per logit in bf16), not a defect.

use partial_fc::backend::{Backend, Collective, Elem, SampleArgs, StateBuf};
use partial_fc::collective::{HostStaged, SingleRank, ThreadGroup};
use partial_fc::cpu::margin_softmax16::{narrow, widen};
use partial_fc::plan::{Component, Dtype};
use partial_fc::LogitsShape;
use partial_fc::{
    CpuBackend, GemmPrecision, LayerConfig, Margin, MarginParams, PartialFc, PfcError, Result, Sgd,
    Shard, UpdateMode,
};
use std::sync::Mutex;

// ---------------------------------------------------------------------------------------------
// The emulated 16-bit backend.
// ---------------------------------------------------------------------------------------------

/// One kernel call, as the wrapper saw it (buffer moves are not recorded).
#[derive(Debug, Clone, PartialEq)]
enum Call {
    /// Any kernel other than a GEMM.
    Kernel(&'static str),
    /// An f32 GEMM (`gemm_nt`, `gemm_nn`, `gemm_tn`, `gemm_backward`).
    Gemm(&'static str),
    GemmNt16 {
        m: usize,
        n: usize,
        k: usize,
    },
    GemmBackward16 {
        rows: usize,
        cols: usize,
        dim: usize,
        alpha: f32,
        reuse: bool,
        /// Whether the held copies equalled the 16-bit rounding of this call's x̂ and ŵ when it
        /// began: the reuse contract ("nothing writes x̂, ŵ or the copies in between").
        held_current: bool,
    },
}

/// What the wrapper recorded of one step.
#[derive(Debug, Clone, Default)]
struct Log {
    calls: Vec<Call>,
    /// The logits GEMM's output as the softmax reads it (16-bit values widened), `m × n`.
    cos: Vec<f32>,
    /// The logits' gradient as the backward GEMMs read it (16-bit values widened), `rows × cols`.
    grad: Vec<f32>,
    /// The backward GEMMs' alpha (1 on the f32 path, whose gradient carries the mean's 1/rows).
    alpha: f32,
}

/// What the test does to the held operand copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Rotates the rows of both held copies by one at the start of `gemm_backward16`, as if
    /// something had written them after the forward GEMM.
    CorruptHeld,
}

/// The 16-bit copies of the GEMM operands: `a` ← each GEMM's `a` (x̂), `b` ← its `b` (ŵ).
#[derive(Default)]
struct Held {
    a: Vec<u16>,
    b: Vec<u16>,
}

/// `CpuBackend` with the CUDA backend's 16-bit GEMMs, emulated: see the file's documentation.
struct Emulated16 {
    cpu: CpuBackend,
    precision: GemmPrecision,
    held: Mutex<Held>,
    fault: Fault,
    log: Mutex<Log>,
}

impl Emulated16 {
    fn new(fault: Fault) -> Self {
        Emulated16 {
            cpu: CpuBackend,
            precision: GemmPrecision::F32,
            held: Mutex::new(Held::default()),
            fault,
            log: Mutex::new(Log::default()),
        }
    }

    fn note(&self, call: Call) {
        self.log.lock().unwrap().calls.push(call);
    }

    fn kernel(&self, name: &'static str) {
        self.note(Call::Kernel(name));
    }

    /// The 16-bit dtype, or the error the CUDA backend gives at f32 precision.
    fn half(&self) -> Result<Dtype> {
        match self.precision {
            GemmPrecision::Bf16 => Ok(Dtype::Bf16),
            GemmPrecision::F16 => Ok(Dtype::F16),
            GemmPrecision::F32 => Err(PfcError::param(
                "precision",
                "f32",
                "16-bit logits need bf16 or f16 GEMM precision",
            )),
        }
    }
}

fn need<T>(buf: &[T], len: usize, what: &str) -> Result<()> {
    if buf.len() < len {
        return Err(PfcError::Shape(format!(
            "{what}: buffer of {} elements, {len} needed",
            buf.len()
        )));
    }
    Ok(())
}

/// The operand buffer grown to `len` if it is shorter (the CUDA backend's `operand_buffer`; a
/// layer reserves the planner's sizes, so there this never happens).
fn grow(slot: &mut Vec<u16>, len: usize) {
    if slot.len() < len {
        *slot = vec![0; len];
    }
}

fn cast_into(src: &[f32], dst: &mut [u16], dtype: Dtype) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = narrow(s, dtype);
    }
}

fn widened(src: &[u16], dtype: Dtype) -> Vec<f32> {
    src.iter().map(|&b| widen(b, dtype)).collect()
}

/// A backend's recorded log, taken (the plain CPU backend records none).
trait Probe {
    fn take_log(&self) -> Option<Log>;
}

impl Probe for CpuBackend {
    fn take_log(&self) -> Option<Log> {
        None
    }
}

impl Probe for Emulated16 {
    fn take_log(&self) -> Option<Log> {
        Some(std::mem::take(&mut *self.log.lock().unwrap()))
    }
}

impl Backend for Emulated16 {
    type Buf<T: Elem> = Vec<T>;

    fn name(&self) -> &'static str {
        "emulated16"
    }
    fn alloc<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        self.cpu.alloc(len)
    }
    fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
        self.cpu.len(buf)
    }
    fn upload_at<T: Elem>(&self, host: &[T], dst: &mut Vec<T>, offset: usize) -> Result<()> {
        self.cpu.upload_at(host, dst, offset)
    }
    fn download_at<T: Elem>(&self, src: &Vec<T>, offset: usize, len: usize) -> Result<Vec<T>> {
        self.cpu.download_at(src, offset, len)
    }
    fn copy<T: Elem>(&self, src: &Vec<T>, dst: &mut Vec<T>, len: usize) -> Result<()> {
        self.cpu.copy(src, dst, len)
    }
    fn zero<T: Elem>(&self, buf: &mut Vec<T>, len: usize) -> Result<()> {
        self.cpu.zero(buf, len)
    }

    fn set_gemm_precision(&mut self, precision: GemmPrecision) -> Result<()> {
        self.precision = precision;
        Ok(())
    }

    /// Exactly `a_len` and `b_len` elements, replacing what was held (as the CUDA backend).
    fn reserve_gemm_operands(&mut self, a_len: usize, b_len: usize) -> Result<()> {
        *self.held.get_mut().unwrap() = Held {
            a: vec![0; a_len],
            b: vec![0; b_len],
        };
        Ok(())
    }

    fn gemm_operand_bytes(&self) -> u64 {
        let held = self.held.lock().unwrap();
        2 * (held.a.len() + held.b.len()) as u64
    }

    fn localize_labels(
        &self,
        global: &Vec<i64>,
        rows: usize,
        shard_start: u64,
        shard_len: usize,
        local: &mut Vec<i32>,
    ) -> Result<()> {
        self.kernel("localize_labels");
        self.cpu
            .localize_labels(global, rows, shard_start, shard_len, local)
    }

    fn sample_classes(
        &self,
        args: &SampleArgs,
        labels: &mut Vec<i32>,
        scores: Option<&Vec<f32>>,
        keys: &mut Vec<u64>,
        sampled: &mut Vec<i32>,
    ) -> Result<usize> {
        self.kernel("sample_classes");
        self.cpu.sample_classes(args, labels, scores, keys, sampled)
    }

    fn class_max_cosine(
        &self,
        weight: &Vec<f32>,
        shard_len: usize,
        dim: usize,
        x_hat: &Vec<f32>,
        row_labels: &Vec<i64>,
        rows: usize,
        chunk_weights: &mut Vec<f32>,
        chunk_cosines: &mut Vec<f32>,
        scores: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("class_max_cosine");
        self.cpu.class_max_cosine(
            weight,
            shard_len,
            dim,
            x_hat,
            row_labels,
            rows,
            chunk_weights,
            chunk_cosines,
            scores,
        )
    }

    fn pack_embeddings(
        &self,
        x: &Vec<f32>,
        labels: &Vec<i64>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        packed: &mut Vec<u16>,
    ) -> Result<()> {
        self.kernel("pack_embeddings");
        self.cpu.pack_embeddings(x, labels, rows, dim, wire, packed)
    }

    fn unpack_normalize(
        &self,
        packed: &Vec<u16>,
        rows: usize,
        dim: usize,
        wire: Dtype,
        labels: &mut Vec<i64>,
        x_hat: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("unpack_normalize");
        self.cpu
            .unpack_normalize(packed, rows, dim, wire, labels, x_hat, norms)
    }

    fn unpack_normalize_f32(
        &self,
        packed: &Vec<f32>,
        rows: usize,
        dim: usize,
        labels: &mut Vec<i64>,
        x_hat: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("unpack_normalize_f32");
        self.cpu
            .unpack_normalize_f32(packed, rows, dim, labels, x_hat, norms)
    }

    fn cast_to_wire(
        &self,
        x: &Vec<f32>,
        len: usize,
        wire: Dtype,
        out: &mut Vec<u16>,
    ) -> Result<()> {
        self.kernel("cast_to_wire");
        self.cpu.cast_to_wire(x, len, wire, out)
    }

    fn cast_from_wire(
        &self,
        x: &Vec<u16>,
        len: usize,
        wire: Dtype,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("cast_from_wire");
        self.cpu.cast_from_wire(x, len, wire, out)
    }

    fn gather_normalize_rows(
        &self,
        weight: &Vec<f32>,
        dim: usize,
        index: &Vec<i32>,
        count: usize,
        out: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("gather_normalize_rows");
        self.cpu
            .gather_normalize_rows(weight, dim, index, count, out, norms)
    }

    fn normalize_rows(
        &self,
        x: &Vec<f32>,
        rows: usize,
        dim: usize,
        out: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("normalize_rows");
        self.cpu.normalize_rows(x, rows, dim, out, norms)
    }

    fn gemm_nt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        self.note(Call::Gemm("gemm_nt"));
        self.cpu.gemm_nt(m, n, k, a, b, c)?;
        self.log.lock().unwrap().cos = c[..m * n].to_vec();
        Ok(())
    }

    fn gemm_nn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        self.note(Call::Gemm("gemm_nn"));
        self.cpu.gemm_nn(m, n, k, a, b, c)
    }

    fn gemm_tn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        self.note(Call::Gemm("gemm_tn"));
        self.cpu.gemm_tn(m, n, k, a, b, c)
    }

    fn gemm_backward(
        &self,
        rows: usize,
        cols: usize,
        dim: usize,
        grad_logits: &Vec<f32>,
        w_hat: &Vec<f32>,
        x_hat: &Vec<f32>,
        grad_x: &mut Vec<f32>,
        grad_w: &mut Vec<f32>,
    ) -> Result<()> {
        self.note(Call::Gemm("gemm_backward"));
        {
            let mut log = self.log.lock().unwrap();
            log.grad = grad_logits[..rows * cols].to_vec();
            log.alpha = 1.0;
        }
        self.cpu
            .gemm_backward(rows, cols, dim, grad_logits, w_hat, x_hat, grad_x, grad_w)
    }

    fn margin_rowmax(
        &self,
        logits: &mut Vec<f32>,
        shape: LogitsShape,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &mut Vec<f32>,
        target_cos: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("margin_rowmax");
        self.cpu.margin_rowmax(
            logits,
            shape,
            labels,
            margin,
            row_margins,
            row_max,
            target_cos,
        )
    }

    fn exp_rowsum(
        &self,
        logits: &Vec<f32>,
        shape: LogitsShape,
        row_max: &Vec<f32>,
        row_sum: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("exp_rowsum");
        self.cpu.exp_rowsum(logits, shape, row_max, row_sum)
    }

    fn softmax_loss_grad(
        &self,
        logits: &mut Vec<f32>,
        shape: LogitsShape,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &Vec<f32>,
        row_sum: &Vec<f32>,
        target_cos: &Vec<f32>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("softmax_loss_grad");
        self.cpu.softmax_loss_grad(
            logits,
            shape,
            labels,
            margin,
            row_margins,
            row_max,
            row_sum,
            target_cos,
            grad_scale,
            row_loss,
        )
    }

    fn margin_softmax_fused(
        &self,
        logits: &mut Vec<f32>,
        shape: LogitsShape,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("margin_softmax_fused");
        self.cpu.margin_softmax_fused(
            logits,
            shape,
            labels,
            margin,
            row_margins,
            grad_scale,
            row_loss,
        )
    }

    fn logits_dtype(&self) -> Dtype {
        match self.precision {
            GemmPrecision::F32 => Dtype::F32,
            GemmPrecision::Bf16 => Dtype::Bf16,
            GemmPrecision::F16 => Dtype::F16,
        }
    }

    fn gemm_nt16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        c: &mut Vec<u16>,
    ) -> Result<()> {
        let dtype = self.half()?;
        self.note(Call::GemmNt16 { m, n, k });
        need(a, m * k, "gemm_nt16 a")?;
        need(b, n * k, "gemm_nt16 b")?;
        need(c, m * n, "gemm_nt16 c")?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            c[..m * n].fill(0);
            return Ok(());
        }
        let (a16, b16) = {
            let mut held = self.held.lock().unwrap();
            let Held {
                a: a_slot,
                b: b_slot,
            } = &mut *held;
            grow(a_slot, m * k);
            cast_into(&a[..m * k], &mut a_slot[..m * k], dtype);
            grow(b_slot, n * k);
            cast_into(&b[..n * k], &mut b_slot[..n * k], dtype);
            (
                widened(&a_slot[..m * k], dtype),
                widened(&b_slot[..n * k], dtype),
            )
        };
        let mut c32 = vec![0.0f32; m * n];
        self.cpu.gemm_nt(m, n, k, &a16, &b16, &mut c32)?;
        cast_into(&c32, &mut c[..m * n], dtype);
        self.log.lock().unwrap().cos = widened(&c[..m * n], dtype);
        Ok(())
    }

    fn gemm_backward16(
        &self,
        rows: usize,
        cols: usize,
        dim: usize,
        grad_logits: &Vec<u16>,
        alpha: f32,
        w_hat: &Vec<f32>,
        x_hat: &Vec<f32>,
        grad_x: &mut Vec<f32>,
        grad_w: &mut Vec<f32>,
        reuse_operands: bool,
    ) -> Result<()> {
        let dtype = self.half()?;
        need(grad_logits, rows * cols, "gemm_backward16 grad_logits")?;
        need(w_hat, cols * dim, "gemm_backward16 w_hat")?;
        need(x_hat, rows * dim, "gemm_backward16 x_hat")?;
        need(grad_x, rows * dim, "gemm_backward16 grad_x")?;
        need(grad_w, cols * dim, "gemm_backward16 grad_w")?;
        let (x16, w16) = {
            let mut held = self.held.lock().unwrap();
            let Held {
                a: a_slot,
                b: b_slot,
            } = &mut *held;
            let fresh = |slot: &[u16], src: &[f32], len: usize| {
                slot.len() >= len
                    && slot[..len]
                        .iter()
                        .zip(&src[..len])
                        .all(|(&h, &v)| h == narrow(v, dtype))
            };
            let held_current = fresh(a_slot, x_hat, rows * dim) && fresh(b_slot, w_hat, cols * dim);
            self.note(Call::GemmBackward16 {
                rows,
                cols,
                dim,
                alpha,
                reuse: reuse_operands,
                held_current,
            });
            if dim == 0 {
                return Ok(());
            }
            if rows == 0 || cols == 0 {
                grad_x[..rows * dim].fill(0.0);
                grad_w[..cols * dim].fill(0.0);
                return Ok(());
            }
            if self.fault == Fault::CorruptHeld {
                a_slot[..rows * dim].rotate_left(dim);
                b_slot[..cols * dim].rotate_left(dim);
            }
            // The held copies as they are when the caller vouches for them (and they are long
            // enough), else cast again, as the CUDA backend decides.
            let reusable = |slot: &Vec<u16>, len: usize| reuse_operands && slot.len() >= len;
            if !reusable(a_slot, rows * dim) {
                grow(a_slot, rows * dim);
                cast_into(&x_hat[..rows * dim], &mut a_slot[..rows * dim], dtype);
            }
            if !reusable(b_slot, cols * dim) {
                grow(b_slot, cols * dim);
                cast_into(&w_hat[..cols * dim], &mut b_slot[..cols * dim], dtype);
            }
            (
                widened(&a_slot[..rows * dim], dtype),
                widened(&b_slot[..cols * dim], dtype),
            )
        };
        let g = widened(&grad_logits[..rows * cols], dtype);
        // grad_x = alpha · g · ŵ, grad_w = alpha · gᵀ · x̂, f32 accumulation (cuBLAS's alpha
        // scales the accumulated sum).
        self.cpu.gemm_nn(rows, dim, cols, &g, &w16, grad_x)?;
        self.cpu.gemm_tn(cols, dim, rows, &g, &x16, grad_w)?;
        grad_x[..rows * dim].iter_mut().for_each(|v| *v *= alpha);
        grad_w[..cols * dim].iter_mut().for_each(|v| *v *= alpha);
        let mut log = self.log.lock().unwrap();
        log.grad = g;
        log.alpha = alpha;
        Ok(())
    }

    fn margin_rowmax16(
        &self,
        cos: &Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &mut Vec<f32>,
        target_cos: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("margin_rowmax16");
        self.cpu.margin_rowmax16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins,
            row_max,
            target_cos,
        )
    }

    fn exp_rowsum16(
        &self,
        cos: &Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &Vec<f32>,
        row_sum: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("exp_rowsum16");
        self.cpu.exp_rowsum16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins,
            row_max,
            row_sum,
        )
    }

    fn softmax_loss_grad16(
        &self,
        cos: &mut Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        row_max: &Vec<f32>,
        row_sum: &Vec<f32>,
        target_cos: &Vec<f32>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("softmax_loss_grad16");
        self.cpu.softmax_loss_grad16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins,
            row_max,
            row_sum,
            target_cos,
            grad_scale,
            row_loss,
        )
    }

    fn margin_softmax_fused16(
        &self,
        cos: &mut Vec<u16>,
        shape: LogitsShape,
        dtype: Dtype,
        labels: &Vec<i32>,
        margin: &MarginParams,
        row_margins: Option<&Vec<f32>>,
        grad_scale: f32,
        row_loss: &mut Vec<f32>,
    ) -> Result<()> {
        self.kernel("margin_softmax_fused16");
        self.cpu.margin_softmax_fused16(
            cos,
            shape,
            dtype,
            labels,
            margin,
            row_margins,
            grad_scale,
            row_loss,
        )
    }

    fn normalize_backward(
        &self,
        grad: &mut Vec<f32>,
        x_hat: &Vec<f32>,
        norms: &Vec<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        self.kernel("normalize_backward");
        self.cpu.normalize_backward(grad, x_hat, norms, rows, dim)
    }

    fn scatter_rows(
        &self,
        rows: &Vec<f32>,
        index: &Vec<i32>,
        count: usize,
        dim: usize,
        dense: &mut Vec<f32>,
        shard_len: usize,
    ) -> Result<()> {
        self.kernel("scatter_rows");
        self.cpu
            .scatter_rows(rows, index, count, dim, dense, shard_len)
    }

    // scatter_add_rows: the trait's default (on the host), which
    // `accumulation_through_the_default_scatter_add_rows` exercises.

    fn sgd_momentum_sparse(
        &self,
        weight: &mut Vec<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &Vec<f32>,
        index: &Vec<i32>,
        count: usize,
        dim: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        self.kernel("sgd_momentum_sparse");
        with_cpu_state(momentum, |state| {
            self.cpu.sgd_momentum_sparse(
                weight,
                state,
                grad,
                index,
                count,
                dim,
                lr,
                mu,
                weight_decay,
            )
        })
    }

    fn sgd_momentum_dense(
        &self,
        weight: &mut Vec<f32>,
        momentum: &mut StateBuf<Self>,
        grad: &Vec<f32>,
        len: usize,
        lr: f32,
        mu: f32,
        weight_decay: f32,
    ) -> Result<()> {
        self.kernel("sgd_momentum_dense");
        with_cpu_state(momentum, |state| {
            self.cpu
                .sgd_momentum_dense(weight, state, grad, len, lr, mu, weight_decay)
        })
    }
}

/// Lends the momentum (the same `Vec`, moved) to the CPU backend as its own `StateBuf`.
fn with_cpu_state(
    momentum: &mut StateBuf<Emulated16>,
    f: impl FnOnce(&mut StateBuf<CpuBackend>) -> Result<()>,
) -> Result<()> {
    match momentum {
        StateBuf::F32(v) => {
            let mut state = StateBuf::<CpuBackend>::F32(std::mem::take(v));
            let out = f(&mut state);
            if let StateBuf::F32(back) = state {
                *v = back;
            }
            out
        }
        StateBuf::Bf16(v) => {
            let mut state = StateBuf::<CpuBackend>::Bf16(std::mem::take(v));
            let out = f(&mut state);
            if let StateBuf::Bf16(back) = state {
                *v = back;
            }
            out
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a layer on one or three ranks.
// ---------------------------------------------------------------------------------------------

const CLASSES: u64 = 600;
const DIM: usize = 32;
/// Gathered rows (split evenly over 1 or 3 ranks, so no rank pads).
const BATCH: usize = 24;
const LR: f32 = 0.5;
const MOMENTUM: f32 = 0.9;
const WEIGHT_DECAY: f32 = 5e-4;

struct Data {
    x: Vec<f32>,
    labels: Vec<i64>,
}

/// xorshift64*: test inputs only.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Each embedding is its class center's direction (the layer's initial weights, a function of
/// the seed) plus noise, so target cosines sit around 0.75 as in training, at a random scale.
fn data(seed: u64) -> Data {
    let cfg = LayerConfig::new(CLASSES, DIM, BATCH);
    let w = partial_fc::init::normal_rows(cfg.seed, 0, CLASSES as usize, DIM, 0.01);
    let mut rng = Rng(seed);
    let labels: Vec<i64> = (0..BATCH).map(|_| (rng.next() % CLASSES) as i64).collect();
    let mut x = Vec::with_capacity(BATCH * DIM);
    for &l in &labels {
        let row = &w[l as usize * DIM..(l as usize + 1) * DIM];
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        let scale = 0.5 + 2.0 * rng.uniform() as f32;
        for v in row {
            x.push(scale * (v / norm + 0.16 * rng.normal() as f32));
        }
    }
    Data { x, labels }
}

fn config(
    world: usize,
    precision: GemmPrecision,
    margin: Margin,
    update: UpdateMode,
) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, BATCH / world);
    cfg.sample_rate = 0.3;
    cfg.margin = margin;
    cfg.update = update;
    cfg.precision = precision;
    cfg.optimizer = Some(
        Sgd {
            momentum: MOMENTUM,
            weight_decay: WEIGHT_DECAY,
            ..Sgd::default()
        }
        .into(),
    );
    cfg
}

type Report = Vec<(Component, u64)>;

/// One rank's results.
struct RankOut {
    loss: f32,
    grad_x: Vec<f32>,
    grad_w: Vec<f32>,
    weight0: Vec<f32>,
    weight1: Vec<f32>,
    sampled: Vec<i64>,
    log: Option<Log>,
    report: Report,
    planned: Report,
    report_after: Report,
    sampled_capacity: u64,
}

/// A world's results, gathered in rank order: rows of the batch, classes, and the recorded
/// logits and gradients as `BATCH × S` matrices whose columns are the sampled classes (sorted).
struct Run {
    loss: f32,
    grad_x: Vec<f32>,
    grad_w: Vec<f32>,
    weight0: Vec<f32>,
    weight1: Vec<f32>,
    sampled: Vec<i64>,
    cos: Vec<f32>,
    grad: Vec<f32>,
    alpha: f32,
    ranks: Vec<RankOut>,
}

fn rank_run<B: Backend + Probe, C: Collective<B>>(
    cfg: &LayerConfig,
    backend: B,
    comm: C,
    data: &Data,
    given: Option<&[i64]>,
) -> RankOut {
    let rows = Shard::of(BATCH as u64, comm.world_size(), comm.rank());
    let (r0, r1) = (rows.start as usize, rows.end() as usize);
    let (x, labels) = (&data.x[r0 * DIM..r1 * DIM], &data.labels[r0..r1]);
    let mut layer = PartialFc::new(cfg.clone(), backend, comm).unwrap();
    let report = layer.memory_report();
    let planned = layer.planned_memory();
    let sampled_capacity = layer.step_shape().sampled_capacity();
    let weight0 = layer.weight().unwrap();
    let out = match given {
        Some(s) => layer.forward_backward_with_sample(x, labels, s),
        None => layer.forward_backward(x, labels),
    }
    .unwrap();
    let sampled = layer.sampled_classes().unwrap();
    assert_eq!(out.sampled, sampled.len());
    let grad_w = layer.weight_grad_dense().unwrap();
    let log = layer.backend().take_log();
    layer.step(LR).unwrap();
    RankOut {
        loss: out.loss,
        grad_x: out.grad_embeddings,
        grad_w,
        weight0,
        weight1: layer.weight().unwrap(),
        sampled,
        log,
        report,
        planned,
        report_after: layer.memory_report(),
        sampled_capacity,
    }
}

/// Runs `world` ranks (a `SingleRank`, or a `ThreadGroup` through host staging) on `data`.
fn run<B: Backend + Probe>(
    world: usize,
    cfg: &LayerConfig,
    make: impl Fn() -> B + Sync,
    data: &Data,
    given: Option<&[i64]>,
) -> Run {
    let ranks: Vec<RankOut> = if world == 1 {
        vec![rank_run(cfg, make(), SingleRank, data, given)]
    } else {
        ThreadGroup::run(world, |c| {
            rank_run(cfg, make(), HostStaged::new(c), data, given)
        })
    };
    let cat = |f: &dyn Fn(&RankOut) -> &Vec<f32>| -> Vec<f32> {
        ranks.iter().flat_map(|r| f(r).iter().copied()).collect()
    };
    let sampled: Vec<i64> = ranks.iter().flat_map(|r| r.sampled.clone()).collect();
    // Each rank logged BATCH × S_r matrices, rows padded to a multiple of 8 columns (the layer's
    // `LogitsShape::aligned`); a row of the world's matrix is their rows without the padding, in
    // rank order (the sampled classes are sorted within and across shards).
    let matrix = |f: &dyn Fn(&Log) -> &Vec<f32>| -> Vec<f32> {
        let mut out = Vec::with_capacity(BATCH * sampled.len());
        for i in 0..BATCH {
            for r in &ranks {
                if let Some(log) = &r.log {
                    let s = r.sampled.len();
                    let ld = LogitsShape::aligned(BATCH, s).unwrap().ld;
                    assert_eq!(f(log).len(), BATCH * ld, "a logged matrix is BATCH × ld");
                    out.extend_from_slice(&f(log)[i * ld..i * ld + s]);
                }
            }
        }
        out
    };
    // The backward GEMMs run over the padding columns too: the softmax must zero them.
    for r in &ranks {
        if let Some(log) = &r.log {
            let s = r.sampled.len();
            let ld = LogitsShape::aligned(BATCH, s).unwrap().ld;
            for row in log.grad.chunks(ld) {
                assert!(
                    row[s..].iter().all(|&g| g.to_bits() == 0),
                    "padding columns of the logits' gradient must be +0.0: {:?}",
                    &row[s..]
                );
            }
        }
    }
    let alpha = ranks[0].log.as_ref().map_or(f32::NAN, |l| l.alpha);
    assert!(ranks
        .iter()
        .all(|r| r.loss.to_bits() == ranks[0].loss.to_bits()));
    Run {
        loss: ranks[0].loss,
        grad_x: cat(&|r| &r.grad_x),
        grad_w: cat(&|r| &r.grad_w),
        weight0: cat(&|r| &r.weight0),
        weight1: cat(&|r| &r.weight1),
        cos: matrix(&|l| &l.cos),
        grad: matrix(&|l| &l.grad),
        alpha,
        sampled,
        ranks,
    }
}

fn emulated(world: usize, cfg: &LayerConfig, data: &Data, given: Option<&[i64]>) -> Run {
    run(world, cfg, || Emulated16::new(Fault::None), data, given)
}

// ---------------------------------------------------------------------------------------------
// Error bounds (see the file's documentation).
// ---------------------------------------------------------------------------------------------

const F32_U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    let t = n as f64 * F32_U;
    t / (1.0 - t)
}

/// The 16-bit format's rounding: unit roundoff `u`, absolute floor `tau` (f16 subnormals).
#[derive(Debug, Clone, Copy)]
struct Half {
    u: f64,
    tau: f64,
}

impl Half {
    fn of(p: GemmPrecision) -> Half {
        match p {
            GemmPrecision::Bf16 => Half {
                u: 2f64.powi(-8),
                tau: 0.0,
            },
            GemmPrecision::F16 => Half {
                u: 2f64.powi(-11),
                tau: 2f64.powi(-25),
            },
            GemmPrecision::F32 => unreachable!("16-bit precisions only"),
        }
    }

    /// The a-priori bound on a (clamped) cosine's change, ε_c.
    fn eps_cos(&self, nu: f64) -> f64 {
        let u = self.u;
        u / 2.0 + ((2.0 * u + u * u) + 2.0 * gamma(DIM) * (1.0 + u) * (1.0 + u)) * nu * nu
    }

    /// The spacing of 16-bit values at magnitude `v` (one "16-bit step").
    fn spacing(&self, v: f64) -> f64 {
        let v = v.abs();
        let floor = 2.0 * self.tau.max(2f64.powi(-134));
        if v == 0.0 {
            return floor;
        }
        (2f64.powi(v.log2().floor() as i32) * 2.0 * self.u).max(floor)
    }
}

/// ν: bound on the norm of an f32-normalized row.
fn nu() -> f64 {
    1.0 + (DIM as f64 + 4.0) * F32_U
}

/// The margin's target function in f64 (combined margin, no fallback, as the configs here use).
fn target_fn(margin: &Margin, c: f64) -> f64 {
    (margin.m1 * c.acos() + margin.m2).cos() - margin.m3
}

fn logit(margin: &Margin, c: f32, target: bool) -> f64 {
    let c = f64::from(c).clamp(-1.0, 1.0);
    margin.scale * if target { target_fn(margin, c) } else { c }
}

fn norm_f32(v: &[f32]) -> f64 {
    v.iter()
        .map(|&a| f64::from(a) * f64::from(a))
        .sum::<f64>()
        .sqrt()
}

fn diff_norm(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// A measured error against its bound.
#[derive(Debug, Clone, Copy, Default)]
struct Check {
    /// Largest measured error (absolute, or relative to the natural scale where noted).
    measured: f64,
    /// The bound at the entry where measured/bound is largest.
    bound: f64,
    /// max measured/bound over all entries (≤ 1 passes).
    ratio: f64,
}

impl Check {
    fn add(&mut self, measured: f64, bound: f64) {
        self.measured = self.measured.max(measured);
        // An exact zero meets any bound, a zero one included (a class whose 16-bit gradient
        // underflowed to zero in both runs).
        let r = if measured == 0.0 {
            0.0
        } else {
            measured / bound
        };
        if r > self.ratio || r.is_nan() {
            self.ratio = r;
            self.bound = bound;
        }
    }
    /// `add` relative to `scale`; a zero scale (a row or class whose 16-bit gradient underflowed
    /// to zero everywhere) is checked in absolute terms.
    fn add_relative(&mut self, measured: f64, bound: f64, scale: f64) {
        if scale > 0.0 {
            self.add(measured / scale, bound / scale);
        } else {
            self.add(measured, bound);
        }
    }
    fn ok(&self) -> bool {
        self.ratio <= 1.0
    }
}

/// Measured errors and bounds of a 16-bit run against an f32 run.
#[derive(Debug, Default)]
struct Accuracy {
    /// |c̃ − c| against the a-priori ε_c.
    cos: Check,
    /// |loss̃ − loss| against the bound from the measured logit shifts.
    loss: Check,
    /// |loss̃ − loss| against the a-priori 2·s·ε_c (+ margin slope, see `loss_apriori`).
    loss_apriori: Check,
    /// |α g̃ − G| per logit.
    grad_logits: Check,
    /// Embedding gradient rows, relative to their scale ν·A_i/‖x_i‖.
    grad_x: Check,
    /// Dense weight gradient rows of sampled classes, relative to their scale.
    grad_w: Check,
    /// Weights after `step`, rows of sampled classes (absolute).
    weight: Check,
    /// Largest logit shift s·|Δc| seen (for the report).
    max_dz: f64,
}

impl Accuracy {
    fn failures(&self) -> Vec<String> {
        [
            ("cosines", self.cos),
            ("loss", self.loss),
            ("loss (a priori)", self.loss_apriori),
            ("logits' gradient", self.grad_logits),
            ("embedding gradient", self.grad_x),
            ("weight gradient", self.grad_w),
            ("weights after step", self.weight),
        ]
        .iter()
        .filter(|(_, c)| !c.ok())
        .map(|(n, c)| {
            format!(
                "{n}: measured {:.3e}, ratio to bound {:.3}",
                c.measured, c.ratio
            )
        })
        .collect()
    }
}

/// The columns of each row's target, or None (label outside the sample cannot happen here).
fn target_columns(sampled: &[i64], labels: &[i64]) -> Vec<usize> {
    labels
        .iter()
        .map(|l| sampled.binary_search(l).expect("every label is sampled"))
        .collect()
}

/// Checks a 16-bit run against an f32 run of the same configuration, world and inputs.
fn accuracy(reference: &Run, emu: &Run, data: &Data, cfg: &LayerConfig, world: usize) -> Accuracy {
    let half = Half::of(cfg.precision);
    let (u, tau) = (half.u, half.tau);
    let margin = cfg.margin;
    let s_scale = margin.scale;
    let nu = nu();
    assert_eq!(
        reference.sampled, emu.sampled,
        "the sample must not depend on precision"
    );
    let cols = emu.sampled.len();
    let rows = BATCH;
    assert_eq!(reference.cos.len(), rows * cols);
    assert_eq!(emu.cos.len(), rows * cols);
    assert_eq!(reference.alpha, 1.0);
    let alpha = f64::from(emu.alpha);
    let targets = target_columns(&emu.sampled, &data.labels);
    let eps_c = half.eps_cos(nu);
    let eps_z = s_scale * 2f64.powi(-18);
    let eta_p = 2f64.powi(-17) + 4.0 * (cols as f64 + 8.0) * F32_U;
    let mut acc = Accuracy::default();

    // Cosines (a priori), and the clamps' precondition: no cosine near ±1, where one path could
    // clip and the other not.
    for (&c16, &c32) in emu.cos.iter().zip(&reference.cos) {
        assert!(
            c32.abs() < 1.0 - 4.0 * eps_c as f32,
            "cosine {c32} too close to ±1"
        );
        let d = (f64::from(c16).clamp(-1.0, 1.0) - f64::from(c32).clamp(-1.0, 1.0)).abs();
        acc.cos.add(d, eps_c);
    }

    // Softmax, loss and the logits' gradient, row by row.
    let mut dg = vec![0.0f64; rows * cols]; // |α g̃ − G|
    let mut loss_bound = 0.0;
    let mut loss_apriori = 0.0;
    for i in 0..rows {
        let t = targets[i];
        let z32: Vec<f64> = (0..cols)
            .map(|j| logit(&margin, reference.cos[i * cols + j], j == t))
            .collect();
        let z16: Vec<f64> = (0..cols)
            .map(|j| logit(&margin, emu.cos[i * cols + j], j == t))
            .collect();
        let dz: Vec<f64> = z16.iter().zip(&z32).map(|(a, b)| a - b).collect();
        let (lo, hi) = dz
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        acc.max_dz = acc.max_dz.max(lo.abs()).max(hi.abs());
        let zmax = z32.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z32.iter().map(|z| (z - zmax).exp()).sum();
        let p: Vec<f64> = z32.iter().map(|z| (z - zmax).exp() / sum).collect();
        let row_loss = -p[t].max(1e-30).ln();
        let eta_l = 2f64.powi(-17) + 4.0 * (cols as f64 + 8.0) * F32_U + 2.0 * F32_U * row_loss;
        loss_bound += (hi - dz[t]).max(dz[t] - lo) + 4.0 * eps_z + 2.0 * eta_l;
        // A priori: every non-target logit moves by s·ε_c, the target by s·ε_c times the
        // margin function's largest slope on [c − ε_c, c + ε_c].
        let ct = f64::from(reference.cos[i * cols + t]);
        let slope = (0..=64)
            .map(|k| {
                let c = (ct - eps_c + 2.0 * eps_c * k as f64 / 64.0).clamp(-1.0, 1.0);
                let h = 1e-7;
                ((target_fn(&margin, c + h) - target_fn(&margin, c - h)) / (2.0 * h)).abs()
            })
            .fold(1.0f64, f64::max)
            * 1.01;
        loss_apriori += s_scale * eps_c * (1.0 + slope) + 4.0 * eps_z + 2.0 * eta_l;

        for j in 0..cols {
            let y = if j == t { 1.0 } else { 0.0 };
            let rho = ((dz[j] - lo + 4.0 * eps_z).exp() - 1.0)
                .max(1.0 - (dz[j] - hi - 4.0 * eps_z).exp());
            let pj = p[j];
            let moved = (pj - y).abs() + pj * rho;
            let bound = alpha
                * (s_scale * pj * rho
                    + u * s_scale * moved
                    + tau
                    + 2.0
                        * s_scale
                        * ((eta_p + 2.0 * eps_z) * pj * (1.0 + rho) + 2.0 * F32_U * moved));
            let got = alpha * f64::from(emu.grad[i * cols + j]);
            let want = f64::from(reference.grad[i * cols + j]);
            let d = (got - want).abs();
            dg[i * cols + j] = d;
            acc.grad_logits.add(d, bound);
        }
    }
    let loss_diff = (f64::from(emu.loss) - f64::from(reference.loss)).abs();
    let loss_round = 2.0 * F32_U * f64::from(reference.loss.abs());
    acc.loss
        .add(loss_diff, loss_bound / rows as f64 + loss_round);
    acc.loss_apriori
        .add(loss_diff, loss_apriori / rows as f64 + loss_round);

    // Embedding gradient rows.
    let kappa_x = gamma(cols) + gamma(DIM) + (world as f64 + 8.0) * F32_U;
    for i in 0..rows {
        let a: f64 = (0..cols)
            .map(|j| f64::from(reference.grad[i * cols + j]).abs())
            .sum();
        let sd: f64 = dg[i * cols..(i + 1) * cols].iter().sum();
        let xn = norm_f32(&data.x[i * DIM..(i + 1) * DIM]);
        let scale = nu * a / xn;
        let bound = (1.0 + 1e-6) / xn
            * ((1.0 + u) * nu * sd
                + (u * nu + (DIM as f64).sqrt() * tau) * a
                + 2.0 * kappa_x * (1.0 + u) * nu * (a + sd));
        let d = diff_norm(
            &emu.grad_x[i * DIM..(i + 1) * DIM],
            &reference.grad_x[i * DIM..(i + 1) * DIM],
        );
        acc.grad_x.add_relative(d, bound, scale);
    }

    // Weight gradient and weights after the step, per class; unsampled classes untouched.
    let kappa_w = gamma(rows) + gamma(DIM) + 8.0 * F32_U;
    assert_eq!(reference.weight0, emu.weight0);
    let mut sampled_row = vec![false; CLASSES as usize];
    for (j, &c) in emu.sampled.iter().enumerate() {
        let c = c as usize;
        sampled_row[c] = true;
        let a: f64 = (0..rows)
            .map(|i| f64::from(reference.grad[i * cols + j]).abs())
            .sum();
        let sd: f64 = (0..rows).map(|i| dg[i * cols + j]).sum();
        let r = c * DIM..(c + 1) * DIM;
        let wn = norm_f32(&reference.weight0[r.clone()]);
        let scale = nu * a / wn;
        let bound = (1.0 + 1e-6) / wn
            * ((1.0 + u) * nu * sd
                + (u * nu + (DIM as f64).sqrt() * tau) * a
                + 2.0 * kappa_w * (1.0 + u) * nu * (a + sd));
        let d = diff_norm(&emu.grad_w[r.clone()], &reference.grad_w[r.clone()]);
        acc.grad_w.add_relative(d, bound, scale);

        let lr = f64::from(LR);
        let rounding = 2.0
            * (F32_U * norm_f32(&reference.weight1[r.clone()])
                + lr * 4.0
                    * F32_U
                    * (norm_f32(&reference.grad_w[r.clone()]) + f64::from(WEIGHT_DECAY) * wn));
        let dw = diff_norm(&emu.weight1[r.clone()], &reference.weight1[r.clone()]);
        acc.weight
            .add(dw, lr * bound * (1.0 + 4.0 * F32_U) + rounding);
    }
    for c in (0..CLASSES as usize).filter(|&c| !sampled_row[c]) {
        let r = c * DIM..(c + 1) * DIM;
        assert!(emu.grad_w[r.clone()].iter().all(|&v| v == 0.0));
        assert!(reference.grad_w[r.clone()].iter().all(|&v| v == 0.0));
        assert_eq!(
            emu.weight1[r.clone()],
            reference.weight1[r],
            "an unsampled class moved differently"
        );
    }
    acc
}

fn precisions() -> [GemmPrecision; 2] {
    [GemmPrecision::Bf16, GemmPrecision::F16]
}

// ---------------------------------------------------------------------------------------------
// 0. The emulator itself.
// ---------------------------------------------------------------------------------------------

/// `gemm_nt16` is the f32 product of the rounded operands, rounded (f16 saturating); the held
/// copies grow only when short; `gemm_backward16` uses them as they are with `reuse_operands`
/// and casts again without it; at f32 precision the 16-bit GEMMs refuse.
#[test]
fn emulator_follows_the_cuda_backend_contract() {
    let (m, n, k) = (3, 4, 5);
    let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.91).cos()).collect();
    for (precision, dtype) in [
        (GemmPrecision::Bf16, Dtype::Bf16),
        (GemmPrecision::F16, Dtype::F16),
    ] {
        let mut e = Emulated16::new(Fault::None);
        e.set_gemm_precision(precision).unwrap();
        assert_eq!(e.logits_dtype(), dtype);
        e.reserve_gemm_operands(2, 100).unwrap();
        assert_eq!(e.gemm_operand_bytes(), 2 * 102);
        let mut c = vec![0u16; m * n];
        e.gemm_nt16(m, n, k, &a, &b, &mut c).unwrap();
        // `a` grew to m·k (it held 2), `b` kept its 100.
        assert_eq!(e.gemm_operand_bytes(), 2 * (m * k + 100) as u64);
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k)
                    .map(|l| {
                        widen(narrow(a[i * k + l], dtype), dtype)
                            * widen(narrow(b[j * k + l], dtype), dtype)
                    })
                    .sum();
                let got = widen(c[i * n + j], dtype);
                let want = widen(narrow(dot, dtype), dtype);
                // The GEMM's f32 accumulation order is its own: one 16-bit step at most.
                assert!((got - want).abs() <= 2.0 * f32::EPSILON.max(want.abs() * 2f32.powi(-7)));
            }
        }
        // f16 saturates like `narrow`: a product of 300 × 300 is 90000 > 65504.
        if dtype == Dtype::F16 {
            let mut big = vec![0u16; 1];
            e.gemm_nt16(1, 1, 1, &vec![300.0], &vec![300.0], &mut big)
                .unwrap();
            assert_eq!(widen(big[0], dtype), 65504.0);
            e.gemm_nt16(m, n, k, &a, &b, &mut c).unwrap();
        }
        // Backward with a gradient of ones: grad_x[i] = alpha · Σ_j w̃_j, grad_w[j] = alpha · Σ_i x̃_i.
        let g = vec![narrow(1.0, dtype); m * n];
        let (mut gx, mut gw) = (vec![0.0f32; m * k], vec![0.0f32; n * k]);
        let other_b: Vec<f32> = b.iter().map(|v| v + 0.25).collect();
        // Reuse: the held copies of the forward's `b`, not `other_b`.
        e.gemm_backward16(m, n, k, &g, 0.5, &other_b, &a, &mut gx, &mut gw, true)
            .unwrap();
        let sum_b = |src: &[f32], l: usize| -> f32 {
            (0..n)
                .map(|j| widen(narrow(src[j * k + l], dtype), dtype))
                .sum::<f32>()
                * 0.5
        };
        for (l, v) in gx[..k].iter().enumerate() {
            assert!((v - sum_b(&b, l)).abs() < 1e-5, "reuse must not recast");
        }
        // No reuse: cast again from the arguments.
        e.gemm_backward16(m, n, k, &g, 0.5, &other_b, &a, &mut gx, &mut gw, false)
            .unwrap();
        for (l, v) in gx[..k].iter().enumerate() {
            assert!(
                (v - sum_b(&other_b, l)).abs() < 1e-5,
                "no reuse must recast"
            );
        }
        let log = e.take_log().unwrap();
        assert!(matches!(
            log.calls.last(),
            Some(Call::GemmBackward16 {
                reuse: false,
                held_current: false,
                ..
            })
        ));
    }
    let e = Emulated16::new(Fault::None);
    let mut c = vec![0u16; m * n];
    assert!(e.gemm_nt16(m, n, k, &a, &b, &mut c).is_err());
}

// ---------------------------------------------------------------------------------------------
// 1. Memory.
// ---------------------------------------------------------------------------------------------

#[test]
fn memory_report_matches_the_plan_with_16_bit_logits_and_operands() {
    let d = data(1);
    for precision in precisions() {
        for world in [1, 3] {
            for update in [UpdateMode::Sparse, UpdateMode::Dense] {
                let cfg = config(world, precision, Margin::arcface(), update);
                let out = emulated(world, &cfg, &d, None);
                for r in &out.ranks {
                    let what = format!("{precision} world {world} {update:?}");
                    assert_eq!(r.report, r.planned, "{what}: report vs plan");
                    assert_eq!(r.report_after, r.report, "{what}: a step grew a buffer");
                    let get = |c: Component| r.report.iter().find(|(k, _)| *k == c).unwrap().1;
                    // Logits rows and sampled-center rows padded to a multiple of 8.
                    let (m, dim) = (BATCH as u64, DIM as u64);
                    let s = r.sampled_capacity.next_multiple_of(8);
                    assert_eq!(get(Component::Logits), 2 * m * s, "{what}: logits");
                    assert_eq!(
                        get(Component::GemmOperands),
                        2 * (m * dim + s * dim),
                        "{what}: operand copies"
                    );
                    assert!(get(Component::GemmOperands) > 0);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Accuracy against the f32 layer.
// ---------------------------------------------------------------------------------------------

/// The wrapper at f32 precision is the CPU backend: same results, bit for bit. (So the f32
/// reference below, which runs through the wrapper to record its logits, is the f32 CPU layer.)
#[test]
fn wrapper_at_f32_is_the_cpu_backend() {
    let d = data(2);
    for world in [1, 3] {
        let cfg = config(
            world,
            GemmPrecision::F32,
            Margin::arcface(),
            UpdateMode::Dense,
        );
        let cpu = run(world, &cfg, || CpuBackend, &d, None);
        let wrapped = emulated(world, &cfg, &d, None);
        assert_eq!(cpu.loss.to_bits(), wrapped.loss.to_bits());
        assert_eq!(cpu.grad_x, wrapped.grad_x);
        assert_eq!(cpu.grad_w, wrapped.grad_w);
        assert_eq!(cpu.weight1, wrapped.weight1);
        assert_eq!(cpu.sampled, wrapped.sampled);
        let log = wrapped.ranks[0].log.as_ref().unwrap();
        assert!(log.calls.contains(&Call::Gemm("gemm_nt")));
        assert!(!log
            .calls
            .iter()
            .any(|c| matches!(c, Call::GemmNt16 { .. } | Call::GemmBackward16 { .. })));
    }
}

/// Gradient accumulation on a backend without its own `scatter_add_rows` (the wrapper leaves it
/// to `Backend`'s host default): the sums, and the weights after the update, are the CPU
/// backend's, bit for bit.
#[test]
fn accumulation_through_the_default_scatter_add_rows() {
    use partial_fc::collective::SingleRank;
    let d = data(4);
    let cfg = config(1, GemmPrecision::F32, Margin::arcface(), UpdateMode::Dense);
    let mut cpu = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let mut wrapped = PartialFc::new(cfg, Emulated16::new(Fault::None), SingleRank).unwrap();
    let n = d.labels.len() / 2;
    let dim = d.x.len() / d.labels.len();
    for pass in 0..3 {
        // Halves of the batch in turn: three passes, three samples.
        let half = pass % 2;
        let (x, labels) = (
            &d.x[half * n * dim..(half + 1) * n * dim],
            &d.labels[half * n..(half + 1) * n],
        );
        cpu.forward_backward_accumulate(x, labels).unwrap();
        wrapped.forward_backward_accumulate(x, labels).unwrap();
        assert_eq!(
            cpu.weight_grad_dense().unwrap(),
            wrapped.weight_grad_dense().unwrap(),
            "pass {pass}"
        );
    }
    cpu.step(0.1).unwrap();
    wrapped.step(0.1).unwrap();
    assert_eq!(cpu.weight().unwrap(), wrapped.weight().unwrap());
}

#[test]
fn sixteen_bit_layer_is_within_its_derived_bounds_of_the_f32_layer() {
    let d = data(3);
    let cases = [
        (Margin::arcface(), UpdateMode::Sparse),
        (Margin::cosface(), UpdateMode::Dense),
    ];
    for precision in precisions() {
        for world in [1, 3] {
            for (margin, update) in cases {
                let f32_cfg = config(world, GemmPrecision::F32, margin, update);
                let cfg = config(world, precision, margin, update);
                let reference = emulated(world, &f32_cfg, &d, None);
                let emu = emulated(world, &cfg, &d, None);
                let acc = accuracy(&reference, &emu, &d, &cfg, world);
                eprintln!(
                    "{precision} k={world} m2={} m3={}: loss {:.5} vs {:.5}; max s·|Δc| {:.4}\n  \
                     cos {:.2e} (ε_c {:.2e}); loss {:.2e} (bound {:.2e}, a priori {:.2e}); \
                     dG/bound {:.3}; grad_x rel {:.2e} (ratio {:.3}); grad_w rel {:.2e} \
                     (ratio {:.3}); weights {:.2e} (ratio {:.3})",
                    margin.m2,
                    margin.m3,
                    emu.loss,
                    reference.loss,
                    acc.max_dz,
                    acc.cos.measured,
                    acc.cos.bound,
                    acc.loss.measured,
                    acc.loss.bound,
                    acc.loss_apriori.bound,
                    acc.grad_logits.ratio,
                    acc.grad_x.measured,
                    acc.grad_x.ratio,
                    acc.grad_w.measured,
                    acc.grad_w.ratio,
                    acc.weight.measured,
                    acc.weight.ratio,
                );
                let failures = acc.failures();
                assert!(
                    failures.is_empty(),
                    "{precision} world {world}: {failures:#?}"
                );
                // Not vacuous: the 16-bit path does differ from the f32 one.
                assert!(acc.cos.measured > 0.0 && acc.grad_x.measured > 0.0);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The reuse contract.
// ---------------------------------------------------------------------------------------------

#[test]
fn backward_reuses_the_forward_operand_copies() {
    let d = data(4);
    for precision in precisions() {
        for world in [1, 3] {
            let cfg = config(world, precision, Margin::arcface(), UpdateMode::Sparse);
            let out = emulated(world, &cfg, &d, None);
            let softmax: &[&str] = if world == 1 {
                &["margin_softmax_fused16"]
            } else {
                &["margin_rowmax16", "exp_rowsum16", "softmax_loss_grad16"]
            };
            for r in &out.ranks {
                let calls = &r.log.as_ref().unwrap().calls;
                // The GEMMs run over the padded logits rows (`LogitsShape::aligned`).
                let s = r.sampled.len().next_multiple_of(8);
                assert!(
                    !calls.iter().any(|c| matches!(c, Call::Gemm(_))),
                    "an f32 GEMM ran at 16-bit precision: {calls:?}"
                );
                let nt: Vec<usize> = (0..calls.len())
                    .filter(|&i| matches!(calls[i], Call::GemmNt16 { .. }))
                    .collect();
                let bw: Vec<usize> = (0..calls.len())
                    .filter(|&i| matches!(calls[i], Call::GemmBackward16 { .. }))
                    .collect();
                assert_eq!((nt.len(), bw.len()), (1, 1), "{calls:?}");
                let (nt, bw) = (nt[0], bw[0]);
                assert_eq!(
                    calls[nt],
                    Call::GemmNt16 {
                        m: BATCH,
                        n: s,
                        k: DIM
                    }
                );
                // Between the two GEMMs only the softmax of the 16-bit logits runs.
                let between: Vec<Call> = softmax.iter().map(|&k| Call::Kernel(k)).collect();
                assert_eq!(calls[nt + 1..bw], between[..], "{calls:?}");
                assert_eq!(
                    calls[bw],
                    Call::GemmBackward16 {
                        rows: BATCH,
                        cols: s,
                        dim: DIM,
                        alpha: 1.0 / BATCH as f32,
                        reuse: true,
                        held_current: true,
                    }
                );
            }
        }
    }
}

/// The layer's gradients really come from the held copies: corrupting them between the forward
/// and the backward GEMM (which the layer vouches does not happen) breaks the comparison of
/// test 2, while the loss (computed before) still passes.
#[test]
fn corrupted_operand_copies_break_the_gradients() {
    let d = data(3);
    for precision in precisions() {
        for world in [1, 3] {
            let f32_cfg = config(
                world,
                GemmPrecision::F32,
                Margin::arcface(),
                UpdateMode::Sparse,
            );
            let cfg = config(world, precision, Margin::arcface(), UpdateMode::Sparse);
            let reference = emulated(world, &f32_cfg, &d, None);
            let bad = run(
                world,
                &cfg,
                || Emulated16::new(Fault::CorruptHeld),
                &d,
                None,
            );
            let acc = accuracy(&reference, &bad, &d, &cfg, world);
            eprintln!(
                "{precision} k={world} corrupted copies: measured/bound grad_x {:.1}, grad_w {:.1}, \
                 weights {:.1}",
                acc.grad_x.ratio, acc.grad_w.ratio, acc.weight.ratio
            );
            assert!(acc.loss.ok() && acc.grad_logits.ok(), "{acc:?}");
            assert!(
                acc.grad_x.ratio > 10.0 && acc.grad_w.ratio > 10.0 && acc.weight.ratio > 10.0,
                "{precision} world {world}: corruption went unnoticed: {acc:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Three ranks equal one rank in 16 bits.
// ---------------------------------------------------------------------------------------------

#[test]
fn three_ranks_equal_one_rank_in_16_bit() {
    let d = data(5);
    // A given sample (every label and 150 other classes), so that both worlds use the same.
    let mut rng = Rng(99);
    let mut sample = d.labels.clone();
    while sample.len() < BATCH + 150 {
        sample.push((rng.next() % CLASSES) as i64);
    }
    sample.sort_unstable();
    sample.dedup();
    for precision in precisions() {
        for (margin, update) in [
            (Margin::arcface(), UpdateMode::Sparse),
            (Margin::cosface(), UpdateMode::Dense),
        ] {
            let half = Half::of(precision);
            let one = emulated(1, &config(1, precision, margin, update), &d, Some(&sample));
            let three = emulated(3, &config(3, precision, margin, update), &d, Some(&sample));
            assert_eq!(one.sampled, sample);
            assert_eq!(three.sampled, sample);
            let cols = sample.len();
            let rows = BATCH;
            // The logits GEMM: entry (i, j) is the same length-d dot product of the same 16-bit
            // operands on either side, which the CPU GEMM accumulates in the same order whatever
            // the number of columns: identical cosines.
            assert_eq!(one.cos, three.cos, "{precision}: 16-bit cosines differ");
            assert_eq!(one.alpha, three.alpha);
            let alpha = f64::from(one.alpha);

            // Softmax: the fused one-pass row vs three passes with all-reduced max and sum. Same
            // logits, so the f32 values differ only by the sum's rounding order, |Δ| ≤ 2·η_p·p ≪
            // the 16-bit spacing: the 16-bit gradients are equal or one 16-bit step apart.
            let eta_p = 2f64.powi(-17) + 4.0 * (cols as f64 + 8.0) * F32_U;
            let mut steps = 0;
            let mut dg = vec![0.0f64; rows * cols];
            for (k, dgk) in dg.iter_mut().enumerate() {
                let (a, b) = (f64::from(one.grad[k]), f64::from(three.grad[k]));
                let diff = (a - b).abs();
                assert!(
                    diff <= half.spacing(a.abs().max(b.abs())),
                    "{precision}: logits' gradient {a} vs {b} differ by more than one 16-bit step"
                );
                steps += usize::from(diff > 0.0);
                *dgk = alpha * diff;
            }
            // Loss: each row's −log p differs by both sides' f32 evaluation, η_l per side (its
            // mean over rows: η_p + 2⁻²³·loss), and the mean's final rounding.
            let loss_bound = 2.0 * (eta_p + 2.0 * F32_U * f64::from(one.loss))
                + 2.0 * F32_U * f64::from(one.loss);
            let loss_diff = (f64::from(one.loss) - f64::from(three.loss)).abs();
            assert!(
                loss_diff <= loss_bound,
                "{precision}: loss {loss_diff:e} > {loss_bound:e}"
            );

            // Embedding gradient: Σ_j ΔG_ij·‖w̃_j‖ plus both paths' f32 rounding (one GEMM over S
            // columns vs three over S/3 summed by the reduce-scatter, normalization per rank).
            let (u, nu) = (half.u, nu());
            let mut worst_x = Check::default();
            for i in 0..rows {
                let a: f64 = (0..cols)
                    .map(|j| alpha * f64::from(one.grad[i * cols + j]).abs())
                    .sum();
                let sd: f64 = dg[i * cols..(i + 1) * cols].iter().sum();
                let xn = norm_f32(&d.x[i * DIM..(i + 1) * DIM]);
                let kappa = gamma(cols) + gamma(DIM) + (3.0 + 8.0) * F32_U;
                let scale = (1.0 + u) * nu * a / xn;
                let bound = (1.0 + 1e-6) / xn
                    * ((1.0 + u) * nu * sd + 2.0 * kappa * (1.0 + u) * nu * (a + sd));
                let diff = diff_norm(
                    &one.grad_x[i * DIM..(i + 1) * DIM],
                    &three.grad_x[i * DIM..(i + 1) * DIM],
                );
                worst_x.add_relative(diff, bound, scale);
            }
            // Weight gradient and weights, per sampled class (GEMM over the same M rows).
            let mut worst_w = Check::default();
            let mut worst_step = Check::default();
            let kappa = gamma(rows) + gamma(DIM) + 8.0 * F32_U;
            for (j, &c) in sample.iter().enumerate() {
                let r = c as usize * DIM..(c as usize + 1) * DIM;
                let a: f64 = (0..rows)
                    .map(|i| alpha * f64::from(one.grad[i * cols + j]).abs())
                    .sum();
                let sd: f64 = (0..rows).map(|i| dg[i * cols + j]).sum();
                let wn = norm_f32(&one.weight0[r.clone()]);
                let scale = (1.0 + u) * nu * a / wn;
                let bound = (1.0 + 1e-6) / wn
                    * ((1.0 + u) * nu * sd + 2.0 * kappa * (1.0 + u) * nu * (a + sd));
                let diff = diff_norm(&one.grad_w[r.clone()], &three.grad_w[r.clone()]);
                worst_w.add_relative(diff, bound, scale);
                let lr = f64::from(LR);
                let rounding = 2.0
                    * (F32_U * norm_f32(&one.weight1[r.clone()])
                        + lr * 4.0
                            * F32_U
                            * (norm_f32(&one.grad_w[r.clone()]) + f64::from(WEIGHT_DECAY) * wn));
                let dw = diff_norm(&one.weight1[r.clone()], &three.weight1[r]);
                worst_step.add(dw, lr * bound * (1.0 + 4.0 * F32_U) + rounding);
            }
            eprintln!(
                "{precision} m2={}: 1 vs 3 ranks: loss {:.2e} (bound {:.2e}); {steps} of {} \
                 gradient entries one 16-bit step apart; grad_x rel {:.2e} (ratio {:.3}); \
                 grad_w rel {:.2e} (ratio {:.3}); weights {:.2e} (ratio {:.3})",
                margin.m2,
                loss_diff,
                loss_bound,
                rows * cols,
                worst_x.measured,
                worst_x.ratio,
                worst_w.measured,
                worst_w.ratio,
                worst_step.measured,
                worst_step.ratio
            );
            assert!(worst_x.ok(), "{precision}: embedding gradient {worst_x:?}");
            assert!(worst_w.ok(), "{precision}: weight gradient {worst_w:?}");
            assert!(
                worst_step.ok(),
                "{precision}: weights after step {worst_step:?}"
            );
            let other: Vec<usize> = (0..CLASSES as usize)
                .filter(|c| sample.binary_search(&(*c as i64)).is_err())
                .collect();
            for c in other {
                let r = c * DIM..(c + 1) * DIM;
                assert_eq!(one.weight1[r.clone()], three.weight1[r]);
            }
        }
    }
}

/// A backend that does not override the AdamW methods (this emulator, like a third-party
/// backend written before AdamW) is refused at construction, naming the backend, not at the
/// first step; its direct AdamW calls are the default's typed refusal.
#[test]
fn a_backend_without_adamw_is_refused_at_construction() {
    let mut cfg = config(1, GemmPrecision::F32, Margin::arcface(), UpdateMode::Sparse);
    cfg.optimizer = Some(partial_fc::AdamW::default().into());
    let err = match PartialFc::new(cfg, Emulated16::new(Fault::None), SingleRank) {
        Err(e) => e,
        Ok(_) => panic!("an AdamW layer was built on a backend without AdamW"),
    };
    assert!(
        matches!(
            &err,
            PfcError::Param {
                name: "optimizer",
                ..
            }
        ) && err.to_string().contains("does not implement AdamW"),
        "{err}"
    );
    let e = Emulated16::new(Fault::None);
    let state = || StateBuf::alloc(&e, partial_fc::StateDtype::F32, 4).unwrap();
    let step = partial_fc::backend::AdamWStep {
        lr: 0.1,
        adamw: partial_fc::AdamW::default(),
        t: 1,
        seed: 0,
    };
    let err = e
        .adamw_dense(
            &mut vec![0.0; 4],
            &mut state(),
            &mut state(),
            &vec![0.0; 4],
            4,
            step,
        )
        .unwrap_err();
    assert!(matches!(err, PfcError::BackendUnavailable(_)), "{err}");
}
