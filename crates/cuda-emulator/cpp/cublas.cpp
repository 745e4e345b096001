// The cuBLAS calls partial-fc makes, as a host library named libcublas.so: column-major GEMMs
// with f32 accumulation over f32, f16 or bf16 operands and an f32, f16 or bf16 result (16-bit
// results rounded to nearest even, as cuBLAS stores them). Pointers are host pointers, as the
// emulated driver's "device" memory is host memory.
#include <dlfcn.h>

#include <cstdint>
#include <thread>
#include <vector>

#include "half.h"

typedef int cublasStatus_t;
typedef void* cublasHandle_t;
enum : cublasStatus_t { OK = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum { OP_N = 0, OP_T = 1, OP_C = 2 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_32F = 68, COMPUTE_32F_PEDANTIC = 69, COMPUTE_32F_FAST_16F = 74,
       COMPUTE_32F_FAST_16BF = 75, COMPUTE_32F_FAST_TF32 = 77 };

namespace {

struct Handle {
    void* stream = nullptr;
    int math_mode = 0;
};

float load(const void* p, int type, size_t i) {
    switch (type) {
        case R_32F: return static_cast<const float*>(p)[i];
        case R_16F: return emu_half::f16_to_f32(static_cast<const uint16_t*>(p)[i]);
        default: return emu_half::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    }
}

void store(void* p, int type, size_t i, float v) {
    switch (type) {
        case R_32F: static_cast<float*>(p)[i] = v; break;
        case R_16F: static_cast<uint16_t*>(p)[i] = emu_half::f32_to_f16(v); break;
        default: static_cast<uint16_t*>(p)[i] = emu_half::f32_to_bf16(v);
    }
}

// op(X) of a column-major matrix, packed so that row r of the result (r < rows) is contiguous
// over the shared dimension k: for op(A) (m × k) row i, for op(B)ᵀ (n × k) column j of op(B).
std::vector<float> pack(const void* x, int type, int op, int ld, int rows, int k, bool is_b) {
    std::vector<float> out((size_t)rows * k);
    for (int r = 0; r < rows; r++)
        for (int p = 0; p < k; p++) {
            // A: op(A)[r, p]; B: op(B)[p, r].
            bool transposed = op != OP_N;
            size_t at = is_b ? (transposed ? (size_t)r + (size_t)p * ld : (size_t)p + (size_t)r * ld)
                             : (transposed ? (size_t)p + (size_t)r * ld : (size_t)r + (size_t)p * ld);
            out[(size_t)r * k + p] = load(x, type, at);
        }
    return out;
}

// f32 accumulation, as cuBLAS's f32 compute type: eight partial sums, then a pairwise add.
float dot(const float* a, const float* b, int k) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int p = 0;
    for (; p + 8 <= k; p += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[p + l] * b[p + l];
    float s = 0;
    for (; p < k; p++) s += a[p] * b[p];
    return s + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The emulated driver's memcheck of a device range (driver.cpp).
void check_range(const void* p, size_t bytes, const char* who) {
    using Check = void (*)(const void*, size_t, const char*);
    static Check check = (Check)dlsym(RTLD_DEFAULT, "emu_check_device_range");
    if (check && bytes) check(p, bytes, who);
}

cublasStatus_t gemm(int transa, int transb, int m, int n, int k, float alpha, const void* a, int atype,
                    int lda, const void* b, int btype, int ldb, float beta, void* c, int ctype, int ldc) {
    // cuBLAS's own argument checks: leading dimensions at least the stored rows.
    auto at_least = [](int ld, int rows) { return ld >= (rows > 1 ? rows : 1); };
    if (m < 0 || n < 0 || k < 0 || !at_least(ldc, m)) return INVALID_VALUE;
    if (!at_least(lda, transa == OP_N ? m : k) || !at_least(ldb, transb == OP_N ? k : n))
        return INVALID_VALUE;
    if (m == 0 || n == 0) return OK;
    // Each operand's extent in its allocation: a stored matrix of `rows` × `cols` (column-major)
    // spans (cols - 1) · ld + rows elements.
    auto span = [](int type, int rows, int cols, int ld) {
        size_t elem = type == R_32F ? 4 : 2;
        return rows && cols ? ((size_t)(cols - 1) * ld + rows) * elem : 0;
    };
    check_range(c, span(ctype, m, n, ldc), "cublasGemmEx's C");
    if (k) {
        bool ta = transa != OP_N, tb = transb != OP_N;
        check_range(a, span(atype, ta ? k : m, ta ? m : k, lda), "cublasGemmEx's A");
        check_range(b, span(btype, tb ? n : k, tb ? k : n, ldb), "cublasGemmEx's B");
    }
    std::vector<float> pa = k ? pack(a, atype, transa, lda, m, k, false) : std::vector<float>();
    std::vector<float> pb = k ? pack(b, btype, transb, ldb, n, k, true) : std::vector<float>();
    // Columns of C in parallel: a GEMM of the step is the bulk of an emulated test's time.
    unsigned workers = std::thread::hardware_concurrency();
    workers = workers == 0 ? 1 : (workers > 8 ? 8 : workers);
    if ((size_t)m * n * (k + 1) < (1u << 22)) workers = 1;
    auto columns = [&](int j0, int j1) {
        for (int j = j0; j < j1; j++)
            for (int i = 0; i < m; i++) {
                float v = k ? alpha * dot(&pa[(size_t)i * k], &pb[(size_t)j * k], k) : 0.0f;
                size_t at = (size_t)i + (size_t)j * ldc;
                if (beta != 0.0f) v += beta * load(c, ctype, at);
                store(c, ctype, at, v);
            }
    };
    std::vector<std::thread> pool;
    int per = (n + (int)workers - 1) / (int)workers;
    for (unsigned w = 1; w < workers; w++) {
        int j0 = (int)w * per, j1 = j0 + per < n ? j0 + per : n;
        if (j0 < j1) pool.emplace_back(columns, j0, j1);
    }
    columns(0, per < n ? per : n);
    for (auto& t : pool) t.join();
    return OK;
}

bool type_ok(int t) { return t == R_32F || t == R_16F || t == R_16BF; }

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    *h = new Handle();
    return OK;
}
API cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    delete static_cast<Handle*>(h);
    return OK;
}
API cublasStatus_t cublasSetStream_v2(cublasHandle_t h, void* stream) {
    if (!h) return NOT_INITIALIZED;
    static_cast<Handle*>(h)->stream = stream;
    return OK;
}
API cublasStatus_t cublasGetStream_v2(cublasHandle_t h, void** stream) {
    if (!h) return NOT_INITIALIZED;
    *stream = static_cast<Handle*>(h)->stream;
    return OK;
}
// The library's version: CUDA 13.0's, as the emulated driver's (cuDriverGetVersion: 13000).
API cublasStatus_t cublasGetProperty(int type, int* value) {
    if (!value || type < 0 || type > 2) return INVALID_VALUE;
    *value = type == 0 ? 13 : 0;
    return OK;
}
API cublasStatus_t cublasSetMathMode(cublasHandle_t h, int mode) {
    if (!h) return NOT_INITIALIZED;
    static_cast<Handle*>(h)->math_mode = mode;
    return OK;
}
API cublasStatus_t cublasGetMathMode(cublasHandle_t h, int* mode) {
    if (!h) return NOT_INITIALIZED;
    *mode = static_cast<Handle*>(h)->math_mode;
    return OK;
}
API cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) { return OK; }
API cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t, int mode) {
    return mode == 0 ? OK : NOT_SUPPORTED;  // host pointers for alpha and beta only
}

