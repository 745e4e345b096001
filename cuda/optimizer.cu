// Scatter of sampled-row gradients and SGD with momentum. CPU references: src/cpu/optimizer.rs.
// The momentum is stored as f32 or as bfloat16 bits (`_bf16` kernels); the arithmetic is f32.
#include "common.cuh"

typedef unsigned short u16;

// dense[index[i]] = rows[i]; dense was zeroed by the host (memset) before. One block per row.
extern "C" __global__ void scatter_rows(const float* rows, const int* index, int count, int dim,
                                        float* dense) {
    size_t i = blockIdx.x;
    size_t dst = (size_t)index[i];
    for (int k = threadIdx.x; k < dim; k += blockDim.x) dense[dst * dim + k] = rows[i * dim + k];
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
