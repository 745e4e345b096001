// The fused margin softmax in three passes; between them the host all-reduces the row maxima
// (max) and row sums (sum) over ranks. CPU references: src/cpu/margin_softmax.rs, same names.
// One block per row; each pass reads (and, for passes 1 and 3, writes) each logit once, with
// float4 loads where the row stride allows it.
//
// Rows are `ld` elements apart and hold `cols` logits (ld >= cols; the layer pads each row to a
// multiple of 8 so that rows start on 16-byte boundaries for cuBLAS and for the vector loads).
// No pass uses a value of the padding columns cols..ld (the vector load of a row's last four may
// load some, and pass 1 stores them back unchanged); pass 3 and the fused kernel write zeros
// there, so the backward GEMMs, which run over all ld columns, get nothing from them.
//
// With world size 1 the step runs margin_softmax_fused (at the end of this file) instead: the
// same softmax in one kernel with an online max and sum, the logits read twice and written once
// instead of read three times and written twice.
//
// row_loss holds 2 x rows floats: pass 3 (and the fused kernels) write each row's loss into the
// first half and its raw target cosine into the second (0 where the target lives on another
// rank), so that one all-reduce gives every rank both; the host derives each row's margin
// gradient from them (PartialFc's RowResults), which MagFace needs.
//
// Encodings shared with the CPU: a filtered non-target logit is stored as -0.0 (a kept zero as
// +0.0); a non-target cosine clipped to +-1 (|cos| > 1) is stored one ulp beyond +-s and passes
// no gradient, while a cosine of exactly +-1.0 (common in bf16) is inside the clamp and passes
// its gradient, as torch's clamp backward does.
#include "common.cuh"

#define MIN_PROBABILITY 1e-30f

// MarginParams, flattened (the kernels get them by value).
struct Margin {
    float scale, m1, m2, m3;
    int exact_grad, fallback;
    float fallback_cos, fallback_mm;
    int has_filter;
    float filter;
};

// clamp that keeps NaN (as Rust's f32::clamp).
__device__ __forceinline__ float clamp1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

__device__ __forceinline__ bool is_filtered(float z) { return __float_as_uint(z) == 0x80000000u; }

// Per-row margins (PartialFc::forward_backward_with, PassOptions::margins): 4 floats per row,
// the row's m2, m3 and its fallback constants, built on the host as MarginParams::for_row reads
// them; NULL when the pass has none. Only the target logit uses them, so only the thread that
// computes it (thread 0) calls this.
__device__ __forceinline__ Margin row_margin(Margin p, const float* rows, size_t i) {
    if (rows) {
        const float* r = rows + 4 * i;
        p.m2 = r[0];
        p.m3 = r[1];
        p.fallback_cos = r[2];
        p.fallback_mm = r[3];
    }
    return p;
}

// The angle m1 theta + m2, held at 0 from below: a negative per-row m2 (AdaFace) would
// otherwise fold cos back down near theta = 0. A NaN stays NaN. Never below 0 for m2 >= 0.
__device__ __forceinline__ float margin_angle(float c, const Margin& p) {
    float a = p.m1 * acosf(c) + p.m2;
    return a < 0.0f ? 0.0f : a;
}

// cos(m1 theta + m2) - m3 of a clamped cosine c, with the optional monotonic fallback.
__device__ float target_logit(float c, const Margin& p) {
    if (p.fallback && c <= p.fallback_cos) return c - p.fallback_mm - p.m3;
    if (p.m1 == 1.0f && p.m2 == 0.0f) return c - p.m3;
    return cosf(margin_angle(c, p)) - p.m3;
}

