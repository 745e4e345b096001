// The block scheduler: every thread of a block is a fiber on the launching OS thread.
// A fiber runs until it reaches a barrier or a warp collective, then yields; when no fiber can
// run, the scheduler completes the collectives whose lanes have all arrived (a warp's shuffle,
// the block's __syncthreads). Blocks run one after another, in a different order at each launch
// (block_order), so the "last block" pattern (threadfence + counter) works but cannot rely on
// which block is last, and a barrier nobody can reach is reported, not hung on. Between two
// synchronization points the threads of a block run one after another, a warp at a time as far
// as it can get, warps and lanes in a different order every time (run_block, permute), so a
// read of another thread's write without a barrier between them sees the write in some orders
// and not in others, and fails a test that compares results.
//
// Memory errors are caught where a GPU's compute-sanitizer would catch them: an access past
// either end of an allocation hits a guard page (driver.cpp), an index past a shared or local
// array's bound traps (build.rs compiles kernels with -fsanitize=bounds and traps), and the
// handler here names the kernel, block, thread and allocation before stopping the process.
#include "emu.h"
#include "scheduler.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <mutex>

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

// Fiber switch on x86-64: save the callee-saved registers, MXCSR and the x87 control word on
// the current stack, store its pointer in *from, and resume the stack `to`. No system call
// (ucontext's swapcontext saves the signal mask with one, which made an emulated launch of a
// million threads take seconds).
extern "C" void emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

namespace emu {

thread_local const ThreadView* current = nullptr;
// Blocks started on this OS thread (defined below).
extern thread_local uint64_t block_serial;

namespace {

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr size_t GUARD_BYTES = 4096;

enum class State { Runnable, AtBlock, AtWarp, Done };

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while suspended
    ThreadView view;
    State state = State::Runnable;
    int pred = 0;
    int block_result = 0;
    WarpOp op = SYNC;
    unsigned mask = 0;
    uint64_t value = 0;
    int param = 0;
    int width = 32;
    uint64_t result = 0;
};

// One OS thread's running block.
struct BlockRun {
    std::vector<Fiber> fibers;
    void* scheduler = nullptr;
    size_t cur = 0;
    void* fn = nullptr;
    Thunk thunk = nullptr;
    void** args = nullptr;
};

thread_local BlockRun* running = nullptr;
thread_local const KernelEntry* running_kernel = nullptr;

// Fiber stacks with a guard page below each, kept per OS thread and reused by every launch.
struct StackPool {
    std::vector<char*> stacks;
    ~StackPool() {
        for (char* s : stacks) munmap(s, STACK_BYTES + GUARD_BYTES);
    }
    char* get(size_t i) {
        while (stacks.size() <= i) {
            void* p = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) return nullptr;
            mprotect(p, GUARD_BYTES, PROT_NONE);
            stacks.push_back(static_cast<char*>(p));
        }
        return stacks[i] + GUARD_BYTES;
    }
};
thread_local StackPool stack_pool;

// First frame of every fiber; never returns (a finished fiber is never resumed).
[[noreturn]] void fiber_main() {
    BlockRun* r = running;
    r->thunk(r->fn, r->args);
    Fiber& f = r->fibers[r->cur];
    f.state = State::Done;
    emu_switch(&f.sp, r->scheduler);
    __builtin_unreachable();
}

// A fresh stack that emu_switch resumes into fiber_main: the saved MXCSR/x87 word and six
// zeroed registers, then fiber_main as the return address, with the stack aligned as at a call.
void* fresh_stack(char* base, size_t bytes) {
    uintptr_t top = ((uintptr_t)(base + bytes)) & ~(uintptr_t)15;
    void** sp = (void**)(top - 16);
    sp[1] = nullptr;
    sp[0] = (void*)&fiber_main;
    sp -= 6;
    for (int i = 0; i < 6; i++) sp[i] = nullptr;
    sp -= 1;
    uint32_t csr[2];
    __asm__ volatile("stmxcsr %0" : "=m"(csr[0]));
    __asm__ volatile("fnstcw %0" : "=m"(csr[1]));
    std::memcpy(sp, csr, 8);
    return sp;
}

Fiber& self() { return running->fibers[running->cur]; }

void yield_to_scheduler() {
    Fiber& f = self();
    emu_switch(&f.sp, running->scheduler);
}

std::map<std::string, KernelEntry>& registry() {
    static std::map<std::string, KernelEntry> r;
    return r;
}

