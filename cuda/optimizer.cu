// Scatter of sampled-row gradients, SGD with momentum and AdamW. CPU references:
// src/cpu/optimizer.rs. The state is stored as f32 or as bfloat16 bits (`_bf16` kernels); the
// arithmetic is f32.
#include "common.cuh"

typedef unsigned short u16;

// dense[index[i]] = rows[i]; dense was zeroed by the host (memset) before. One block per row.
extern "C" __global__ void scatter_rows(const float* rows, const int* index, int count, int dim,
                                        float* dense) {
    size_t i = blockIdx.x;
    size_t dst = (size_t)index[i];
    for (int k = threadIdx.x; k < dim; k += blockDim.x) dense[dst * dim + k] = rows[i * dim + k];
}

// dense[index[i]] += rows[i]: a pass's gradient added to those accumulated before it. The index
// holds each row once (a sample is sorted and unique), so no two blocks write one row.
extern "C" __global__ void scatter_add_rows(const float* rows, const int* index, int count,
                                            int dim, float* dense) {
    size_t i = blockIdx.x;
    size_t dst = (size_t)index[i];
    for (int k = threadIdx.x; k < dim; k += blockDim.x) dense[dst * dim + k] += rows[i * dim + k];
}

__device__ __forceinline__ float load_state(const float* v) { return *v; }
__device__ __forceinline__ float load_state(const u16* v) { return bf16_bits_to_f32(*v); }
__device__ __forceinline__ void store_state(float* v, float x) { *v = x; }
__device__ __forceinline__ void store_state(u16* v, float x) { *v = f32_to_bf16_bits(x); }

// v <- mu v + (g + wd w); w <- w - lr v, with w moved by the unrounded v.
template <typename State>
__device__ __forceinline__ void sgd_elem(float* w, State* v, float g, float lr, float mu, float wd) {
    float vn = mu * load_state(v) + (g + wd * *w);
    store_state(v, vn);
    *w -= lr * vn;
}

// The sampled rows only. One block per sampled row.
template <typename State>
__device__ void sgd_sparse(float* weight, State* momentum, const float* grad, const int* index,
                           int dim, float lr, float mu, float wd) {
    size_t i = blockIdx.x;
    size_t row = (size_t)index[i];
    for (int k = threadIdx.x; k < dim; k += blockDim.x)
        sgd_elem(weight + row * dim + k, momentum + row * dim + k, grad[i * dim + k], lr, mu, wd);
}

// Every element of the shard (grid-stride).
template <typename State>
__device__ void sgd_dense(float* weight, State* momentum, const float* grad, u64 len, float lr,
                          float mu, float wd) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        sgd_elem(weight + i, momentum + i, grad[i], lr, mu, wd);
}

extern "C" __global__ void sgd_momentum_sparse(float* weight, float* momentum, const float* grad,
                                               const int* index, int count, int dim, float lr,
                                               float mu, float wd) {
    sgd_sparse(weight, momentum, grad, index, dim, lr, mu, wd);
}

extern "C" __global__ void sgd_momentum_sparse_bf16(float* weight, u16* momentum, const float* grad,
                                                    const int* index, int count, int dim, float lr,
                                                    float mu, float wd) {
    sgd_sparse(weight, momentum, grad, index, dim, lr, mu, wd);
}

extern "C" __global__ void sgd_momentum_dense(float* weight, float* momentum, const float* grad,
                                              u64 len, float lr, float mu, float wd) {
    sgd_dense(weight, momentum, grad, len, lr, mu, wd);
}

extern "C" __global__ void sgd_momentum_dense_bf16(float* weight, u16* momentum, const float* grad,
                                                   u64 len, float lr, float mu, float wd) {
    sgd_dense(weight, momentum, grad, len, lr, mu, wd);
}

