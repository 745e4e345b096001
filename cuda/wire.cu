// The wire format of the embedding all-gather: per row, `dim` 16-bit values (f16 or bf16, round to
// nearest even) then the row's i64 label as four 16-bit words, little end first.
// CPU references: src/cpu/wire.rs. One block per row.
// Also the element-wise casts around the 16-bit reduce-scatter of the embedding gradient
// (LayerConfig::grad_wire): cast_to_wire before it, cast_from_wire after it, same rounding.
#include "common.cuh"

typedef unsigned short u16;

#define NORM_EPS 1e-12f   // torch.nn.functional.normalize's eps
// The wire codes are common.cuh's HALF_F16 / HALF_BF16, and its conversions: to_wire rounds to
// nearest even (an f16 overflow becomes +-inf, as the half crate's), from_wire is exact.
__device__ __forceinline__ u16 to_wire(float v, int wire) { return f32_to_half_rn(v, wire); }
__device__ __forceinline__ float from_wire(u16 b, int wire) { return half_to_f32(b, wire); }

extern "C" __global__ void pack_embeddings(const float* x, const long long* labels, int rows,
                                           int dim, int wire, u16* packed) {
    size_t row = blockIdx.x;
    const float* src = x + row * dim;
    u16* out = packed + row * (size_t)(dim + 4);
    for (int k = threadIdx.x; k < dim; k += blockDim.x) out[k] = to_wire(src[k], wire);
    if (threadIdx.x < 4) {
        unsigned long long l = (unsigned long long)labels[row];
        out[dim + threadIdx.x] = (u16)(l >> (16 * threadIdx.x));
    }
}

extern "C" __global__ void unpack_normalize(const u16* packed, int rows, int dim, int wire,
                                            long long* labels, float* x_hat, float* norms) {
    size_t row = blockIdx.x;
    const u16* in = packed + row * (size_t)(dim + 4);
    float* out = x_hat + row * dim;
    float ss = 0.0f;
    for (int k = threadIdx.x; k < dim; k += blockDim.x) {
        float v = from_wire(in[k], wire);
        out[k] = v;
        ss += v * v;
    }
    float norm = fmaxf(sqrtf(block_sum(ss)), NORM_EPS);
    float inv = inv_norm(norm);
    for (int k = threadIdx.x; k < dim; k += blockDim.x) out[k] *= inv;
    if (threadIdx.x == 0) {
        norms[row] = norm;
        unsigned long long l = 0;
        for (int w = 0; w < 4; ++w) l |= ((unsigned long long)in[dim + w]) << (16 * w);
        labels[row] = (long long)l;
    }
}

// Grid-stride loops: the gradient holds N*k*d values, which may outgrow one grid, and the count
// is 64-bit so that no size the layer accepts is refused here.
extern "C" __global__ void cast_to_wire(const float* x, unsigned long long n, int wire, u16* y) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = to_wire(x[i], wire);
}

extern "C" __global__ void cast_from_wire(const u16* x, unsigned long long n, int wire, float* y) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = from_wire(x[i], wire);
}