// d target_logit / d c (GradMode::Exact).
__device__ float target_logit_slope(float c, const Margin& p) {
    if ((p.fallback && c <= p.fallback_cos) || (p.m1 == 1.0f && p.m2 == 0.0f)) return 1.0f;
    float theta = acosf(c);
    if (p.m1 * theta + p.m2 < 0.0f) return 0.0f;  // held at 0 (margin_angle): flat
    // (1 - c)(1 + c), not 1 - c*c: ptxas would fuse the latter into one FMA (the CPU rounds c*c
    // first), and near c = 1 that cancellation moves sin θ by far more than an ulp. 1 - c is
    // exact for c >= 0.5 (Sterbenz), so this form is also the more accurate one near c = 1, and
    // nothing in it can be fused.
    float sin_theta = fmaxf(sqrtf(fmaxf((1.0f - c) * (1.0f + c), 0.0f)), 1e-6f);
    return p.m1 * sinf(p.m1 * theta + p.m2) / sin_theta;
}

// Pass 1 on one non-target logit.
__device__ __forceinline__ float margin_nontarget(float v, const Margin& p) {
    float c = clamp1(v);
    if (p.has_filter && c > p.filter) return -0.0f;
    float z = p.has_filter ? p.scale * c + 0.0f : p.scale * c;  // +0.0 turns -0 into +0
    // clipped: one ulp further from zero than +-s (a nonzero float, so +1 in its bits)
    return fabsf(v) > 1.0f ? __uint_as_float(__float_as_uint(z) + 1u) : z;
}

// Pass 1 on entry j of a row: a non-target logit, its max taken into m; the target (which thread
// 0 rewrites after the barrier) and the padding are returned as they are.
__device__ __forceinline__ float margin_entry(float v, int j, int t, int cols, const Margin& p,
                                              float& m) {
    if (j >= cols || j == t) return v;
    float z = margin_nontarget(v, p);
    m = fmaxf(m, z);
    return z;
}