API cublasStatus_t cublasSgemm_v2(cublasHandle_t h, int transa, int transb, int m, int n, int k,
                                  const float* alpha, const float* a, int lda, const float* b, int ldb,
                                  const float* beta, float* c, int ldc) {
    if (!h) return NOT_INITIALIZED;
    return gemm(transa, transb, m, n, k, *alpha, a, R_32F, lda, b, R_32F, ldb, *beta, c, R_32F, ldc);
}

API cublasStatus_t cublasGemmEx(cublasHandle_t h, int transa, int transb, int m, int n, int k,
                                const void* alpha, const void* a, int atype, int lda, const void* b,
                                int btype, int ldb, const void* beta, void* c, int ctype, int ldc,
                                int compute, int /*algo*/) {
    if (!h) return NOT_INITIALIZED;
    // The COMPUTE_32F combinations: A and B of one type, C f32 or that type.
    if (!type_ok(atype) || atype != btype || (ctype != R_32F && ctype != atype)) return NOT_SUPPORTED;
    if (compute != COMPUTE_32F && compute != COMPUTE_32F_PEDANTIC) return NOT_SUPPORTED;
    return gemm(transa, transb, m, n, k, *static_cast<const float*>(alpha), a, atype, lda, b, btype,
                ldb, *static_cast<const float*>(beta), c, ctype, ldc);
}