const char* op_name(WarpOp op) {
    switch (op) {
        case SHFL_IDX: return "__shfl_sync";
        case SHFL_UP: return "__shfl_up_sync";
        case SHFL_DOWN: return "__shfl_down_sync";
        case SHFL_XOR: return "__shfl_xor_sync";
        case BALLOT: return "__ballot_sync";
        default: return "__syncwarp";
    }
}

// Completes the collective of the first waiting lane of warp `w` if all of its lanes arrived.
// Returns true if lanes were released; sets `error` if the collective can never complete.
bool release_warp(BlockRun& r, size_t w, std::string& error) {
    size_t first = w * 32, end = std::min(first + 32, r.fibers.size());
    bool released = false;
    for (size_t lead = first; lead < end; lead++) {
        Fiber& head = r.fibers[lead];
        if (head.state != State::AtWarp) continue;
        unsigned mask = head.mask;
        if (!(mask >> (lead - first) & 1u)) {
            error = std::string(op_name(head.op)) + " called by a lane outside its own mask";
            return false;
        }
        // As shfl.sync and friends: wait for the non-exited lanes of the mask (an exited lane
        // takes no part; a value read from it is undefined, here all ones).
        bool ready = true;
        for (size_t l = first; l < end; l++) {
            if (!(mask >> (l - first) & 1u)) continue;
            Fiber& f = r.fibers[l];
            if (f.state == State::Done) continue;
            if (f.state != State::AtWarp) {
                ready = false;
                break;
            }
            if (f.op != head.op || f.mask != head.mask) {
                error = std::string("lanes of warp ") + std::to_string(w) + " disagree: " +
                        op_name(head.op) + " and " + op_name(f.op) + " with the same lanes";
                return false;
            }
        }
        if (!ready) continue;
        auto waiting = [&](size_t l) {
            return l < end && (mask >> (l - first) & 1u) && r.fibers[l].state == State::AtWarp;
        };
        uint64_t ballot = 0;
        for (size_t l = first; l < end; l++)
            if (waiting(l) && r.fibers[l].value) ballot |= 1ull << (l - first);
        for (size_t l = first; l < end; l++) {
            if (!waiting(l)) continue;
            Fiber& f = r.fibers[l];
            int lane = (int)(l - first), width = f.width, seg = lane & ~(width - 1);
            int src = lane;
            switch (f.op) {
                case SHFL_IDX: src = seg + (f.param & (width - 1)); break;
                case SHFL_UP: src = (lane - seg) >= f.param ? lane - f.param : lane; break;
                case SHFL_DOWN: src = (lane - seg) + f.param < width ? lane + f.param : lane; break;
                // PTX shfl.bfly: any lane up to the end of the caller's segment.
                case SHFL_XOR: src = (lane ^ f.param) <= seg + width - 1 ? lane ^ f.param : lane; break;
                default: break;
            }
            size_t s = first + (size_t)src;
            uint64_t from_src = waiting(s) ? r.fibers[s].value : ~0ull;  // exited or outside
            f.result = f.op == BALLOT ? ballot : (src == lane ? f.value : from_src);
        }
        for (size_t l = first; l < end; l++)
            if (waiting(l)) r.fibers[l].state = State::Runnable;
        released = true;
    }
    return released;
}

// A xorshift step (its state must not be zero).
uint64_t next_random(uint64_t& x) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return x * 0x2545F4914F6CDD1Dull;
}

// The orders a block's warps, and the lanes of each warp, take turns in. A GPU promises none:
// warps run in any order and, since Volta, the lanes of a warp may too. By default another
// permutation each time, from `x` (seeded by the block, so reproducible per test);
// PFC_EMULATOR_LANE_ORDER=sequential or =reverse runs them in index order or its reverse.
void permute(size_t* order, size_t n, uint64_t& x);

