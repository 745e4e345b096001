// The CUDA driver API calls cudarc makes, as a host library named libcuda.so: "device" memory is
// host memory, kernels and copies run inside the call (streams are synchronous, except for the
// emulated NCCL's collectives, which stay pending on their stream until every rank has called), modules are ignored (NVRTC's CUBIN cannot run here)
// and functions are found by name among the kernels compiled for the host (fiber.cpp). Only what
// partial-fc's CUDA backend and its tests use is implemented; any other call is absent, and
// cudarc then names the missing symbol.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <sched.h>
#include <sys/mman.h>

#include "scheduler.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUmodule;
struct Stream;
typedef Stream* CUstream;
typedef void* CUmemoryPool;
typedef const emu::KernelEntry* CUfunction;
struct Event {
    std::chrono::steady_clock::time_point at;
};
typedef Event* CUevent;

enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NOT_READY = 600,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

namespace {

// The emulated device: an sm_90 part with 16 GiB, so NVRTC compiles for a current target.
constexpr size_t TOTAL_BYTES = 16ull << 30;
const char* const NAME = "partial-fc CPU emulator (not a GPU)";

int primary_context_tag;
int module_tag;
int pool_tag;

// One allocation: the caller's `bytes` end at the end of a run of pages (rounded up to 256
// bytes, the alignment cuMemAlloc promises), with an inaccessible page before and after. A kernel
// that runs past either end faults (fiber.cpp reports which kernel, thread and allocation); the
// bytes between `bytes` and the next page, and before the allocation in its first page, hold a
// canary byte of their own, and a write there is reported when the allocation is freed.
struct Allocation {
    size_t bytes = 0, rounded = 0;
    char* map = nullptr;  // the whole mapping, guard pages included
    size_t map_len = 0;
};

struct Memory {
    std::mutex lock;
    std::map<CUdeviceptr, Allocation> live;
    size_t used = 0, high = 0, reserved_high = 0;
};
Memory& memory() {
    static Memory m;
    return m;
}

constexpr size_t PAGE = 4096;
constexpr unsigned char SLACK = 0xa5;  // the canary around an allocation, in its own pages

// The first byte in [from, to) that is not `fill`, or `to`.
const unsigned char* first_changed(const unsigned char* from, const unsigned char* to, unsigned char fill) {
    for (; from < to; from++)
        if (*from != fill) return from;
    return to;
}

// One past the last byte in [from, to) that is not `fill`, or `from`.
const unsigned char* end_of_changed(const unsigned char* from, const unsigned char* to, unsigned char fill) {
    for (; to > from; to--)
        if (to[-1] != fill) return to;
    return from;
}

CUresult alloc(CUdeviceptr* out, size_t bytes) {
    if (!out) return INVALID_VALUE;
    size_t rounded = (std::max(bytes, (size_t)1) + 255) / 256 * 256;
    size_t body = (rounded + PAGE - 1) / PAGE * PAGE;
    if (body > TOTAL_BYTES) return OUT_OF_MEMORY;
    size_t map_len = body + 2 * PAGE;
    void* m = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return OUT_OF_MEMORY;
    char* map = static_cast<char*>(m);
    if (mprotect(map + PAGE, body, PROT_READ | PROT_WRITE) != 0) {
        munmap(map, map_len);
        return OUT_OF_MEMORY;
    }
    char* p = map + PAGE + body - rounded;
    // Fresh device memory is garbage on a GPU. Alternately all-ones bytes (NaN floats, -1
    // integers) and 0x5a bytes (1.5e16 floats, integers near 1.5e9): a kernel that reads what
    // nobody wrote fails its comparison instead of passing on zeros, and a never-written label
    // is not always the -1 ("no row") that the kernels skip. Counted per OS thread, so a test
    // gets the same patterns at every run. The slack around the allocation gets the same bytes.
    thread_local unsigned allocations = 0;
    unsigned char fill = (allocations++ & 1) ? 0x5a : 0xff;
    // The slack gets a canary of its own, so that a stray write of the fill byte (-1, a NaN)
    // shows too.
    std::memset(map + PAGE, SLACK, body);
    std::memset(p, fill, bytes);
    Memory& mem = memory();
    std::lock_guard<std::mutex> g(mem.lock);
    *out = (CUdeviceptr)p;
    mem.live[*out] = Allocation{bytes, rounded, map, map_len};
    mem.used += rounded;
    if (mem.used > mem.high) mem.high = mem.used;
    if (mem.used > mem.reserved_high) mem.reserved_high = mem.used;
    return SUCCESS;
}

// A write into an allocation's slack (after its bytes, or before it in its first page): report
// it, as compute-sanitizer would report the kernel's write, and stop the process.
void check_slack(CUdeviceptr p, const Allocation& a) {
    const unsigned char* start = (const unsigned char*)a.map + PAGE;
    const unsigned char* begin = (const unsigned char*)p;
    const unsigned char* end = begin + a.bytes;
    const unsigned char* body_end = (const unsigned char*)a.map + a.map_len - PAGE;
    const unsigned char* before = first_changed(start, begin, SLACK);
    const unsigned char* after = end_of_changed(end, body_end, SLACK);
    if (before == begin && after == end) return;
    if (after != end)
        std::fprintf(stderr,
                     "partial-fc CUDA emulator: memcheck: something wrote %zu bytes past the end of "
                     "the allocation at 0x%llx of %zu bytes (found when it was freed)\n",
                     (size_t)(after - end), (unsigned long long)p, a.bytes);
    else
        std::fprintf(stderr,
                     "partial-fc CUDA emulator: memcheck: something wrote %zu bytes before the start "
                     "of the allocation at 0x%llx of %zu bytes (found when it was freed)\n",
                     (size_t)(begin - before), (unsigned long long)p, a.bytes);
    std::abort();
}

CUresult release(CUdeviceptr p) {
    if (!p) return SUCCESS;
    Memory& m = memory();
    Allocation a;
    {
        std::lock_guard<std::mutex> g(m.lock);
        auto it = m.live.find(p);
        if (it == m.live.end()) return INVALID_VALUE;
        a = it->second;
        m.used -= a.rounded;
        m.live.erase(it);
    }
    check_slack(p, a);
    munmap(a.map, a.map_len);
    return SUCCESS;
}

// Whether [p, p + bytes) lies inside one live allocation: the driver's copies and memsets
// return CUDA_ERROR_INVALID_VALUE otherwise, as a GPU's driver does.
bool in_allocation(CUdeviceptr p, size_t bytes) {
    Memory& m = memory();
    std::lock_guard<std::mutex> g(m.lock);
    auto it = m.live.upper_bound(p);
    if (it == m.live.begin()) return false;
    --it;
    return p - it->first <= it->second.bytes && bytes <= it->second.bytes - (p - it->first);
}

// The live allocation whose mapping (guard pages and slack included) holds address `a`, or
// nullptr; the caller holds the table's lock. A scan: only the fault handler and the library
// range checks ask.
const std::pair<const CUdeviceptr, Allocation>* mapping_of(Memory& m, uintptr_t a) {
    for (auto& entry : m.live) {
        const Allocation& al = entry.second;
        if (a >= (uintptr_t)al.map && a < (uintptr_t)al.map + al.map_len) return &entry;
    }
    return nullptr;
}

}  // namespace