// AdamW on one element; the host computed the shared scalars (AdamWScalars) in f64:
// w <- w decay - step m / (sqrt(v) c2 + eps), with m, v the new, unrounded moments. bf16 moments
// are stored by stochastic rounding with rounding_bits(seed, t, element) (low half for m, high
// for v), so that v, which moves by 0.1% a step at beta2 = 0.999, does not stall.
struct AdamWScalars {
    float decay, beta1, beta2, step_size, inv_sqrt_bias2, eps;
    u64 seed, t;
};

__device__ __forceinline__ void store_moments(float* m, float* v, float mn, float vn, u64, const AdamWScalars&) {
    *m = mn;
    *v = vn;
}
__device__ __forceinline__ void store_moments(u16* m, u16* v, float mn, float vn, u64 element,
                                              const AdamWScalars& s) {
    u32 bits = rounding_bits(s.seed, s.t, element);
    *m = f32_to_bf16_stochastic(mn, bits);
    *v = f32_to_bf16_stochastic(vn, bits >> 16);
}

template <typename State>
__device__ __forceinline__ void adamw_elem(float* w, State* m, State* v, float g, u64 element,
                                           const AdamWScalars& s) {
    float mn = s.beta1 * load_state(m) + (1.0f - s.beta1) * g;
    float vn = s.beta2 * load_state(v) + (1.0f - s.beta2) * (g * g);
    store_moments(m, v, mn, vn, element, s);
    float denom = sqrtf(vn) * s.inv_sqrt_bias2 + s.eps;
    *w = *w * s.decay - s.step_size * (mn / denom);
}

// The sampled rows only ("lazy" Adam). One block per sampled row.
template <typename State>
__device__ void adamw_sparse(float* weight, State* exp_avg, State* exp_avg_sq, const float* grad,
                             const int* index, int dim, AdamWScalars s) {
    size_t i = blockIdx.x;
    size_t row = (size_t)index[i];
    for (int k = threadIdx.x; k < dim; k += blockDim.x) {
        size_t at = row * dim + k;
        adamw_elem(weight + at, exp_avg + at, exp_avg_sq + at, grad[i * dim + k], (u64)at, s);
    }
}

// Every element of the shard (grid-stride).
template <typename State>
__device__ void adamw_dense(float* weight, State* exp_avg, State* exp_avg_sq, const float* grad,
                            u64 len, AdamWScalars s) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        adamw_elem(weight + i, exp_avg + i, exp_avg_sq + i, grad[i], i, s);
}

#define ADAMW_SCALARS float decay, float beta1, float beta2, float step_size, float inv_sqrt_bias2, \
                      float eps, u64 seed, u64 t
#define ADAMW_STRUCT AdamWScalars{decay, beta1, beta2, step_size, inv_sqrt_bias2, eps, seed, t}

extern "C" __global__ void adamw_sparse_f32(float* weight, float* exp_avg, float* exp_avg_sq,
                                            const float* grad, const int* index, int count, int dim,
                                            ADAMW_SCALARS) {
    adamw_sparse(weight, exp_avg, exp_avg_sq, grad, index, dim, ADAMW_STRUCT);
}

extern "C" __global__ void adamw_sparse_bf16(float* weight, u16* exp_avg, u16* exp_avg_sq,
                                             const float* grad, const int* index, int count, int dim,
                                             ADAMW_SCALARS) {
    adamw_sparse(weight, exp_avg, exp_avg_sq, grad, index, dim, ADAMW_STRUCT);
}

extern "C" __global__ void adamw_dense_f32(float* weight, float* exp_avg, float* exp_avg_sq,
                                           const float* grad, u64 len, ADAMW_SCALARS) {
    adamw_dense(weight, exp_avg, exp_avg_sq, grad, len, ADAMW_STRUCT);
}

extern "C" __global__ void adamw_dense_bf16(float* weight, u16* exp_avg, u16* exp_avg_sq,
                                            const float* grad, u64 len, ADAMW_SCALARS) {
    adamw_dense(weight, exp_avg, exp_avg_sq, grad, len, ADAMW_STRUCT);
}
