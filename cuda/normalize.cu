// Row L2 normalization, fused with the gather of sampled rows, and its backward pass.
// CPU references: src/cpu/normalize.rs.
//
// One warp per row, ROW_THREADS / 32 rows per block (launch: `per_warp_row`). Why not a block per
// row: a row is d floats (2 KB at d = 512) and a block per row keeps at most 8 rows of an SM's
// 2048 threads in flight, 16 KB a SM, too few bytes to cover DRAM latency; gather_normalize_rows
// and normalize_backward run over S = 104,857 such rows at the whole-step shape and were measured
// at ~1.9 TB/s on an H200 (docs/benchmarks.md). A warp per row puts 48 rows in flight per SM on
// sm_90 (as its 36-40 registers a thread allow, docs/cuda.md), 96 KB, with 16-byte loads
// where rows are aligned, and needs no block barrier: the reductions are warp shuffles. A warp's
// second sweep rereads its row from L1 or L2.
#include "common.cuh"

#define NORM_EPS 1e-12f  // torch.nn.functional.normalize's eps

// The row this warp works on.
__device__ __forceinline__ size_t warp_row() {
    return (size_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
}

__device__ __forceinline__ bool is_lane0() { return threadIdx.x % WARP == 0; }

// Lane `lane` of a warp handles the quads q = lane, lane + 32, ... of a row (elements 4q..4q+3),
// then its last dim % 4 elements one each. A quad is one 16-byte load or store where all the
// row's pointers are 16-byte aligned (VEC), else four: the same values in the same order either
// way, so a row gives the same bits whatever its alignment (the packed rows of
// unpack_normalize_f32 are not aligned and must give what normalize_rows gives). The choice is
// made once per row, outside the loops, so each loop's loads can all be in flight together.
__device__ __forceinline__ bool aligned16(const void* p) { return ((size_t)p & 15) == 0; }

template <bool VEC>
__device__ __forceinline__ float4 load_quad(const float* p, int q) {
    if (VEC) return ((const float4*)p)[q];
    return make_float4(p[4 * q], p[4 * q + 1], p[4 * q + 2], p[4 * q + 3]);
}

template <bool VEC>
__device__ __forceinline__ void store_quad(float* p, int q, float4 v) {
    if (VEC) {
        ((float4*)p)[q] = v;
    } else {
        p[4 * q] = v.x;
        p[4 * q + 1] = v.y;
        p[4 * q + 2] = v.z;
        p[4 * q + 3] = v.w;
    }
}

__device__ __forceinline__ float dot4(float4 a, float4 b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

template <bool VEC>
__device__ float normalize_row_as(const float* src, float* dst, int dim) {
    int lane = threadIdx.x % WARP, quads = dim / 4;
    float ss = 0.0f;
    for (int q = lane; q < quads; q += WARP) {
        float4 v = load_quad<VEC>(src, q);
        ss += dot4(v, v);
    }
    for (int k = 4 * quads + lane; k < dim; k += WARP) ss += src[k] * src[k];
    float norm = fmaxf(sqrtf(warp_sum(ss)), NORM_EPS);
    float inv = inv_norm(norm);
    for (int q = lane; q < quads; q += WARP) {
        float4 v = load_quad<VEC>(src, q);
        store_quad<VEC>(dst, q, make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv));
    }
    for (int k = 4 * quads + lane; k < dim; k += WARP) dst[k] = src[k] * inv;
    return norm;
}

// dst = src / max(|src|, eps) over the warp; returns the norm (on every lane).
__device__ float normalize_row(const float* src, float* dst, int dim) {
    if (aligned16(src) && aligned16(dst)) return normalize_row_as<true>(src, dst, dim);
    return normalize_row_as<false>(src, dst, dim);
}

extern "C" __global__ void normalize_rows(const float* x, int rows, int dim, float* out, float* norms) {
    size_t row = warp_row();
    if (row >= (size_t)rows) return;  // the whole warp: no shuffle is left waiting
    float n = normalize_row(x + row * dim, out + row * dim, dim);
    if (is_lane0()) norms[row] = n;
}

extern "C" __global__ void gather_normalize_rows(const float* weight, int dim, const int* index,
                                                 int count, float* out, float* norms) {
    size_t i = warp_row();
    if (i >= (size_t)count) return;
    size_t src = (size_t)index[i];
    float n = normalize_row(weight + src * dim, out + i * dim, dim);
    if (is_lane0()) norms[i] = n;
}

// The f32 wire format of the embedding all-gather (src/cpu/wire.rs pack_embeddings_f32): per row
// `dim` values, then the i64 label's bits as two f32 words, low first. Unpacked with the same
// normalize_row as normalize_rows (same bits), the label by thread 0.
extern "C" __global__ void unpack_normalize_f32(const float* packed, int rows, int dim,
                                                long long* labels, float* x_hat, float* norms) {
    size_t row = warp_row();
    if (row >= (size_t)rows) return;
    const float* in = packed + row * (size_t)(dim + 2);
    float n = normalize_row(in, x_hat + row * dim, dim);
    if (is_lane0()) {
        norms[row] = n;
        unsigned long long lo = __float_as_uint(in[dim]), hi = __float_as_uint(in[dim + 1]);
        labels[row] = (long long)(lo | (hi << 32));
    }
}

// g <- (g - x_hat (g . x_hat)) * inv_norm, over the warp.
template <bool VEC>
__device__ void normalize_backward_row(float* g, const float* xh, int dim, float inv) {
    int lane = threadIdx.x % WARP, quads = dim / 4;
    float dot = 0.0f;
    for (int q = lane; q < quads; q += WARP) dot += dot4(load_quad<VEC>(g, q), load_quad<VEC>(xh, q));
    for (int k = 4 * quads + lane; k < dim; k += WARP) dot += g[k] * xh[k];
    dot = warp_sum(dot);
    for (int q = lane; q < quads; q += WARP) {
        float4 a = load_quad<VEC>(g, q), b = load_quad<VEC>(xh, q);
        store_quad<VEC>(g, q,
                        make_float4((a.x - b.x * dot) * inv, (a.y - b.y * dot) * inv,
                                    (a.z - b.z * dot) * inv, (a.w - b.w * dot) * inv));
    }
    for (int k = 4 * quads + lane; k < dim; k += WARP) g[k] = (g[k] - xh[k] * dot) * inv;
}

// g <- (g - x_hat (g . x_hat)) / |x|
extern "C" __global__ void normalize_backward(float* grad, const float* x_hat, const float* norms,
                                              int rows, int dim) {
    size_t row = warp_row();
    if (row >= (size_t)rows) return;
    float* g = grad + row * dim;
    const float* xh = x_hat + row * dim;
    float inv = 1.0f / norms[row];
    if (aligned16(g) && aligned16(xh)) normalize_backward_row<true>(g, xh, dim, inv);
    else normalize_backward_row<false>(g, xh, dim, inv);
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

// ---- Prediction: the k classes nearest to each embedding (src/cpu/top_k.rs) ----

#define TOP_K_MAX 256  // src/cpu/top_k.rs; at most the launch's 256 threads (k <= blockDim.x)
#define NO_ID 0x7fffffff
// A NaN cosine (a class center that is not finite) scores above every cosine, so that the
// caller sees it first and refuses the prediction (NOT_FINITE_SCORE in src/cpu/top_k.rs).
#define NOT_FINITE_SCORE 2.0f

__device__ __forceinline__ float merge_score(float c) { return c != c ? NOT_FINITE_SCORE : c; }

// (a, ia) comes before (b, ib): the higher cosine, then the smaller class id.
__device__ __forceinline__ bool beats(float a, int ia, float b, int ib) {
    return a > b || (a == b && ia < ib);
}

// The block's best (v, id) under `beats`, in every thread; `s` and `i` hold one pair per warp.
__device__ void block_best(float& v, int& id, float* s, int* i) {
    for (int o = WARP / 2; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, id, o);
        if (beats(ov, oi, v, id)) v = ov, id = oi;
    }
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) s[warp] = v, i[warp] = id;
    __syncthreads();
    v = lane < (int)(blockDim.x / WARP) ? s[lane] : -INFINITY;
    id = lane < (int)(blockDim.x / WARP) ? i[lane] : NO_ID;
    for (int o = WARP / 2; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, id, o);
        if (beats(ov, oi, v, id)) v = ov, id = oi;
    }
    __syncthreads();  // s and i are free for the next call
}