namespace emu {
// For the fault handler (fiber.cpp): where `a` lies relative to the live allocation whose
// mapping (guard pages included) holds it. False if none does, or the allocation table is
// busy on another thread.
bool describe_address(uintptr_t a, char* buf, size_t len) {
    Memory& m = memory();
    std::unique_lock<std::mutex> g(m.lock, std::try_to_lock);
    for (int tries = 0; !g.owns_lock() && tries < 1000; tries++) {
        sched_yield();  // another rank's thread may be allocating
        g.try_lock();
    }
    if (!g.owns_lock()) {
        std::snprintf(buf, len, "(the allocation table was busy: not looked up)");
        return false;
    }
    auto found = mapping_of(m, a);
    if (!found) return false;
    CUdeviceptr p = found->first;
    const Allocation& al = found->second;
    if (a >= p + al.bytes)
        std::snprintf(buf, len, "%zu bytes past the end of the allocation at 0x%llx of %zu bytes",
                      (size_t)(a - p - al.bytes) + 1, (unsigned long long)p, al.bytes);
    else if (a < p)
        std::snprintf(buf, len, "%zu bytes before the allocation at 0x%llx of %zu bytes",
                      (size_t)(p - a), (unsigned long long)p, al.bytes);
    else
        std::snprintf(buf, len, "inside the allocation at 0x%llx of %zu bytes",
                      (unsigned long long)p, al.bytes);
    return true;
}
}  // namespace emu