extern "C" __global__ void margin_rowmax(float* logits, int rows, int cols, int ld,
                                         const int* labels, Margin p,
                                         const float* row_margins, float* row_max,
                                         float* target_cos) {
    size_t i = blockIdx.x;
    float* row = logits + i * ld;
    int t = labels[i];
    float m = -INFINITY;
    if ((ld & 3) == 0) {
        float4* row4 = (float4*)row;
        for (int q = threadIdx.x; q < (cols + 3) / 4; q += blockDim.x) {
            float4 v = row4[q];
            int j = 4 * q;
            v.x = margin_entry(v.x, j + 0, t, cols, p, m);
            v.y = margin_entry(v.y, j + 1, t, cols, p, m);
            v.z = margin_entry(v.z, j + 2, t, cols, p, m);
            v.w = margin_entry(v.w, j + 3, t, cols, p, m);
            row4[q] = v;
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            if (j == t) continue;
            float z = margin_nontarget(row[j], p);
            row[j] = z;
            m = fmaxf(m, z);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float tc = 0.0f;
        if (t >= 0) {
            float raw = row[t];
            float z = p.scale * target_logit(clamp1(raw), row_margin(p, row_margins, i));
            row[t] = z;
            m = fmaxf(m, z);
            tc = raw;
        }
        target_cos[i] = tc;
    }
    m = block_max(m);
    if (threadIdx.x == 0) row_max[i] = m;
}

// exp(z - max) of entry j of a row, 0 for the padding.
__device__ __forceinline__ float exp_entry(float z, int j, int cols, float max) {
    return j < cols ? expf(z - max) : 0.0f;
}

extern "C" __global__ void exp_rowsum(const float* logits, int rows, int cols, int ld,
                                      const float* row_max, float* row_sum) {
    size_t i = blockIdx.x;
    const float* row = logits + i * ld;
    float max = row_max[i];
    float s = 0.0f;
    if ((ld & 3) == 0) {
        const float4* row4 = (const float4*)row;
        for (int q = threadIdx.x; q < (cols + 3) / 4; q += blockDim.x) {
            float4 v = row4[q];
            int j = 4 * q;
            s += exp_entry(v.x, j, cols, max) + exp_entry(v.y, j + 1, cols, max) +
                 exp_entry(v.z, j + 2, cols, max) + exp_entry(v.w, j + 3, cols, max);
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x) s += expf(row[j] - max);
    }
    s = block_sum(s);
    if (threadIdx.x == 0) row_sum[i] = s;
}

// Pass 3 on one non-target logit: the gradient with respect to its clamped cosine.
__device__ __forceinline__ float grad_nontarget(float z, float max, float inv_sum, float slope,
                                                const Margin& p) {
    if ((p.has_filter && is_filtered(z)) || fabsf(z) > p.scale) return 0.0f;
    return expf(z - max) * inv_sum * slope;
}

// Pass 3 on the target: its gradient (returned) and loss -log p (into *loss), from its logit z,
// its raw cosine and the row's max and 1 / sum.
__device__ float target_loss_grad(float z, float raw, float max, float inv_sum, const Margin& p,
                                  float grad_scale, float* loss) {
    float prob = expf(z - max) * inv_sum;
    // NaN stays NaN (fmaxf would return the bound: a finite loss hiding a NaN), as on the CPU.
    *loss = prob != prob ? prob : -logf(fmaxf(prob, MIN_PROBABILITY));
    float s;
    if (!(raw >= -1.0f && raw <= 1.0f)) s = 0.0f;
    else if (p.exact_grad) s = p.scale * target_logit_slope(raw, p);
    else s = p.scale;
    return (prob - 1.0f) * s * grad_scale;
}

// Pass 3 on entry j of a row of pass-1 logits: a non-target's gradient, 0 for the padding; the
// target is returned as it is (thread 0 finishes it after the barrier).
__device__ __forceinline__ float grad_entry(float z, int j, int t, int cols, float max,
                                            float inv_sum, float slope, const Margin& p) {
    if (j >= cols) return 0.0f;
    if (j == t) return z;
    return grad_nontarget(z, max, inv_sum, slope, p);
}

extern "C" __global__ void softmax_loss_grad(float* logits, int rows, int cols, int ld,
                                             const int* labels, Margin p,
                                             const float* row_margins, const float* row_max,
                                             const float* row_sum, const float* target_cos,
                                             float grad_scale, float* row_loss) {
    size_t i = blockIdx.x;
    float* row = logits + i * ld;
    int t = labels[i];
    float max = row_max[i];
    float inv_sum = 1.0f / row_sum[i];
    float slope = p.scale * grad_scale;
    if ((ld & 3) == 0) {
        float4* row4 = (float4*)row;
        for (int q = threadIdx.x; q < ld / 4; q += blockDim.x) {
            float4 v = row4[q];
            int j = 4 * q;
            v.x = grad_entry(v.x, j + 0, t, cols, max, inv_sum, slope, p);
            v.y = grad_entry(v.y, j + 1, t, cols, max, inv_sum, slope, p);
            v.z = grad_entry(v.z, j + 2, t, cols, max, inv_sum, slope, p);
            v.w = grad_entry(v.w, j + 3, t, cols, max, inv_sum, slope, p);
            row4[q] = v;
        }
    } else {
        for (int j = threadIdx.x; j < ld; j += blockDim.x)
            row[j] = grad_entry(row[j], j, t, cols, max, inv_sum, slope, p);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float loss = 0.0f;
        if (t >= 0) {
            Margin q = row_margin(p, row_margins, i);
            row[t] = target_loss_grad(row[t], target_cos[i], max, inv_sum, q, grad_scale, &loss);
        }
        row_loss[i] = loss;
        row_loss[(size_t)rows + i] = t >= 0 ? target_cos[i] : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// margin_softmax_fused: the three passes in one kernel, for a world of one (nothing to
// all-reduce between them). Why: one launch instead of three, and the logits are read twice and
// written once (3 x 4 bytes per logit) where the passes read them three times and write them
// twice (5 x 4 bytes), so the softmax moves 3/5 of the bytes.
//
// Sweep 1 reads the raw cosines, applies pass 1 (clamp, filter, margin on the target, scale) in
// registers without storing it, and keeps an online softmax per thread: the running max and
// sum of exp(z - max), the sum rescaled by exp(old max - new max) when the max moves; the
// per-thread states are merged over the block. Sweep 2 rereads the raw cosines, recomputes the
// same logits (so the filtered -0.0 / clipped beyond-+-s rules are applied to exactly the values the
// passes would have stored) and writes pass 3's gradient over them. Thread 0 reads the raw target
// cosine in sweep 1, before any write, and finishes the target (loss and gradient) after a
// barrier, as pass 3 does. CPU reference: margin_softmax_fused in src/cpu/margin_softmax.rs.

// Adds logit z to the online state (m, s).
__device__ __forceinline__ void online_push(float& m, float& s, float z) {
    if (z > m) {
        s = s * expf(m - z) + 1.0f;
        m = z;
    } else {
        s += expf(z - m);  // a NaN z poisons the sum, as in exp_rowsum
    }
}

// Merges state (m2, s2) into (m, s); an empty state (s == 0) is skipped, since rescaling it would
// compute exp(-inf + inf). Symmetric, so every lane of a butterfly ends with the same bits: the
// products are rounded apart (__fmul_rn) because with --fmad=true the compiler would otherwise
// fuse one of them into an FMA with the sum, and the two partner lanes would fuse different
// ones (found by a review reading the sm_90 code; the emulator, without FMA, could not show it).
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    if (s2 == 0.0f) return;
    if (s == 0.0f) {
        m = m2;
        s = s2;
        return;
    }
    float mm = fmaxf(m, m2);
    s = __fadd_rn(__fmul_rn(s, expf(m - mm)), __fmul_rn(s2, expf(m2 - mm)));
    m = mm;
}

// Block-wide online merge, result on every thread; ends with a barrier (as block_sum).
__device__ void block_online(float& m, float& s) {
    __shared__ float part_m[WARP], part_s[WARP];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    for (int o = WARP / 2; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_s[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? part_m[lane] : -INFINITY;
    s = lane < warps ? part_s[lane] : 0.0f;
    for (int o = WARP / 2; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
    __syncthreads();
}

// Sweep 1 on entry j of a row of raw cosines: a non-target's logit into the online state.
__device__ __forceinline__ void online_entry(float& m, float& s, float v, int j, int t, int cols,
                                             const Margin& p) {
    if (j < cols && j != t) online_push(m, s, margin_nontarget(v, p));
}

// Sweep 2 on entry j of a row of raw cosines: a non-target's gradient, recomputed from its
// cosine; 0 for the padding; the target's cosine as it is (thread 0 writes its gradient).
__device__ __forceinline__ float fused_grad_entry(float v, int j, int t, int cols, float max,
                                                  float inv_sum, float slope, const Margin& p) {
    if (j >= cols) return 0.0f;
    if (j == t) return v;
    return grad_nontarget(margin_nontarget(v, p), max, inv_sum, slope, p);
}

extern "C" __global__ void margin_softmax_fused(float* logits, int rows, int cols, int ld,
                                                const int* labels, Margin p,
                                                const float* row_margins, float grad_scale,
                                                float* row_loss) {
    size_t i = blockIdx.x;
    float* row = logits + i * ld;
    int t = labels[i];
    float m = -INFINITY, s = 0.0f;
    bool vec4 = (ld & 3) == 0;

    // Sweep 1: read only.
    if (vec4) {
        const float4* row4 = (const float4*)row;
        for (int q = threadIdx.x; q < (cols + 3) / 4; q += blockDim.x) {
            float4 v = row4[q];
            int j = 4 * q;
            online_entry(m, s, v.x, j + 0, t, cols, p);
            online_entry(m, s, v.y, j + 1, t, cols, p);
            online_entry(m, s, v.z, j + 2, t, cols, p);
            online_entry(m, s, v.w, j + 3, t, cols, p);
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            if (j != t) online_push(m, s, margin_nontarget(row[j], p));
    }
    float raw = 0.0f, zt = 0.0f;
    if (threadIdx.x == 0 && t >= 0) {
        raw = row[t];
        zt = p.scale * target_logit(clamp1(raw), row_margin(p, row_margins, i));
        online_push(m, s, zt);
    }
    block_online(m, s);  // its barriers also order every sweep-1 read before any sweep-2 write
    float inv_sum = 1.0f / s;
    float slope = p.scale * grad_scale;

    // Sweep 2: recompute each logit from its cosine, write the gradient over it.
    if (vec4) {
        float4* row4 = (float4*)row;
        for (int q = threadIdx.x; q < ld / 4; q += blockDim.x) {
            float4 v = row4[q];
            int j = 4 * q;
            v.x = fused_grad_entry(v.x, j + 0, t, cols, m, inv_sum, slope, p);
            v.y = fused_grad_entry(v.y, j + 1, t, cols, m, inv_sum, slope, p);
            v.z = fused_grad_entry(v.z, j + 2, t, cols, m, inv_sum, slope, p);
            v.w = fused_grad_entry(v.w, j + 3, t, cols, m, inv_sum, slope, p);
            row4[q] = v;
        }
    } else {
        for (int j = threadIdx.x; j < ld; j += blockDim.x)
            row[j] = fused_grad_entry(row[j], j, t, cols, m, inv_sum, slope, p);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float loss = 0.0f;
        if (t >= 0) {
            Margin q = row_margin(p, row_margins, i);
            row[t] = target_loss_grad(zt, raw, m, inv_sum, q, grad_scale, &loss);
        }
        row_loss[i] = loss;
        row_loss[(size_t)rows + i] = raw;  // 0 where t < 0
    }
}

// ---------------------------------------------------------------------------------------------
// The same softmax on 16-bit cosines (bf16 or f16, `kind` as in common.cuh), used with 16-bit
// GEMMs: the logits GEMM writes the cosines in 16 bits and the backward GEMMs read the gradient
// in 16 bits, so the logits take half the bytes and need no cast. All arithmetic is f32. Pass 1
// only reads (s * cos rounded to 16 bits would lose up to 0.125 of a logit at s = 64), and passes
// 2 and 3 recompute each logit from its cosine, as the one-kernel sweep 2 does. The target's
// logit comes from its cosine wherever it is needed, so no thread waits for another's write.
// CPU references: src/cpu/margin_softmax16.rs, same names. Loads and stores of 4 values (8 bytes)
// where the row stride allows it; the padding columns as in the f32 passes.

typedef unsigned short u16;

__device__ __forceinline__ void load4_half(const u16* src, int kind, float v[4]) {
    uint2 w = *(const uint2*)src;
    v[0] = half_to_f32((u16)(w.x & 0xffffu), kind);
    v[1] = half_to_f32((u16)(w.x >> 16), kind);
    v[2] = half_to_f32((u16)(w.y & 0xffffu), kind);
    v[3] = half_to_f32((u16)(w.y >> 16), kind);
}

__device__ __forceinline__ void store4_half(u16* dst, int kind, const float v[4]) {
    uint2 w;
    w.x = (u32)f32_to_half(v[0], kind) | ((u32)f32_to_half(v[1], kind) << 16);
    w.y = (u32)f32_to_half(v[2], kind) | ((u32)f32_to_half(v[3], kind) << 16);
    *(uint2*)dst = w;
}

// The target's logit, gradient and loss are computed by thread 0 alone, as in the f32 passes:
// the loops below treat every column as a non-target (so the margin's acos/cos stay out of the
// vectorized loops), and thread 0 overwrites the target's entry after a barrier.

__device__ __forceinline__ float target_z16(const u16* row, int t, int kind, const Margin& p,
                                            float* raw) {
    *raw = half_to_f32(row[t], kind);
    return p.scale * target_logit(clamp1(*raw), p);
}

extern "C" __global__ void margin_rowmax16(const u16* cos, int rows, int cols, int ld, int kind,
                                           const int* labels, Margin p,
                                           const float* row_margins, float* row_max,
                                           float* target_cos) {
    size_t i = blockIdx.x;
    const u16* row = cos + i * ld;
    int t = labels[i];
    float m = -INFINITY;
    if ((ld & 3) == 0) {
        for (int q = threadIdx.x; q < (cols + 3) / 4; q += blockDim.x) {
            float v[4];
            load4_half(row + 4 * q, kind, v);
            for (int e = 0; e < 4; ++e)
                if (4 * q + e < cols && 4 * q + e != t) m = fmaxf(m, margin_nontarget(v[e], p));
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            if (j != t) m = fmaxf(m, margin_nontarget(half_to_f32(row[j], kind), p));
    }
    if (threadIdx.x == 0) {
        float raw = 0.0f;
        if (t >= 0) m = fmaxf(m, target_z16(row, t, kind, row_margin(p, row_margins, i), &raw));
        target_cos[i] = raw;
    }
    m = block_max(m);
    if (threadIdx.x == 0) row_max[i] = m;
}

extern "C" __global__ void exp_rowsum16(const u16* cos, int rows, int cols, int ld, int kind,
                                        const int* labels, Margin p,
                                        const float* row_margins, const float* row_max,
                                        float* row_sum) {
    size_t i = blockIdx.x;
    const u16* row = cos + i * ld;
    int t = labels[i];
    float max = row_max[i];
    float s = 0.0f;
    if ((ld & 3) == 0) {
        for (int q = threadIdx.x; q < (cols + 3) / 4; q += blockDim.x) {
            float v[4];
            load4_half(row + 4 * q, kind, v);
            for (int e = 0; e < 4; ++e)
                if (4 * q + e < cols && 4 * q + e != t) s += expf(margin_nontarget(v[e], p) - max);
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            if (j != t) s += expf(margin_nontarget(half_to_f32(row[j], kind), p) - max);
    }
    if (threadIdx.x == 0 && t >= 0) {
        float raw;
        s += expf(target_z16(row, t, kind, row_margin(p, row_margins, i), &raw) - max);
    }
    s = block_sum(s);
    if (threadIdx.x == 0) row_sum[i] = s;
}

// Sweep of pass 3 (and of the one kernel's sweep 2): every entry's non-target gradient from its
// cosine, rounded to 16 bits over it, and zeros over the padding. The target's entry gets a value
// thread 0 replaces.
__device__ __forceinline__ void grad_sweep16(u16* row, int cols, int ld, int kind, float max,
                                             float inv_sum, float slope, const Margin& p) {
    if ((ld & 3) == 0) {
        for (int q = threadIdx.x; q < ld / 4; q += blockDim.x) {
            float v[4];
            load4_half(row + 4 * q, kind, v);
            for (int e = 0; e < 4; ++e)
                v[e] = 4 * q + e < cols
                           ? grad_nontarget(margin_nontarget(v[e], p), max, inv_sum, slope, p)
                           : 0.0f;
            store4_half(row + 4 * q, kind, v);
        }
    } else {
        for (int j = threadIdx.x; j < ld; j += blockDim.x) {
            float g = 0.0f;
            if (j < cols) g = grad_nontarget(margin_nontarget(half_to_f32(row[j], kind), p), max,
                                             inv_sum, slope, p);
            row[j] = f32_to_half(g, kind);
        }
    }
}

extern "C" __global__ void softmax_loss_grad16(u16* cos, int rows, int cols, int ld, int kind,
                                               const int* labels, Margin p,
                                               const float* row_margins, const float* row_max,
                                               const float* row_sum, const float* target_cos,
                                               float grad_scale, float* row_loss) {
    size_t i = blockIdx.x;
    u16* row = cos + i * ld;
    int t = labels[i];
    float max = row_max[i];
    float inv_sum = 1.0f / row_sum[i];
    grad_sweep16(row, cols, ld, kind, max, inv_sum, p.scale * grad_scale, p);
    __syncthreads();
    if (threadIdx.x == 0) {
        float loss = 0.0f;
        if (t >= 0) {
            float raw = target_cos[i];  // pass 1 read it from this entry, before any write
            Margin q = row_margin(p, row_margins, i);
            float z = q.scale * target_logit(clamp1(raw), q);
            row[t] = f32_to_half(target_loss_grad(z, raw, max, inv_sum, q, grad_scale, &loss), kind);
        }
        row_loss[i] = loss;
        row_loss[(size_t)rows + i] = t >= 0 ? target_cos[i] : 0.0f;
    }
}

extern "C" __global__ void margin_softmax_fused16(u16* cos, int rows, int cols, int ld, int kind,
                                                  const int* labels, Margin p,
                                                  const float* row_margins, float grad_scale,
                                                  float* row_loss) {
    size_t i = blockIdx.x;
    u16* row = cos + i * ld;
    int t = labels[i];
    float m = -INFINITY, s = 0.0f;
    // Sweep 1: read only.
    if ((ld & 3) == 0) {
        for (int q = threadIdx.x; q < (cols + 3) / 4; q += blockDim.x) {
            float v[4];
            load4_half(row + 4 * q, kind, v);
            for (int e = 0; e < 4; ++e) online_entry(m, s, v[e], 4 * q + e, t, cols, p);
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            if (j != t) online_push(m, s, margin_nontarget(half_to_f32(row[j], kind), p));
    }
    float raw = 0.0f, zt = 0.0f;
    if (threadIdx.x == 0 && t >= 0) {
        zt = target_z16(row, t, kind, row_margin(p, row_margins, i), &raw);
        online_push(m, s, zt);
    }
    block_online(m, s);  // its barriers also order every sweep-1 read before any sweep-2 write
    float inv_sum = 1.0f / s;
    grad_sweep16(row, cols, ld, kind, m, inv_sum, p.scale * grad_scale, p);
    __syncthreads();
    if (threadIdx.x == 0) {
        float loss = 0.0f;
        if (t >= 0) {
            Margin q = row_margin(p, row_margins, i);
            row[t] = f32_to_half(target_loss_grad(zt, raw, m, inv_sum, q, grad_scale, &loss), kind);
        }
        row_loss[i] = loss;
        row_loss[(size_t)rows + i] = raw;  // 0 where t < 0
    }
}

// ---------------------------------------------------------------------------------------------
// scale_rows: per-row weights of the loss (PartialFc::forward_backward_weighted). After the
// softmax has written the logits' gradient, row i times weights[i]; the backward GEMMs and the
// normalizations' backward are linear in it, so the embeddings' and the centers' gradients are
// weighted alike (CPU reference: src/cpu/row_scale.rs). A block per row, vectorized where ld is
// a multiple of 4; the 16-bit form widens, multiplies in f32 and rounds back as the softmax
// stores its gradient (f16 saturating).
extern "C" __global__ void scale_rows(float* g, int rows, int ld, const float* weights) {
    size_t i = blockIdx.x;
    float* row = g + i * ld;
    float w = weights[i];
    if ((ld & 3) == 0) {
        float4* row4 = (float4*)row;
        for (int q = threadIdx.x; q < ld / 4; q += blockDim.x) {
            float4 v = row4[q];
            v.x *= w;
            v.y *= w;
            v.z *= w;
            v.w *= w;
            row4[q] = v;
        }
    } else {
        for (int j = threadIdx.x; j < ld; j += blockDim.x) row[j] *= w;
    }
}

extern "C" __global__ void scale_rows16(u16* g, int rows, int ld, int kind, const float* weights) {
    size_t i = blockIdx.x;
    u16* row = g + i * ld;
    float w = weights[i];
    for (int j = threadIdx.x; j < ld; j += blockDim.x)
        row[j] = f32_to_half(half_to_f32(row[j], kind) * w, kind);
}
