// The NCCL calls partial-fc makes, as a host library named libnccl.so: ranks are threads of one
// process (each with its own communicator handle), buffers are host memory (the emulated
// driver's). As in NCCL, a collective only enqueues: it stays pending on the caller's stream
// (the emulated driver's stream then reports "not ready" and later work on it waits) until the
// last rank calls, which moves the data for all; ncclCommAbort releases a rank's pending calls.
// So the crate's timeout (poll the stream, abort the communicator) can be tested: a missing peer
// leaves the stream pending.
// Connections are made lazily, as NCCL does (2.22+): a communicator's first collective waits
// until every rank has made its first one. A blocking communicator waits inside that call (so a
// peer that dies before its first collective hangs the caller, as in NCCL); a non-blocking one
// (ncclCommInitRankConfig with blocking = 0) returns ncclInProgress from its init, its first
// collective and ncclCommFinalize, and the caller polls ncclCommGetAsyncError until ncclSuccess.
// Any other call on a communicator whose last call is still in progress is refused (NCCL forbids
// it), so the crate's polling protocol is checked.
// Sums run in rank order from rank 0 in f32 and are rounded once, like the crate's ThreadGroup,
// so k emulated NCCL ranks give the CPU collectives' bits. What it checks: the crate's NCCL
// wrapper (ids, counts per rank, offsets, dtypes, reduce ops, async-error polling, abort); not
// NCCL itself, its transports or its ring order.
#include <dlfcn.h>

#include <cstdio>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "half.h"

typedef int ncclResult_t;
enum : ncclResult_t { SUCCESS = 0, UNHANDLED_CUDA = 1, SYSTEM = 2, INTERNAL = 3, INVALID_ARGUMENT = 4,
                      INVALID_USAGE = 5, IN_PROGRESS = 7 };
enum { INT8 = 0, UINT8 = 1, INT32 = 2, UINT32 = 3, INT64 = 4, UINT64 = 5, FLOAT16 = 6, FLOAT32 = 7,
       FLOAT64 = 8, BFLOAT16 = 9 };
enum { SUM = 0, PROD = 1, MAX = 2, MIN = 3, AVG = 4 };
enum Kind { ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER };

struct ncclUniqueId {
    char internal[128];
};

// The head of every ncclConfig_t since NCCL 2.14 (later versions append fields).
struct ConfigHead {
    size_t size;
    unsigned magic, version;
    int blocking;
};