#define API extern "C" __attribute__((visibility("default")))

// A stream: the number of operations still pending on it (the emulated NCCL's collectives that
// wait for other ranks). Every later operation on the stream waits for them, as on a GPU; the
// synchronous calls wait for the null stream only (the crate's streams are its own), and
// cuCtxSynchronize for all.
struct Stream {
    std::mutex lock;
    std::condition_variable changed;
    int pending = 0;
};

namespace {
Stream legacy_stream;  // the null stream
std::mutex streams_lock;
std::map<Stream*, bool>& streams() {
    static std::map<Stream*, bool> s;
    return s;
}

Stream& stream_of(CUstream s) { return s ? *s : legacy_stream; }

void wait_stream(CUstream s) {
    Stream& st = stream_of(s);
    std::unique_lock<std::mutex> g(st.lock);
    st.changed.wait(g, [&] { return st.pending == 0; });
}

void wait_all_streams() {
    std::vector<Stream*> all{&legacy_stream};
    {
        std::lock_guard<std::mutex> g(streams_lock);
        for (auto& [s, _] : streams()) all.push_back(s);
    }
    for (Stream* s : all) wait_stream(s);
}
}  // namespace

// For the emulated cuBLAS and NCCL (found with dlsym): stops the process, as compute-sanitizer's
// memcheck would, when [p, p + bytes) runs past either end of the live allocation `p` points
// into (its guard pages and slack included). Pointers into no allocation pass: the emulator's
// own tests hand the libraries host buffers.
API void emu_check_device_range(const void* p, size_t bytes, const char* who) {
    uintptr_t a = (uintptr_t)p;
    Memory& m = memory();
    std::lock_guard<std::mutex> g(m.lock);
    auto found = mapping_of(m, a);
    if (!found) return;
    CUdeviceptr base = found->first;
    const Allocation& al = found->second;
    if (a >= base && a - base <= al.bytes && bytes <= al.bytes - (a - base)) return;
    std::fprintf(stderr,
                 "partial-fc CUDA emulator: memcheck: %s reads or writes %zu bytes at 0x%llx, "
                 "outside the allocation at 0x%llx of %zu bytes\n",
                 who, bytes, (unsigned long long)a, (unsigned long long)base, al.bytes);
    std::abort();
}

// For the emulated NCCL (found with dlsym): an operation begins or ends pending on a stream.
API void emu_stream_begin_pending(CUstream s) {
    Stream& st = stream_of(s);
    std::lock_guard<std::mutex> g(st.lock);
    st.pending++;
}
API void emu_stream_end_pending(CUstream s) {
    Stream& st = stream_of(s);
    std::lock_guard<std::mutex> g(st.lock);
    st.pending--;
    st.changed.notify_all();
}

API CUresult cuInit(unsigned) { return SUCCESS; }
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return SUCCESS;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return SUCCESS;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    if (len <= 0) return INVALID_VALUE;
    std::snprintf(name, (size_t)len, "%s", NAME);
    return SUCCESS;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = TOTAL_BYTES;
    return SUCCESS;
}
API CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *v = 1024; break;            // max threads per block
        case 2: *v = 1024; break;            // max block dim x
        case 5: *v = 2147483647; break;      // max grid dim x
        case 8: *v = 48 * 1024; break;       // shared memory per block
        case 10: *v = 32; break;             // warp size
        case 16: *v = 1; break;              // multiprocessors: blocks run one at a time
        case 75: *v = 9; break;              // compute capability major
        case 76: *v = 0; break;              // compute capability minor
        case 115: *v = 1; break;             // memory pools supported
        default: *v = 0;
    }
    return SUCCESS;
}
API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice) {
    *ctx = &primary_context_tag;
    return SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }

