// Kernels of the emulator's own tests (tests/scheduler.rs): the semantics of the warp
// collectives and barriers, and the failures the scheduler must report instead of hanging.
// Compiled into the emulated libcuda.so only.

// Each thread's results of every collective, on a block of 64 threads (two warps).
extern "C" __global__ void emu_test_collectives(const int* in, int* out_xor, int* out_up,
                                                int* out_down, int* out_idx, unsigned* out_ballot,
                                                int* out_count) {
    int t = threadIdx.x;
    int v = in[t];
    out_xor[t] = __shfl_xor_sync(0xffffffffu, v, 5);
    out_up[t] = __shfl_up_sync(0xffffffffu, v, 3);
    out_down[t] = __shfl_down_sync(0xffffffffu, v, 3);
    out_idx[t] = __shfl_sync(0xffffffffu, v, 7, 16);
    out_ballot[t] = __ballot_sync(0xffffffffu, v & 1);
    out_count[t] = __syncthreads_count(v & 1);
}

// A shared-memory tree sum per block: shared memory is per block and barriers order it.
extern "C" __global__ void emu_test_block_sums(const float* in, float* out) {
    __shared__ float partial[256];
    int t = threadIdx.x;
    partial[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) partial[t] += partial[t + half];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

// Lane 31 of each warp exits; the others shuffle with the full mask, which shfl.sync allows (it
// waits for the non-exited lanes of the mask). Lane 30 reads from the exited lane: undefined on a
// GPU, all ones here.
extern "C" __global__ void emu_test_lane_exits(int* out) {
    if (threadIdx.x % 32 == 31) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

// Butterfly with width 16 and lane mask 16: PTX lets a lane read any lane up to the end of its
// own segment, so lanes 16-31 read lanes 0-15 and lanes 0-15 keep their own values; and max/min
// on floats are fmaxf/fminf.
extern "C" __global__ void emu_test_xor_width_and_nan(int* out, float* nan_max) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 16, 16);
    if (threadIdx.x == 0) {
        float nan = __int_as_float(0x7fc00000);
        nan_max[0] = max(nan, 1.0f);
        nan_max[1] = max(1.0f, nan);
        nan_max[2] = min(nan, -1.0f);
    }
}

// Warp 0 waits at __syncthreads, lane 0 of warp 1 at a shuffle with lane 1, which waits at a
// second __syncthreads: nothing can proceed.
extern "C" __global__ void emu_test_deadlock(int* out) {
    if (threadIdx.x < 32 || threadIdx.x == 33) {
        __syncthreads();
    } else if (threadIdx.x == 32) {
        out[0] = __shfl_sync(0x3u, 1, 0);
    }
}

// The position at which each block ran (blocks of one thread).
extern "C" __global__ void emu_test_block_order(unsigned* counter, unsigned* position) {
    position[blockIdx.x] = atomicAdd(counter, 1u);
}

// Reads shared memory before anyone wrote it, then writes it: every block must read garbage
// (all ones here), never the previous block's values.
extern "C" __global__ void emu_test_shared_garbage(unsigned* out) {
    __shared__ unsigned s[4];
    out[blockIdx.x * 4 + threadIdx.x] = s[threadIdx.x];
    __syncthreads();
    s[threadIdx.x] = 100 + threadIdx.x;
}

// Thread 0 writes `value` at p[index]: the memcheck tests aim it past the ends of an allocation.
extern "C" __global__ void emu_test_write_at(int* p, long long index, int value) {
    if (threadIdx.x == 0) p[index] = value;
}

// Thread 0 loads a float4 at p + offset floats: an offset that is not a multiple of 4 is a
// misaligned vector load, which a GPU refuses ("misaligned address") and x86 would allow.
extern "C" __global__ void emu_test_vector_load_at(const float* p, long long offset, float* out) {
    if (threadIdx.x == 0) {
        float4 v = *(const float4*)(p + offset);
        out[0] = v.x + v.y + v.z + v.w;
    }
}

// Threads 4 and up index past the shared array: the bounds check must trap.
extern "C" __global__ void emu_test_shared_index(int* out) {
    __shared__ int s[4];
    s[threadIdx.x] = (int)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

// Thread 0 writes a shared flag that every thread reads with no barrier between: a race. Run in
// index order, thread 0 always writes first and the race never shows; the scheduler must run
// the threads of a block in other orders, so that some read the flag before it is written.
extern "C" __global__ void emu_test_missing_barrier(int* out) {
    __shared__ int flag;
    if (threadIdx.x == 0) flag = 7;
    out[blockIdx.x * blockDim.x + threadIdx.x] = flag;
}

// A two-warp sum through shared memory with no barrier after the read, used twice: a warp that
// gets past the read's __syncwarp before the other warp has read overwrites its partial with the
// second sum's. On a GPU a fast warp can; the scheduler must let one (the first sum is then 11,
// not 2, on some threads).
__device__ int sum_of_two_warps(int v) {
    __shared__ int partial[2];
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    int s = partial[0] + partial[1];
    __syncwarp();
    return s;
}
extern "C" __global__ void emu_test_warp_runs_ahead(int* out) {
    int first = sum_of_two_warps(1);
    int second = sum_of_two_warps(10);
    out[(blockIdx.x * blockDim.x + threadIdx.x) * 2] = first;
    out[(blockIdx.x * blockDim.x + threadIdx.x) * 2 + 1] = second;
}

// Warp 0 spins (with __syncwarp) until warp 1 sets its block's flag: legal since Volta, where
// warps make progress independently. The scheduler must not run warp 0 forever.
extern "C" __global__ void emu_test_spin_on_another_warp(int* flags, int* out) {
    volatile int* flag = flags + blockIdx.x;
    if (threadIdx.x < 32) {
        int spins = 0;
        while (*flag == 0) {
            __syncwarp();
            spins++;
        }
        out[blockIdx.x * 32 + threadIdx.x] = spins >= 0;
    } else if (threadIdx.x == 32) {
        *flag = 1;
    }
}
