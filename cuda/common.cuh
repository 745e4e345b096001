// Shared device helpers: integer types, block reductions, and the counter-based generator.
// Embedded in every kernel family by src/cuda/compile.rs (NVRTC sees one translation unit),
// so no CUDA headers are needed at all.
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define WARP 32
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#define QUIET_NAN __int_as_float(0x7fc00000)

// 1 / norm for an L2 normalization, NaN where the norm overflowed: a row whose sum of squares
// passes f32's range (a diverged class center) would otherwise normalize to zeros, cosine 0 with
// everything, and hide the divergence; NaN shows in the loss and in a prediction
// (src/cpu/normalize.rs, inv_norm).
__device__ __forceinline__ float inv_norm(float norm) {
    return norm < INFINITY ? 1.0f / norm : QUIET_NAN;
}

// bfloat16 as a bit pattern (no CUDA headers): the high half of an f32, rounded to nearest even;
// a NaN stays a quiet NaN. The same rounding as the `half` crate's bf16::from_f32.
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float v) {
    u32 bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (unsigned short)(bits >> 16);
}

// bfloat16 by stochastic rounding (src/cpu/optimizer.rs `bf16_stochastic`): `bits` (16 random
// bits) added below the kept half carry into it with probability (dropped bits) / 2^16, so the
// stored value is unbiased. A NaN rounds as above.
__device__ __forceinline__ unsigned short f32_to_bf16_stochastic(float v, u32 bits) {
    u32 x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) return f32_to_bf16_bits(v);
    return (unsigned short)((x + (bits & 0xffffu)) >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short b) {
    return __uint_as_float(((u32)b) << 16);
}

// 16-bit storage of the logits (src/cpu/margin_softmax16.rs): kind 1 = f16, 2 = bf16 (the codes
// of the wire format too). f16 goes through the hardware conversion (round to nearest even) and
// saturates at +-65504 instead of overflowing to inf; a NaN passes through.
#define HALF_F16 1
#define HALF_BF16 2

__device__ __forceinline__ float half_to_f32(unsigned short b, int kind) {
    if (kind == HALF_BF16) return bf16_bits_to_f32(b);
#ifdef PFC_EMULATOR  // the host emulator (crates/cuda-emulator) has no PTX
    return emu_f16_bits_to_f32(b);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
#endif
}

// Round to nearest even; an f16 beyond its range becomes +-inf (the wire format's rounding).
__device__ __forceinline__ unsigned short f32_to_half_rn(float v, int kind) {
    if (kind == HALF_BF16) return f32_to_bf16_bits(v);
#ifdef PFC_EMULATOR
    return emu_f32_to_f16_bits_rn(v);
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#endif
}

// The same, saturating f16 at +-65504 (the logits' gradient).
__device__ __forceinline__ unsigned short f32_to_half(float v, int kind) {
    if (kind != HALF_BF16) v = v < -65504.0f ? -65504.0f : (v > 65504.0f ? 65504.0f : v);
    return f32_to_half_rn(v, kind);
}

// Philox4x32-10 (Salmon et al., SC'11): the same rounds, constants and word order as
// src/rng.rs `philox4x32_10`, so a class draws identical bits on the CPU and the GPU.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
    const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    for (int round = 0; round < 10; round++) {
        if (round > 0) { k.x += W0; k.y += W1; }
        u32 hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        u32 hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// src/rng.rs `class_random_bits`: counter (class lo, class hi, step lo, step hi), key (seed lo, hi).
__device__ __forceinline__ u32 class_random_bits(u64 seed, u64 step, u64 cls) {
    uint4 c = make_uint4((u32)cls, (u32)(cls >> 32), (u32)step, (u32)(step >> 32));
    uint2 k = make_uint2((u32)seed, (u32)(seed >> 32));
    return philox4x32_10(c, k).x;
}

// src/rng.rs `rounding_bits`: the bits of the optimizer state's stochastic rounding, word
// element % 4 of the Philox block of element / 4.
__device__ __forceinline__ u32 rounding_bits(u64 seed, u64 t, u64 element) {
    u64 key = seed ^ 0xADA35EED0B0FF1CEull, group = element >> 2;
    uint4 c = make_uint4((u32)group, (u32)(group >> 32), (u32)t, (u32)(t >> 32));
    uint4 r = philox4x32_10(c, make_uint2((u32)key, (u32)(key >> 32)));
    switch (element & 3) {
    case 0: return r.x;
    case 1: return r.y;
    case 2: return r.z;
    default: return r.w;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum, result on every thread. blockDim.x must be a multiple of 32 (<= 1024).
// The trailing barrier lets a caller reduce twice in a row with the same scratch.
__device__ float block_sum(float v) {
    __shared__ float partial[WARP];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// Block-wide max (NaN ignored as fmaxf does), result on every thread.
__device__ float block_max(float v) {
    __shared__ float partial[WARP];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : -INFINITY;
    v = warp_max(v);
    __syncthreads();
    return v;
}