namespace {

// How long ncclCommInitRank waits for the other ranks to join before it fails (NCCL's bootstrap
// has a timeout of its own).
constexpr auto PEER_WAIT = std::chrono::seconds(120);

struct Call {
    Kind kind;
    const void* send;
    void* recv;
    size_t count;
    int dtype, op;
};

struct Pending {
    std::vector<Call> calls;
    std::vector<void*> streams;
    std::vector<bool> arrived;
    int count = 0;
};

struct Clique {
    int nranks;
    int joined = 0;
    int connected = 0;  // ranks that have made their first collective
    std::mutex lock;
    std::condition_variable changed;
    std::map<uint64_t, Pending> pending;  // by sequence number
    bool aborted = false;
    ncclResult_t async_error = SUCCESS;
};

// What a non-blocking communicator's last call is still doing.
enum Stage { READY, JOINING, CONNECTING, FINALIZING };

struct Comm {
    std::shared_ptr<Clique> clique;
    int rank;
    uint64_t seq = 0;
    bool blocking = true;
    bool connected = false;
    Stage stage = READY;
    std::chrono::steady_clock::time_point since{};
    Call deferred{};  // the first collective, waiting for the connections
    void* deferred_stream = nullptr;
};

using Clock = std::chrono::steady_clock;

// The emulated driver's pending-operation count of a stream (driver.cpp).
using StreamFn = void (*)(void*);
void stream_pending(void* stream, bool begin) {
    static StreamFn begin_fn = (StreamFn)dlsym(RTLD_DEFAULT, "emu_stream_begin_pending");
    static StreamFn end_fn = (StreamFn)dlsym(RTLD_DEFAULT, "emu_stream_end_pending");
    StreamFn f = begin ? begin_fn : end_fn;
    if (f) f(stream);
}

std::mutex registry_lock;
std::map<std::string, std::weak_ptr<Clique>>& registry() {
    static std::map<std::string, std::weak_ptr<Clique>> r;
    return r;
}

size_t dtype_bytes(int t) {
    switch (t) {
        case INT8: case UINT8: return 1;
        case FLOAT16: case BFLOAT16: return 2;
        case INT32: case UINT32: case FLOAT32: return 4;
        case INT64: case UINT64: case FLOAT64: return 8;
        default: return 0;
    }
}

float load(const void* p, int t, size_t i) {
    if (t == FLOAT32) return static_cast<const float*>(p)[i];
    uint16_t b = static_cast<const uint16_t*>(p)[i];
    return t == FLOAT16 ? emu_half::f16_to_f32(b) : emu_half::bf16_to_f32(b);
}

void store(void* p, int t, size_t i, float v) {
    if (t == FLOAT32) {
        static_cast<float*>(p)[i] = v;
        return;
    }
    static_cast<uint16_t*>(p)[i] = t == FLOAT16 ? emu_half::f32_to_f16(v) : emu_half::f32_to_bf16(v);
}

// Element j of the reduction over ranks of `calls[r].send` at offset `at`.
float reduce(const std::vector<Call>& calls, size_t at, int t, int op) {
    float acc = load(calls[0].send, t, at);
    for (size_t r = 1; r < calls.size(); r++) {
        float v = load(calls[r].send, t, at);
        if (op == MAX) acc = v > acc || acc != acc ? v : acc;
        else if (op == MIN) acc = v < acc || acc != acc ? v : acc;
        else if (op == PROD) acc *= v;
        else acc += v;
    }
    if (op == AVG) acc /= (float)calls.size();
    return acc;
}

// Runs a collective whose calls have all arrived. Results go to a scratch copy first, as a
// rank's recv may alias another rank's send (in-place collectives).
ncclResult_t execute(std::vector<Call>& calls) {
    const Call& c0 = calls[0];
    int k = (int)calls.size();
    for (auto& c : calls)
        if (c.kind != c0.kind || c.count != c0.count || c.dtype != c0.dtype || c.op != c0.op)
            return INVALID_USAGE;
    size_t bytes = dtype_bytes(c0.dtype);
    if (bytes == 0) return INVALID_ARGUMENT;
    bool reducing = c0.kind != ALL_GATHER;
    if (reducing && c0.dtype != FLOAT32 && c0.dtype != FLOAT16 && c0.dtype != BFLOAT16)
        return INVALID_ARGUMENT;  // what the crate sends; other types are not emulated
    using Check = void (*)(const void*, size_t, const char*);
    static Check check = (Check)dlsym(RTLD_DEFAULT, "emu_check_device_range");
    size_t block = bytes * c0.count;
    for (auto& c : calls) {
        if (!check || !block) break;
        const char* name = c0.kind == ALL_GATHER ? "ncclAllGather" : c0.kind == ALL_REDUCE ? "ncclAllReduce" : "ncclReduceScatter";
        check(c.send, c0.kind == REDUCE_SCATTER ? block * k : block, name);
        check(c.recv, c0.kind == ALL_GATHER ? block * k : block, name);
    }
    std::vector<std::vector<char>> out(k);
    for (int r = 0; r < k; r++) {
        switch (c0.kind) {
            case ALL_GATHER:
                out[r].resize(bytes * c0.count * k);
                for (int s = 0; s < k; s++)
                    std::memcpy(out[r].data() + bytes * c0.count * s, calls[s].send, bytes * c0.count);
                break;
            case ALL_REDUCE:
                out[r].resize(bytes * c0.count);
                for (size_t j = 0; j < c0.count; j++)
                    store(out[r].data(), c0.dtype, j, reduce(calls, j, c0.dtype, c0.op));
                break;
            case REDUCE_SCATTER:
                out[r].resize(bytes * c0.count);
                for (size_t j = 0; j < c0.count; j++)
                    store(out[r].data(), c0.dtype, j,
                          reduce(calls, (size_t)r * c0.count + j, c0.dtype, c0.op));
                break;
        }
    }
    for (int r = 0; r < k; r++) std::memcpy(calls[r].recv, out[r].data(), out[r].size());
    return SUCCESS;
}

// Adds `call` to the collective of its sequence number; the last rank to arrive runs it. The
// clique's lock is held.
ncclResult_t submit(Comm* comm, Call call, void* stream) {
    Clique& q = *comm->clique;
    if (q.aborted) return INVALID_USAGE;
    uint64_t seq = comm->seq++;
    Pending& p = q.pending[seq];
    if (p.calls.empty()) {
        p.calls.resize(q.nranks);
        p.streams.resize(q.nranks);
        p.arrived.assign(q.nranks, false);
    }
    if (p.arrived[comm->rank]) return INVALID_USAGE;  // two communicators with one rank
    p.calls[comm->rank] = call;
    p.streams[comm->rank] = stream;
    p.arrived[comm->rank] = true;
    if (++p.count < q.nranks) {
        stream_pending(stream, true);  // completes when the last rank calls
        return SUCCESS;
    }
    ncclResult_t r = execute(p.calls);
    if (r != SUCCESS) q.async_error = r;  // the ranks that returned already learn it here
    for (int k = 0; k < q.nranks; k++)
        if (k != comm->rank) stream_pending(p.streams[k], false);
    q.pending.erase(seq);
    q.changed.notify_all();  // a blocking ncclCommFinalize may be waiting for it
    return r;
}

// NCCL forbids any call but ncclCommGetAsyncError and ncclCommAbort on a non-blocking
// communicator whose last call returned ncclInProgress, until the poll says ncclSuccess.
bool busy(Comm* comm, const char* what) {
    if (comm->stage == READY) return false;
    std::fprintf(stderr, "emulated NCCL: %s called on rank %d while its last call is in progress "
                 "(poll ncclCommGetAsyncError until ncclSuccess first)\n", what, comm->rank);
    return true;
}

const char* kind_name(Kind k) {
    return k == ALL_GATHER ? "ncclAllGather" : k == ALL_REDUCE ? "ncclAllReduce" : "ncclReduceScatter";
}

ncclResult_t collective(void* handle, Call call, void* stream) {
    Comm* comm = static_cast<Comm*>(handle);
    if (!comm) return INVALID_ARGUMENT;
    Clique& q = *comm->clique;
    std::unique_lock<std::mutex> g(q.lock);
    if (busy(comm, kind_name(call.kind))) return INVALID_USAGE;
    if (q.aborted) return INVALID_USAGE;
    if (!comm->connected) {
        // The first collective makes this rank's connections, which needs every peer's first.
        comm->connected = true;
        q.connected++;
        q.changed.notify_all();
        if (q.connected < q.nranks) {
            if (!comm->blocking) {
                comm->stage = CONNECTING;
                comm->deferred = call;
                comm->deferred_stream = stream;
                return IN_PROGRESS;
            }
            if (!q.changed.wait_for(g, PEER_WAIT,
                                    [&] { return q.connected >= q.nranks || q.aborted; }))
                return SYSTEM;
            if (q.aborted) return INVALID_USAGE;
        }
    }
    return submit(comm, call, stream);
}

// Whether `rank` has calls the other ranks have not all joined yet.
bool has_pending(Clique& q, int rank) {
    for (auto& [seq, p] : q.pending)
        if (p.arrived[rank]) return true;
    return false;
}

// Releases the calls `rank` left pending (its streams stop waiting; the data never comes).
void release_pending(Clique& q, int rank) {
    for (auto& [seq, p] : q.pending) {
        if (!p.arrived[rank]) continue;
        p.arrived[rank] = false;
        p.count--;
        stream_pending(p.streams[rank], false);
    }
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API ncclResult_t ncclGetVersion(int* version) {
    *version = 23000;  // multi-rank per device, as NCCL 2.30's NCCL_MULTI_RANK_GPU_ENABLE
    return SUCCESS;
}

API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    static std::mutex lock;
    static std::mt19937_64 rng(std::random_device{}());
    std::lock_guard<std::mutex> g(lock);
    std::memset(id->internal, 0, sizeof id->internal);
    std::string tag = "pfc-emulated-nccl-" + std::to_string(rng()) + "-" + std::to_string(rng());
    std::memcpy(id->internal, tag.data(), tag.size());
    return SUCCESS;
}

// Joins the clique of `id`: a blocking join waits for every rank; a non-blocking one returns a
// communicator at once, in progress until they have.
ncclResult_t join(void** out, int nranks, ncclUniqueId id, int rank, bool blocking) {
    if (!out || nranks < 1 || rank < 0 || rank >= nranks) return INVALID_ARGUMENT;
    std::string key(id.internal, sizeof id.internal);
    std::shared_ptr<Clique> clique;
    {
        std::lock_guard<std::mutex> g(registry_lock);
        clique = registry()[key].lock();
        if (!clique) {
            clique = std::make_shared<Clique>();
            clique->nranks = nranks;
            registry()[key] = clique;
        }
    }
    std::unique_lock<std::mutex> g(clique->lock);
    if (clique->nranks != nranks) return INVALID_USAGE;
    clique->joined++;
    clique->changed.notify_all();
    if (!blocking) {
        Comm* comm = new Comm{clique, rank};
        comm->blocking = false;
        if (clique->joined >= nranks) return *out = comm, SUCCESS;
        comm->stage = JOINING;
        comm->since = Clock::now();
        *out = comm;
        return IN_PROGRESS;
    }
    if (!clique->changed.wait_for(g, PEER_WAIT, [&] { return clique->joined >= nranks; }))
        return SYSTEM;
    *out = new Comm{clique, rank};
    return SUCCESS;
}

API ncclResult_t ncclCommInitRank(void** out, int nranks, ncclUniqueId id, int rank) {
    return join(out, nranks, id, rank, true);
}

// Reads the head of the config as NCCL does: it must come from NCCL_CONFIG_INITIALIZER (magic,
// a size and version of 2.14 or later); an unset `blocking` (INT_MIN) means blocking.
API ncclResult_t ncclCommInitRankConfig(void** out, int nranks, ncclUniqueId id, int rank,
                                        ConfigHead* config) {
    bool blocking = true;
    if (config) {
        if (config->magic != 0xcafebeef || config->size < sizeof(ConfigHead) ||
            config->version < 21400) {
            std::fprintf(stderr, "emulated NCCL: ncclConfig_t not from NCCL_CONFIG_INITIALIZER "
                         "(magic %x, size %zu, version %u)\n", config->magic, config->size,
                         config->version);
            return INVALID_ARGUMENT;
        }
        blocking = config->blocking != 0;
    }
    return join(out, nranks, id, rank, blocking);
}

// A rank leaves: its pending calls are released; an abort also makes the clique refuse calls.
ncclResult_t leave(void* handle, bool abort) {
    Comm* comm = static_cast<Comm*>(handle);
    if (comm) {
        std::lock_guard<std::mutex> g(comm->clique->lock);
        if (!abort && busy(comm, "ncclCommDestroy")) return INVALID_USAGE;
        if (abort) comm->clique->aborted = true;
        comm->clique->changed.notify_all();
        release_pending(*comm->clique, comm->rank);
    }
    delete comm;
    return SUCCESS;
}

API ncclResult_t ncclCommDestroy(void* handle) { return leave(handle, false); }
API ncclResult_t ncclCommAbort(void* handle) { return leave(handle, true); }

// The communicator's state: an asynchronous error, or whether its last non-blocking call is done
// (finishing it here, as NCCL's own threads would meanwhile).
API ncclResult_t ncclCommGetAsyncError(void* handle, ncclResult_t* error) {
    Comm* comm = static_cast<Comm*>(handle);
    if (!comm || !error) return INVALID_ARGUMENT;
    Clique& q = *comm->clique;
    std::lock_guard<std::mutex> g(q.lock);
    *error = q.async_error;
    if (*error != SUCCESS) return SUCCESS;
    switch (comm->stage) {
        case READY: break;
        case JOINING:
            if (q.joined >= q.nranks) comm->stage = READY;
            else if (Clock::now() - comm->since > PEER_WAIT) *error = SYSTEM;
            else *error = IN_PROGRESS;
            break;
        case CONNECTING:
            if (q.aborted) *error = INVALID_USAGE;
            else if (q.connected < q.nranks) *error = IN_PROGRESS;
            else {
                comm->stage = READY;
                *error = submit(comm, comm->deferred, comm->deferred_stream);
            }
            break;
        case FINALIZING:
            if (has_pending(q, comm->rank)) *error = IN_PROGRESS;
            else comm->stage = READY;
            break;
    }
    return SUCCESS;
}

// Flushes the rank's calls: done when none of them waits for a peer any more. A blocking
// communicator waits here (bounded by PEER_WAIT), a non-blocking one returns ncclInProgress.
API ncclResult_t ncclCommFinalize(void* handle) {
    Comm* comm = static_cast<Comm*>(handle);
    if (!comm) return INVALID_ARGUMENT;
    Clique& q = *comm->clique;
    std::unique_lock<std::mutex> g(q.lock);
    if (busy(comm, "ncclCommFinalize")) return INVALID_USAGE;
    if (!has_pending(q, comm->rank)) return SUCCESS;
    if (!comm->blocking) {
        comm->stage = FINALIZING;
        return IN_PROGRESS;
    }
    if (!q.changed.wait_for(g, PEER_WAIT, [&] { return !has_pending(q, comm->rank); }))
        return SYSTEM;
    return SUCCESS;
}

API ncclResult_t ncclCommCount(void* comm, int* count) {
    *count = static_cast<Comm*>(comm)->clique->nranks;
    return SUCCESS;
}

API ncclResult_t ncclCommUserRank(void* comm, int* rank) {
    *rank = static_cast<Comm*>(comm)->rank;
    return SUCCESS;
}

API ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, int dtype, void* comm,
                               void* stream) {
    return collective(comm, Call{ALL_GATHER, send, recv, count, dtype, SUM}, stream);
}

API ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op,
                               void* comm, void* stream) {
    return collective(comm, Call{ALL_REDUCE, send, recv, count, dtype, op}, stream);
}

API ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t count, int dtype, int op,
                                   void* comm, void* stream) {
    return collective(comm, Call{REDUCE_SCATTER, send, recv, count, dtype, op}, stream);
}

API ncclResult_t ncclGroupStart() { return SUCCESS; }
API ncclResult_t ncclGroupEnd() { return SUCCESS; }

API const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case SUCCESS: return "no error";
        case SYSTEM: return "emulated NCCL: a peer rank never joined";
        case INVALID_ARGUMENT: return "invalid argument";
        case INVALID_USAGE: return "invalid usage (ranks disagree, or the communicator was aborted)";
        default: return "emulated NCCL error";
    }
}

API const char* ncclGetLastError(void*) { return ""; }