thread_local CUcontext current_context = nullptr;
API CUresult cuCtxSetCurrent(CUcontext ctx) {
    current_context = ctx;
    return SUCCESS;
}
API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    *ctx = current_context;
    return SUCCESS;
}
API CUresult cuCtxPushCurrent_v2(CUcontext ctx) { return cuCtxSetCurrent(ctx); }
API CUresult cuCtxPopCurrent_v2(CUcontext* ctx) {
    if (ctx) *ctx = current_context;
    return SUCCESS;
}
API CUresult cuCtxSynchronize() {
    wait_all_streams();
    return SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return SUCCESS;
}

API CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new Stream();
    std::lock_guard<std::mutex> g(streams_lock);
    streams()[*s] = true;
    return SUCCESS;
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) {
    return cuStreamCreate(s, flags);
}
API CUresult cuStreamDestroy_v2(CUstream s) {
    if (!s) return INVALID_HANDLE;
    wait_stream(s);
    {
        std::lock_guard<std::mutex> g(streams_lock);
        streams().erase(s);
    }
    delete s;
    return SUCCESS;
}
API CUresult cuStreamSynchronize(CUstream s) {
    wait_stream(s);
    return SUCCESS;
}
API CUresult cuStreamQuery(CUstream s) {
    Stream& st = stream_of(s);
    std::lock_guard<std::mutex> g(st.lock);
    return st.pending ? NOT_READY : SUCCESS;
}
API CUresult cuStreamWaitEvent(CUstream s, CUevent, unsigned) {
    wait_stream(s);
    return SUCCESS;
}
API CUresult cuStreamIsCapturing(CUstream, int* status) {
    *status = 0;
    return SUCCESS;
}
API CUresult cuLaunchHostFunc(CUstream s, void (*fn)(void*), void* data) {
    wait_stream(s);
    fn(data);
    return SUCCESS;
}

API CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new Event{std::chrono::steady_clock::now()};
    return SUCCESS;
}
API CUresult cuEventRecord(CUevent e, CUstream s) {
    if (!e) return INVALID_HANDLE;
    wait_stream(s);
    e->at = std::chrono::steady_clock::now();
    return SUCCESS;
}
API CUresult cuEventSynchronize(CUevent) { return SUCCESS; }
API CUresult cuEventQuery(CUevent) { return SUCCESS; }
API CUresult cuEventDestroy_v2(CUevent e) {
    delete e;
    return SUCCESS;
}
// No cuEventElapsedTime: nothing in the crate times events, and cudarc's `elapsed_ms` calls
// cuEventElapsedTime_v2, which drivers before CUDA 12.8 lack (scripts/check-cuda12-symbols.sh).

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes); }
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    wait_stream(s);
    return alloc(p, bytes);
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    wait_stream(nullptr);
    return release(p);
}
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    wait_stream(s);  // a pending collective may still write into it
    return release(p);
}
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    Memory& m = memory();
    std::lock_guard<std::mutex> g(m.lock);
    *total = TOTAL_BYTES;
    *free_bytes = TOTAL_BYTES - std::min(m.used, TOTAL_BYTES);
    return SUCCESS;
}
API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice) {
    *pool = &pool_tag;
    return SUCCESS;
}
API CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice d) { return cuDeviceGetDefaultMemPool(pool, d); }
// Pool attributes: release threshold (4) is accepted and ignored; used (7) and reserved (5)
// memory now, and their high-water marks (8, 6), which a write of 0 resets.
API CUresult cuMemPoolGetAttribute(CUmemoryPool, int attribute, void* value) {
    Memory& m = memory();
    std::lock_guard<std::mutex> g(m.lock);
    unsigned long long* v = static_cast<unsigned long long*>(value);
    switch (attribute) {
        case 4: *v = ~0ull; break;
        case 5: case 7: *v = m.used; break;
        case 6: *v = m.reserved_high; break;
        case 8: *v = m.high; break;
        default: return NOT_SUPPORTED;
    }
    return SUCCESS;
}
API CUresult cuMemPoolSetAttribute(CUmemoryPool, int attribute, void*) {
    Memory& m = memory();
    std::lock_guard<std::mutex> g(m.lock);
    switch (attribute) {
        case 4: break;
        case 6: m.reserved_high = m.used; break;
        case 8: m.high = m.used; break;
        default: return NOT_SUPPORTED;
    }
    return SUCCESS;
}