// Runs one block to completion; empty on success, else what went wrong.
//
// One warp at a time runs as far as it can: its lanes run (in some order) to their next warp
// collective or barrier, a collective all lanes reached completes, and they go on, until the
// warp waits at __syncthreads, finishes, or waits for lanes that cannot arrive. Then another
// warp. So a warp gets many collectives ahead of the others, as a fast warp on a GPU can, and a
// read of shared memory that only a __syncthreads keeps from the next writer sees the write.
std::string run_block(BlockRun& r) {
    size_t n = r.fibers.size();
    for (size_t i = 0; i < n; i++) {
        Fiber& f = r.fibers[i];
        char* stack = stack_pool.get(i);
        if (!stack) return "cannot map a fiber stack";
        f.sp = fresh_stack(stack, STACK_BYTES);
        f.state = State::Runnable;
    }
    size_t warps = (n + 31) / 32;
    std::vector<size_t> warp_order(warps), lanes(32);
    uint64_t x = 0x9E3779B97F4A7C15ull * (block_serial + 1) | 1;
    std::string error;
    for (;;) {
        bool progressed = false;
        for (size_t w = 0; w < warps; w++) warp_order[w] = w;
        permute(warp_order.data(), warps, x);
        for (size_t w : warp_order) {
            size_t first = w * 32, count = std::min(n - first, (size_t)32);
            // At most a random number of collectives per turn (1 to 64): far enough ahead to
            // expose a missing __syncthreads (a block reduction's trailing barrier protects
            // shared memory from a warp about 20 collectives ahead), never so far that a warp
            // spinning (with __syncwarp) on a flag another warp sets keeps that warp from ever
            // running.
            for (uint64_t turn = 1 + next_random(x) % 64;; turn--) {
                for (size_t l = 0; l < count; l++) lanes[l] = first + l;
                permute(lanes.data(), count, x);
                for (size_t l = 0; l < count; l++) {
                    size_t i = lanes[l];
                    if (r.fibers[i].state != State::Runnable) continue;
                    r.cur = i;
                    current = &r.fibers[i].view;
                    emu_switch(&r.scheduler, r.fibers[i].sp);
                    progressed = true;
                }
                bool released = release_warp(r, w, error);
                if (!error.empty()) return error;
                if (!released) break;
                progressed = true;
                if (turn == 1) break;
            }
        }
        size_t live = 0, at_block = 0;
        for (auto& f : r.fibers) {
            live += f.state != State::Done;
            at_block += f.state == State::AtBlock;
        }
        if (live == 0) return {};
        if (at_block == live) {
            int count = 0;
            for (auto& f : r.fibers) count += f.state == State::AtBlock && f.pred;
            for (auto& f : r.fibers) {
                if (f.state != State::AtBlock) continue;
                f.block_result = count;
                f.state = State::Runnable;
            }
            continue;
        }
        if (progressed) continue;
        return "deadlock: " + std::to_string(at_block) + " of " + std::to_string(live) +
               " live threads wait at __syncthreads, the others at a warp collective that "
               "cannot complete";
    }
}

// The order blocks run in. A GPU promises none, so each launch takes another permutation (a
// kernel whose result depends on it fails some launches, the same ones at every run of a test);
// PFC_EMULATOR_BLOCK_ORDER=sequential or =reverse runs them in index order or its reverse.
std::vector<size_t> block_order(size_t blocks) {
    std::vector<size_t> order(blocks);
    for (size_t i = 0; i < blocks; i++) order[i] = i;
    static const std::string mode = [] {
        const char* v = std::getenv("PFC_EMULATOR_BLOCK_ORDER");
        return std::string(v ? v : "");
    }();
    if (mode == "sequential") return order;
    if (mode == "reverse") return std::vector<size_t>(order.rbegin(), order.rend());
    // Seeded by this OS thread's launch count: a test's launches get the same orders every run.
    thread_local uint64_t launches = 0;
    uint64_t x = 0x9E3779B97F4A7C15ull * (++launches);
    for (size_t i = blocks; i > 1; i--) std::swap(order[i - 1], order[next_random(x) % i]);
    return order;
}

}  // namespace

// Blocks started on this OS thread: the shared variables poisoned in the current one.
thread_local uint64_t block_serial = 0;

