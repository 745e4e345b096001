// Label localization and class sampling. CPU references: src/cpu/sampling.rs, same names.
//
// Every class gets a 64-bit key (high word: random bits >> 1, a hard-negative score, or
// 0xFFFFFFFF for a positive; low word: 0xFFFFFFFF - class, so keys are distinct). The S largest
// keys are found by an MSB-first radix select over 8-bit digits whose state (prefix found so far,
// rank still to find) lives in device memory, so the eight passes queue without a host round trip.
// The survivors (key >= threshold) are compacted in class order with a block-scan, and the labels
// are remapped by a binary search in the sorted sample.
#include "common.cuh"

#define POSITIVE_KEY 0xFFFFFFFFu
#define SCAN_BLOCK 1024  // threads (and classes) per block of the compaction

__device__ __forceinline__ u64 make_key(u32 high, u64 cls) { return ((u64)high << 32) | (u64)(0xFFFFFFFFu - (u32)cls); }

extern "C" __global__ void localize_labels(const i64* global, int rows, u64 shard_start, u64 shard_len, int* local) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows) return;
    i64 g = global[i];
    i64 off = (i64)((u64)g - shard_start);
    local[i] = (g >= 0 && off >= 0 && (u64)off < shard_len) ? (int)off : -1;
}

extern "C" __global__ void iota(int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = i;
}

extern "C" __global__ void random_keys(u64* keys, int shard_len, u64 shard_start, u64 seed, u64 step) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= shard_len) return;
    u32 high = class_random_bits(seed, step, shard_start + (u64)c) >> 1;
    keys[c] = make_key(high, c);
}

// Positives to the top. Rows with the same label write the same value.
extern "C" __global__ void force_positives(const int* labels, int rows, u64* keys) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows) return;
    int l = labels[i];
    if (l >= 0) keys[l] = make_key(POSITIVE_KEY, l);
}

// src/cpu/sampling.rs score_key_high: orders like the score, NaN as -inf, below POSITIVE_KEY.
__device__ __forceinline__ u32 score_key_high(float score) {
    float s = score != score ? -INFINITY : score;  // NaN as -inf
    u32 bits = __float_as_uint(s);
    u32 ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return min(ordered, POSITIVE_KEY - 1);
}

// Hard-negative phase 1: every non-positive key becomes its score key.
extern "C" __global__ void score_keys(u64* keys, const float* scores, int shard_len) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= shard_len) return;
    if ((u32)(keys[c] >> 32) != POSITIVE_KEY) keys[c] = make_key(score_key_high(scores[c]), c);
}

// Hard-negative phase 2: classes chosen in phase 1 (key >= the selected threshold, positives
// included) become positives; the others get their random key back.
extern "C" __global__ void promote_chosen(u64* keys, int shard_len, const u64* select_state, u64 shard_start,
                                          u64 seed, u64 step) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= shard_len) return;
    bool chosen = keys[c] >= select_state[0];
    u32 high = chosen ? POSITIVE_KEY : class_random_bits(seed, step, shard_start + (u64)c) >> 1;
    keys[c] = make_key(high, c);
}

// --- radix select: state[0] = prefix of the k-th largest key found so far, state[1] = rank left.

extern "C" __global__ void radix_select_init(u64* state, u32* hist, u64 k) {
    if (threadIdx.x == 0) { state[0] = 0; state[1] = k; }
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
}

// Histogram of digit `shift/8` over the keys that agree with the prefix on the higher digits.
extern "C" __global__ void radix_histogram(const u64* keys, int n, const u64* state, int shift, u32* hist) {
    __shared__ u32 local[256];
    for (int b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
    __syncthreads();
    u64 prefix = state[0];
    u64 high_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < n; c += gridDim.x * blockDim.x) {
        u64 key = keys[c];
        if ((key & high_mask) == prefix) atomicAdd(&local[(key >> shift) & 0xff], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
        if (local[b]) atomicAdd(&hist[b], local[b]);
}

// Picks the digit holding the rank left (walking down from 255), extends the prefix, and clears
// the histogram for the next digit. One block of 256 threads.
extern "C" __global__ void radix_select_digit(u64* state, int shift, u32* hist) {
    if (threadIdx.x == 0) {
        u64 remaining = state[1];
        int bin = 255;
        while (bin > 0 && hist[bin] < remaining) { remaining -= hist[bin]; bin--; }
        state[0] |= (u64)bin << shift;
        state[1] = remaining;
    }
    __syncthreads();
    hist[threadIdx.x] = 0;
}

// --- compaction in class order: count per block, scan the counts, write.

__device__ __forceinline__ bool selected(const u64* keys, int n, int c, u64 threshold) {
    return c < n && keys[c] >= threshold;
}

extern "C" __global__ void count_selected(const u64* keys, int n, const u64* select_state, u32* block_counts) {
    int c = blockIdx.x * SCAN_BLOCK + threadIdx.x;
    bool s = selected(keys, n, c, select_state[0]);
    int total = __syncthreads_count(s);
    if (threadIdx.x == 0) block_counts[blockIdx.x] = total;
}

// Exclusive scan of the block counts in place, total in counts[blocks]. One block of 1024 threads,
// tiles of 1024 counts with a running offset.
extern "C" __global__ void scan_block_counts(u32* counts, int blocks) {
    __shared__ u32 warp_totals[WARP];
    __shared__ u32 carry;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int base = 0; base < blocks; base += blockDim.x) {
        int b = base + threadIdx.x;
        u32 v = b < blocks ? counts[b] : 0;
        u32 incl = v;  // inclusive scan within the warp
        for (int o = 1; o < WARP; o <<= 1) {
            u32 n = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += n;
        }
        if (lane == WARP - 1) warp_totals[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            u32 w = warp_totals[lane];
            for (int o = 1; o < WARP; o <<= 1) {
                u32 n = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= o) w += n;
            }
            warp_totals[lane] = w;  // inclusive over warps
        }
        __syncthreads();
        u32 before = carry + (warp > 0 ? warp_totals[warp - 1] : 0) + incl - v;
        if (b < blocks) counts[b] = before;
        __syncthreads();
        if (threadIdx.x == 0) carry += warp_totals[WARP - 1];
        __syncthreads();
    }
    if (threadIdx.x == 0) counts[blocks] = carry;
}

extern "C" __global__ void compact_selected(const u64* keys, int n, const u64* select_state,
                                            const u32* block_offsets, int* sampled) {
    __shared__ u32 warp_counts[WARP];
    int c = blockIdx.x * SCAN_BLOCK + threadIdx.x;
    bool s = selected(keys, n, c, select_state[0]);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    u32 ballot = __ballot_sync(0xffffffffu, s);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    u32 before = block_offsets[blockIdx.x];
    for (int w = 0; w < warp; w++) before += warp_counts[w];
    before += __popc(ballot & ((1u << lane) - 1u));
    if (s) sampled[before] = c;
}

// Label -> position in the sorted sample (every positive is in it).
extern "C" __global__ void remap_labels(int* labels, int rows, const int* sampled, int count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows) return;
    int l = labels[i];
    if (l < 0) return;
    int lo = 0, hi = count;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (sampled[mid] < l) lo = mid + 1; else hi = mid;
    }
    labels[i] = (lo < count && sampled[lo] == l) ? lo : -1;
}
