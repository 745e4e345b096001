// Row L2 normalization, fused with the gather of sampled rows, and its backward pass.
// CPU references: src/cpu/normalize.rs. One block per row.
#include "common.cuh"

#define NORM_EPS 1e-12f  // torch.nn.functional.normalize's eps

// out = src / max(|src|, eps); returns the norm (on every thread).
__device__ float normalize_row(const float* src, float* dst, int dim) {
    float ss = 0.0f;
    for (int k = threadIdx.x; k < dim; k += blockDim.x) ss += src[k] * src[k];
    float norm = fmaxf(sqrtf(block_sum(ss)), NORM_EPS);
    float inv = 1.0f / norm;
    for (int k = threadIdx.x; k < dim; k += blockDim.x) dst[k] = src[k] * inv;
    return norm;
}

extern "C" __global__ void normalize_rows(const float* x, int rows, int dim, float* out, float* norms) {
    size_t row = blockIdx.x;
    float n = normalize_row(x + row * dim, out + row * dim, dim);
    if (threadIdx.x == 0) norms[row] = n;
}

extern "C" __global__ void gather_normalize_rows(const float* weight, int dim, const int* index,
                                                 int count, float* out, float* norms) {
    size_t i = blockIdx.x;
    size_t src = (size_t)index[i];
    float n = normalize_row(weight + src * dim, out + i * dim, dim);
    if (threadIdx.x == 0) norms[i] = n;
}

// The f32 wire format of the embedding all-gather (src/cpu/wire.rs pack_embeddings_f32): per row
// `dim` values, then the i64 label's bits as two f32 words, low first. Unpacked with the same
// normalize_row as normalize_rows (same bits), the label by thread 0.
extern "C" __global__ void unpack_normalize_f32(const float* packed, int rows, int dim,
                                                long long* labels, float* x_hat, float* norms) {
    size_t row = blockIdx.x;
    const float* in = packed + row * (size_t)(dim + 2);
    float n = normalize_row(in, x_hat + row * dim, dim);
    if (threadIdx.x == 0) {
        norms[row] = n;
        unsigned long long lo = __float_as_uint(in[dim]), hi = __float_as_uint(in[dim + 1]);
        labels[row] = (long long)(lo | (hi << 32));
    }
}

// g <- (g - x_hat (g . x_hat)) / |x|
extern "C" __global__ void normalize_backward(float* grad, const float* x_hat, const float* norms,
                                              int rows, int dim) {
    size_t row = blockIdx.x;
    float* g = grad + row * dim;
    const float* xh = x_hat + row * dim;
    float dot = 0.0f;
    for (int k = threadIdx.x; k < dim; k += blockDim.x) dot += g[k] * xh[k];
    dot = block_sum(dot);
    float inv = 1.0f / norms[row];
    for (int k = threadIdx.x; k < dim; k += blockDim.x) g[k] = (g[k] - xh[k] * dot) * inv;
}

// scores[c] = max_j cosines[c, j] over the real rows j (label >= 0; −1 marks the padding of a
// ragged batch): the hard-negative score of each class of a chunk (src/cpu/hard_negatives.rs,
// after its GEMM).
extern "C" __global__ void row_max_into(const float* cosines, const long long* row_labels, int len,
                                        int cols, float* scores) {
    size_t row = blockIdx.x;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        if (row_labels[j] >= 0) m = fmaxf(m, cosines[row * cols + j]);
    m = block_max(m);
    if (threadIdx.x == 0) scores[row] = m;
}