// Copies and memsets check their device ranges first, as the driver does; `n == 0` is a no-op.
namespace {
enum Side { HOST, DEVICE };
CUresult copy(CUstream s, void* dst, Side dst_side, const void* src, Side src_side, size_t n) {
    wait_stream(s);
    if (n == 0) return SUCCESS;
    if (!dst || !src) return INVALID_VALUE;
    if (dst_side == DEVICE && !in_allocation((CUdeviceptr)dst, n)) return INVALID_VALUE;
    if (src_side == DEVICE && !in_allocation((CUdeviceptr)src, n)) return INVALID_VALUE;
    std::memmove(dst, src, n);
    return SUCCESS;
}
template <class T> CUresult fill(CUstream s, CUdeviceptr dst, T v, size_t n) {
    wait_stream(s);
    if (n && !in_allocation(dst, n * sizeof(T))) return INVALID_VALUE;
    T* p = (T*)dst;
    for (size_t i = 0; i < n; i++) p[i] = v;
    return SUCCESS;
}
}  // namespace

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return copy(nullptr, (void*)dst, DEVICE, src, HOST, n);
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    return copy(s, (void*)dst, DEVICE, src, HOST, n);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return copy(nullptr, dst, HOST, (const void*)src, DEVICE, n);
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy(s, dst, HOST, (const void*)src, DEVICE, n);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy(nullptr, (void*)dst, DEVICE, (const void*)src, DEVICE, n);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy(s, (void*)dst, DEVICE, (const void*)src, DEVICE, n);
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return fill(nullptr, dst, v, n); }
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    return fill(s, dst, v, n);
}
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) { return fill(nullptr, dst, v, n); }
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, CUstream s) {
    return fill(s, dst, v, n);
}

API CUresult cuModuleLoadData(CUmodule* m, const void*) {
    *m = &module_tag;
    return SUCCESS;
}
API CUresult cuModuleUnload(CUmodule) { return SUCCESS; }
API CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    const emu::KernelEntry* k = emu::find_kernel(name);
    if (!k) return NOT_FOUND;
    *f = k;
    return SUCCESS;
}
API CUresult cuFuncGetAttribute(int* v, int attribute, CUfunction) {
    *v = attribute == 0 ? 1024 : 0;  // CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK
    return SUCCESS;
}
API CUresult cuFuncSetAttribute(CUfunction, int, int) { return SUCCESS; }
API CUresult cuFuncSetCacheConfig(CUfunction, int) { return SUCCESS; }

API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned shared_bytes, CUstream s, void** params,
                            void** extra) {
    if (!f) return INVALID_HANDLE;
    wait_stream(s);
    if (!params || extra || shared_bytes) return NOT_SUPPORTED;
    std::string error = emu::launch(*f, dim3{gx, gy, gz}, dim3{bx, by, bz}, params);
    if (error.empty()) return SUCCESS;
    std::fprintf(stderr, "partial-fc CUDA emulator: kernel %s failed: %s\n", f->name, error.c_str());
    return LAUNCH_FAILED;
}

API CUresult cuGetErrorString(CUresult r, const char** s) {
    switch (r) {
        case SUCCESS: *s = "no error"; break;
        case INVALID_VALUE: *s = "invalid argument"; break;
        case OUT_OF_MEMORY: *s = "out of memory"; break;
        case INVALID_DEVICE: *s = "invalid device ordinal"; break;
        case INVALID_HANDLE: *s = "invalid resource handle"; break;
        case NOT_FOUND: *s = "named symbol not found"; break;
        case NOT_READY: *s = "device not ready"; break;
        case LAUNCH_FAILED: *s = "unspecified launch failure (see the emulator's message on stderr)"; break;
        case NOT_SUPPORTED: *s = "operation not supported by the emulator"; break;
        default: *s = "unknown error";
    }
    return SUCCESS;
}
API CUresult cuGetErrorName(CUresult r, const char** s) {
    switch (r) {
        case SUCCESS: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
        case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return SUCCESS;
}
