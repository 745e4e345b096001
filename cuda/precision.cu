// Operand casts for the bf16/f16 GEMMs (src/cuda/mod.rs `Precision`): f32 -> 16-bit with round to
// nearest even, written as bit patterns (u16) so no CUDA headers are needed. CPU references:
// half::bf16::from_f32 and half::f16::from_f32 (same rounding).
#include "common.cuh"

typedef unsigned short u16;

// Grid-stride over a 64-bit count: at r = 1 a 16-bit GEMM operand of S·d values passes 2^31 at
// S = 4.2M classes of d = 512 on one GPU, which an `int` count would refuse.

// bf16 is the high half of an f32 (common.cuh `f32_to_bf16_bits`).
extern "C" __global__ void cast_f32_to_bf16(const float* x, u16* y, unsigned long long n) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = f32_to_bf16_bits(x[i]);
}

// f16 through the hardware conversion (round to nearest even, overflow to inf, subnormals kept).
extern "C" __global__ void cast_f32_to_f16(const float* x, u16* y, unsigned long long n) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = f32_to_half_rn(x[i], HALF_F16);
}