// One block per row (k <= blockDim.x): merges a chunk of cosines (row-major, `len` columns;
// column j is class chunk_start + j) into the row's running top k (best first; an empty slot
// is (-inf, -1)). In a trained classifier most chunks hold nothing that beats a row's k-th
// best: one read and a vote. Otherwise k rounds, each taking the block's best candidate, of the
// chunk and the old top k, that the previous round's winner beats (ids are unique, so that is
// "not taken yet").
extern "C" __global__ void top_k_merge(const float* cosines, int len, int chunk_start, int k,
                                       float* top_scores, int* top_ids) {
    __shared__ float new_s[TOP_K_MAX];
    __shared__ int new_i[TOP_K_MAX];
    __shared__ float red_s[32];
    __shared__ int red_i[32];
    const float* c = cosines + (size_t)blockIdx.x * len;
    float* ts = top_scores + (size_t)blockIdx.x * k;
    int* ti = top_ids + (size_t)blockIdx.x * k;
    float last = ts[k - 1];
    int last_id = ti[k - 1];
    int any = 0;
    for (int j = threadIdx.x; j < len; j += blockDim.x)
        any |= beats(merge_score(c[j]), chunk_start + j, last, last_id);
    if (!__syncthreads_or(any)) return;
    float prev = INFINITY;
    int prev_id = -1;
    for (int r = 0; r < k; ++r) {
        float v = -INFINITY;
        int id = NO_ID;
        for (int j = threadIdx.x; j < len; j += blockDim.x) {
            float x = merge_score(c[j]);
            int xi = chunk_start + j;
            // -inf never enters (an empty slot, (-inf, -1), beats it), as in the CPU merge; and
            // letting it in would break "the previous winner beats every later one", since the
            // empty slots are not unique.
            if (x != -INFINITY && beats(prev, prev_id, x, xi) && beats(x, xi, v, id)) v = x, id = xi;
        }
        if ((int)threadIdx.x < k) {
            float x = ts[threadIdx.x];
            int xi = ti[threadIdx.x];
            if (beats(prev, prev_id, x, xi) && beats(x, xi, v, id)) v = x, id = xi;
        }
        block_best(v, id, red_s, red_i);
        if (threadIdx.x == 0) new_s[r] = v, new_i[r] = id == NO_ID ? -1 : id;
        prev = v, prev_id = id;
    }
    __syncthreads();
    if ((int)threadIdx.x < k) ts[threadIdx.x] = new_s[threadIdx.x], ti[threadIdx.x] = new_i[threadIdx.x];
}
