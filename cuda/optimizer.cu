// Scatter of sampled-row gradients and SGD with momentum. CPU references: src/cpu/optimizer.rs.
#include "common.cuh"

// dense[index[i]] = rows[i]; dense was zeroed by the host (memset) before. One block per row.
extern "C" __global__ void scatter_rows(const float* rows, const int* index, int count, int dim,
                                        float* dense) {
    size_t i = blockIdx.x;
    size_t dst = (size_t)index[i];
    for (int k = threadIdx.x; k < dim; k += blockDim.x) dense[dst * dim + k] = rows[i * dim + k];
}

__device__ __forceinline__ void sgd_elem(float* w, float* v, float g, float lr, float mu, float wd) {
    float vn = mu * *v + (g + wd * *w);
    *v = vn;
    *w -= lr * vn;
}

// v <- mu v + (g + wd w); w <- w - lr v on the sampled rows only. One block per sampled row.
extern "C" __global__ void sgd_momentum_sparse(float* weight, float* momentum, const float* grad,
                                               const int* index, int count, int dim, float lr,
                                               float mu, float wd) {
    size_t i = blockIdx.x;
    size_t row = (size_t)index[i];
    for (int k = threadIdx.x; k < dim; k += blockDim.x)
        sgd_elem(weight + row * dim + k, momentum + row * dim + k, grad[i * dim + k], lr, mu, wd);
}

// The same update on every element of the shard (grid-stride).
extern "C" __global__ void sgd_momentum_dense(float* weight, float* momentum, const float* grad,
                                              u64 len, float lr, float mu, float wd) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        sgd_elem(weight + i, momentum + i, grad[i], lr, mu, wd);
}