namespace {
void permute(size_t* order, size_t n, uint64_t& x) {
    static const std::string mode = [] {
        const char* v = std::getenv("PFC_EMULATOR_LANE_ORDER");
        return std::string(v ? v : "");
    }();
    if (mode == "sequential") return;
    if (mode == "reverse") {
        std::reverse(order, order + n);
        return;
    }
    for (size_t i = n; i > 1; i--) std::swap(order[i - 1], order[next_random(x) % i]);
}

// Memory errors inside a kernel: report and stop, as compute-sanitizer does. Faults elsewhere
// go to the handler that was there before (Rust's stack-overflow check) or the default action.
struct sigaction previous_segv, previous_bus, previous_ill;

void on_fault(int sig, siginfo_t* info, void* context) {
    const KernelEntry* k = running_kernel;
    char where[256] = "no allocation's guard pages hold it (a wild pointer, or a fiber stack overflow)";
    bool ours = describe_address((uintptr_t)info->si_addr, where, sizeof where);
    if (k || ours) {
        char msg[768];
        const ThreadView* t = current;
        char who[160] = "outside any kernel (a copy or a library call)";
        if (k && t)
            std::snprintf(who, sizeof who, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", k->name,
                          t->block_idx.x, t->block_idx.y, t->block_idx.z, t->thread_idx.x,
                          t->thread_idx.y, t->thread_idx.z);
        int len;
        if (sig == SIGILL)
            len = std::snprintf(msg, sizeof msg,
                                "partial-fc CUDA emulator: memcheck: %s: a trap: an index past the "
                                "bound of a shared or local array (-fsanitize=bounds) or a misaligned "
                                "access, such as a float4 load at an address not a multiple of 16 "
                                "(-fsanitize=alignment)\n",
                                who);
        else
            len = std::snprintf(msg, sizeof msg,
                                "partial-fc CUDA emulator: memcheck: %s: invalid access at 0x%llx, %s\n",
                                who, (unsigned long long)(uintptr_t)info->si_addr, where);
        if (len > 0) (void)!write(2, msg, (size_t)std::min(len, (int)sizeof msg - 1));
        signal(SIGABRT, SIG_DFL);
        abort();
    }
    struct sigaction* prev = sig == SIGSEGV ? &previous_segv : sig == SIGBUS ? &previous_bus : &previous_ill;
    if (prev->sa_handler == SIG_DFL || prev->sa_handler == SIG_IGN) {
        sigaction(sig, prev, nullptr);  // returning re-runs the access under the default action
    } else if (prev->sa_flags & SA_SIGINFO) {
        prev->sa_sigaction(sig, info, context);
    } else {
        prev->sa_handler(sig);
    }
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction a = {};
        a.sa_sigaction = on_fault;
        a.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&a.sa_mask);
        sigaction(SIGSEGV, &a, &previous_segv);
        sigaction(SIGBUS, &a, &previous_bus);
        sigaction(SIGILL, &a, &previous_ill);
    });
}
}  // namespace
thread_local std::map<void*, uint64_t> poisoned;

void poison_shared(void* p, size_t bytes) {
    uint64_t& at = poisoned[p];
    if (at == block_serial) return;
    at = block_serial;
    std::memset(p, 0xff, bytes);
}

int block_barrier(int pred) {
    Fiber& f = self();
    f.state = State::AtBlock;
    f.pred = pred;
    yield_to_scheduler();
    return self().block_result;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int param, int width) {
    Fiber& f = self();
    f.state = State::AtWarp;
    f.op = op;
    f.mask = mask;
    f.value = op == BALLOT ? (value != 0) : value;
    f.param = param;
    f.width = width;
    yield_to_scheduler();
    return self().result;
}

void register_kernel(const char* name, void* fn, Thunk thunk) {
    registry()[name] = KernelEntry{name, fn, thunk};
}

const KernelEntry* find_kernel(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

std::string launch(const KernelEntry& k, dim3 grid, dim3 block, void** args) {
    size_t threads = (size_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) return "block of " + std::to_string(threads) + " threads";
    if ((size_t)grid.x * grid.y * grid.z == 0) return "empty grid";
    if (running) return "a kernel launched from inside a kernel";
    install_fault_handler();
    BlockRun r;
    r.fn = k.fn;
    r.thunk = k.thunk;
    r.args = args;
    r.fibers.resize(threads);
    running = &r;
    running_kernel = &k;
    std::string error;
    std::vector<size_t> order = block_order((size_t)grid.x * grid.y * grid.z);
    for (size_t i = 0; i < order.size() && error.empty(); i++) {
        unsigned bx = (unsigned)(order[i] % grid.x);
        unsigned by = (unsigned)(order[i] / grid.x % grid.y);
        unsigned bz = (unsigned)(order[i] / ((size_t)grid.x * grid.y));
        size_t t = 0;
        for (unsigned z = 0; z < block.z; z++)
            for (unsigned y = 0; y < block.y; y++)
                for (unsigned x = 0; x < block.x; x++, t++)
                    r.fibers[t].view = ThreadView{{x, y, z}, {bx, by, bz}, block, grid};
        block_serial++;
        error = run_block(r);
        if (!error.empty())
            error = "block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                    std::to_string(bz) + "): " + error;
    }
    running = nullptr;
    running_kernel = nullptr;
    current = nullptr;
    return error;
}

}  // namespace emu
