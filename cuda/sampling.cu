// Label localization and class sampling. CPU references: src/cpu/sampling.rs, same names.
//
// Every class gets a 64-bit key (high word: random bits >> 1, a hard-negative score, or
// 0xFFFFFFFF for a positive; low word: 0xFFFFFFFF - class, so keys are distinct). The sample is
// the S largest keys, S = max(num_sample, distinct positives), written in class order.
//
// Design (one stream, no host round trip until the single 8-byte download of the count; four
// launches for the plain sampler):
//  1. The scratch (2048-bin histogram, select state) is zero between calls: zeroed when
//     allocated, and every call leaves it so (each digit pick clears the histogram, every
//     last block resets the blocks-done counter, the scan clears the positive count,
//     select_candidates the candidate count); after a failed call the host drops it. The
//     hard-negative path re-initializes it with sampling_init.
//  2. random_keys writes the keys and, fused, histograms their top 11 bits (shared-memory bins,
//     flushed with one global atomic per non-empty bin and block).
//  3. force_positives swaps positive keys in with atomicExch: the row that replaces a
//     non-positive key counts one distinct positive and moves the key's histogram count to the
//     positive bin (both added once per block), so duplicate labels count once and no label
//     goes to the host. Its last block picks the first digit (S = max(num_sample, positives)).
//  4. Only the high words are selected, to H, the S-th largest high word, and r, how many keys
//     with high word H are wanted. The low words order ties by class, so the wanted ties are the
//     first r in class order. After the first digit the chosen bin holds few keys (random high
//     words fill 1024 bins evenly: ~n/1024; positives have a bin of their own), so
//     collect_candidates reads the keys once, appends those of the chosen bin to a short list
//     (one atomic per warp) and, per block of 1024 classes, counts the keys of higher bins (all
//     selected). Its last block (select_candidates) picks the last two digits (11 + 10 bits)
//     from histograms of the list, adds each candidate above H or tied with it to its block's
//     count, and scans the per-block counts (above H, equal to H). A list that overflows its
//     buffer (not seen with random keys; possible in principle) makes that block walk all keys
//     instead: slower, same result.
//  5. compact_selected writes class c at (above before c) + min(ties before c, r): order
//     preserving, and exactly the CPU's top S by full key.
//  6. remap_labels (in compact_selected's last block, or its own kernel for more than
//     REMAP_IN_LAST_BLOCK rows) reads the count from the device, so the host syncs once, at the
//     end.
// The hard-negative variant needs the positive count on the host (one extra 8-byte download),
// selects the exact 64-bit threshold of phase 1 with six radix passes over all keys, the high
// word with three more, and counts per block with count_selected, whose last block scans.
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

#define BINS 2048          // histogram bins (11-bit digits)
#define SELECT_THREADS 1024 // threads of the histogram/select blocks
// Kernels launched with 1024 threads carry __launch_bounds__ so that ptxas keeps them within 64
// registers a thread on every toolchain (they use at most 52 with NVRTC 12.9; a newer compiler
// that wanted more would otherwise make the launch fail with "too many resources requested").
// The compaction's last blocks run select_digit and the scan, written for SELECT_THREADS.
static_assert(SCAN_BLOCK == SELECT_THREADS, "one block shape for the last-block work");
// Select state, u64 words: [0] prefix of the S-th largest key found so far, [1] rank still to
// find (after the last pass: the number of ties wanted), [2] blocks done in this pass,
// [3] distinct positives, [4] classes selected, [5] candidates collected, [6] candidates
// collected by the last plain call (kept, for tests: the list must not overflow in practice).
#define ST_PREFIX 0
#define ST_RANK 1
#define ST_DONE 2
#define ST_POSITIVES 3
#define ST_SELECTED 4
#define ST_CANDIDATES 5
#define ST_LAST_CANDIDATES 6

extern "C" __global__ void __launch_bounds__(SELECT_THREADS) sampling_init(u64* state, u32* hist, u64 k, int reset_positives) {
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) hist[b] = 0;
    if (threadIdx.x == 0) {
        state[ST_PREFIX] = 0; state[ST_RANK] = k; state[ST_DONE] = 0; state[ST_SELECTED] = 0;
        state[ST_CANDIDATES] = 0;
        if (reset_positives) state[ST_POSITIVES] = 0;
    }
}

// The "last block" pattern: each block's writes made visible, then a counter in state[2]; true
// in the one block that finishes last (which may then read every block's results). That block
// also resets the counter (every block has counted by then), for the next kernel.
__device__ bool last_block_done(u64* state) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&state[ST_DONE], 1ull) == gridDim.x - 1;
        if (last) state[ST_DONE] = 0;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

__device__ __forceinline__ void flush_hist(u32* local, u32* hist) {
    __syncthreads();
    for (int b = threadIdx.x; b < BINS; b += blockDim.x)
        if (local[b]) atomicAdd(&hist[b], local[b]);
}

// Keys and, fused, the histogram of their top 11 bits. Grid-stride; BINS shared bins per block.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS) random_keys(u64* keys, int shard_len, u64 shard_start, u64 seed, u64 step,
                                       u32* hist) {
    __shared__ u32 local[BINS];
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) local[b] = 0;
    __syncthreads();
    // An unsigned counter: an int one would wrap past INT_MAX - grid (shard_len < 2^31).
    for (u32 c = blockIdx.x * blockDim.x + threadIdx.x; c < (u32)shard_len; c += gridDim.x * blockDim.x) {
        u32 high = class_random_bits(seed, step, shard_start + (u64)c) >> 1;
        u64 key = make_key(high, c);
        keys[c] = key;
        atomicAdd(&local[key >> 53], 1u);
    }
    flush_hist(local, hist);
}

// One block of SELECT_THREADS: the digit holding the rank left, walking down from the top bin,
// found with a block suffix-scan of the bins; extends the prefix, clears the histogram.
__device__ void select_digit(u64* state, u32* hist, int shift, u64 remaining) {
    __shared__ u32 warp_sums[SELECT_THREADS / WARP];
    __shared__ u32 chosen_bin;
    __shared__ u64 chosen_remaining;
    const int per = BINS / SELECT_THREADS;  // bins per thread, thread 0 holding the top bins
    int t = threadIdx.x, lane = t % WARP, warp = t / WARP;
    u32 mine[BINS / SELECT_THREADS];
    u32 sum = 0;
    for (int j = 0; j < per; j++) {
        mine[j] = __ldcg(&hist[BINS - 1 - (t * per + j)]);
        sum += mine[j];
    }
    if (t == 0) { chosen_bin = 0; chosen_remaining = remaining; }
    u32 incl = sum;
    for (int o = 1; o < WARP; o <<= 1) {
        u32 n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    if (lane == WARP - 1) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        u32 w = lane < SELECT_THREADS / WARP ? warp_sums[lane] : 0;
        for (int o = 1; o < WARP; o <<= 1) {
            u32 n = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += n;
        }
        if (lane < SELECT_THREADS / WARP) warp_sums[lane] = w;
    }
    __syncthreads();
    u64 above = (u64)(incl - sum) + (warp > 0 ? warp_sums[warp - 1] : 0);  // keys in higher bins
    for (int j = 0; j < per; j++) {
        int bin = BINS - 1 - (t * per + j);
        // The digit: above < remaining <= above + count; bin 0 takes whatever is left.
        if (above < remaining && (remaining <= above + mine[j] || bin == 0)) {
            chosen_bin = bin;
            chosen_remaining = remaining - above;
        }
        above += mine[j];
    }
    if (remaining == 0 && t == 0) { chosen_bin = BINS - 1; chosen_remaining = 0; }
    __syncthreads();
    for (int b = t; b < BINS; b += blockDim.x) hist[b] = 0;
    if (t == 0) {
        state[ST_PREFIX] |= (u64)chosen_bin << shift;
        state[ST_RANK] = chosen_remaining;
    }
}

// Positives to the top. The first row to swap a non-positive key in counts the positive and
// moves the key's histogram count to the positive bin; rows with the same label write the same
// value. The counts are added once per block (every positive has the same bin, the top one: a
// thousand rows adding to one address one by one would serialize). With `select`, blocks of
// SELECT_THREADS, and the last block to finish picks the first digit for
// S = max(k, distinct positives).
extern "C" __global__ void __launch_bounds__(SELECT_THREADS) force_positives(const int* labels, int rows, u64* keys, u64* state, u32* hist,
                                           u64 k, int select) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int l = i < rows ? labels[i] : -1;
    bool counted = false;
    if (l >= 0) {
        u64 positive = make_key(POSITIVE_KEY, l);
        u64 old = atomicExch(&keys[l], positive);
        if (old != positive) {
            counted = true;
            atomicSub(&hist[old >> 53], 1u);
        }
    }
    int added = __syncthreads_count(counted);
    if (threadIdx.x == 0 && added > 0) {
        atomicAdd(&state[ST_POSITIVES], (u64)added);
        atomicAdd(&hist[BINS - 1], (u32)added);  // make_key(POSITIVE_KEY, .) >> 53
    }
    if (!select || !last_block_done(state)) return;
    u64 positives = __ldcg(&state[ST_POSITIVES]);
    if (threadIdx.x == 0) state[ST_PREFIX] = 0;
    select_digit(state, hist, 53, max(k, positives));
}

// Histogram of the digit at `shift` (`bits` wide) over the keys that agree with the prefix on
// the higher bits; the last block to finish picks the digit.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS) radix_pass(const u64* keys, int n, u64* state, int shift, int bits, u32* hist) {
    __shared__ u32 local[BINS];
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) local[b] = 0;
    __syncthreads();
    u64 prefix = state[ST_PREFIX];
    u64 high_mask = shift + bits >= 64 ? 0ull : (~0ull << (shift + bits));
    u32 digit_mask = (1u << bits) - 1u;
    for (u32 c = blockIdx.x * blockDim.x + threadIdx.x; c < (u32)n; c += gridDim.x * blockDim.x) {
        u64 key = keys[c];
        if ((key & high_mask) == prefix) atomicAdd(&local[(key >> shift) & digit_mask], 1u);
    }
    flush_hist(local, hist);
    if (!last_block_done(state)) return;
    select_digit(state, hist, shift, __ldcg(&state[ST_RANK]));
}

// src/cpu/sampling.rs score_key_high: orders like the score, NaN as -inf, -0 as +0 (a GEMM or
// fmaxf may give a zero either sign on either device), below POSITIVE_KEY.
__device__ __forceinline__ u32 score_key_high(float score) {
    float s = score != score ? -INFINITY : (score == 0.0f ? 0.0f : score);  // NaN as -inf
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

// --- compaction in class order. After the high-word passes, H = state[0] >> 32 and
// r = state[1]: class c is selected if its high word is above H, or equal to H and fewer than r
// such ties come before it. Per block: (ties << 32) | above.


// Exclusive scan of the packed block counts in place; the number selected to state[4]. Run by
// the last block of the kernel that made the counts (1024 threads), tiles of 1024 counts with a
// running offset.
__device__ void scan_block_counts(u64* counts, int blocks, u64* state) {
    __shared__ u64 warp_totals[WARP];
    __shared__ u64 carry;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int base = 0; base < blocks; base += blockDim.x) {
        int b = base + threadIdx.x;
        u64 v = b < blocks ? __ldcg(&counts[b]) : 0;  // other blocks' counts
        u64 incl = v;  // inclusive scan within the warp
        for (int o = 1; o < WARP; o <<= 1) {
            u64 n = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += n;
        }
        if (lane == WARP - 1) warp_totals[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            u64 w = warp_totals[lane];
            for (int o = 1; o < WARP; o <<= 1) {
                u64 n = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= o) w += n;
            }
            warp_totals[lane] = w;  // inclusive over warps
        }
        __syncthreads();
        u64 before = carry + (warp > 0 ? warp_totals[warp - 1] : 0) + incl - v;
        if (b < blocks) counts[b] = before;
        __syncthreads();
        if (threadIdx.x == 0) carry += warp_totals[WARP - 1];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        u64 r = state[ST_RANK], ties = carry >> 32;
        state[ST_SELECTED] = (carry & 0xFFFFFFFFull) + (ties < r ? ties : r);
        state[ST_POSITIVES] = 0;  // ready for the next call (see the header)
    }
}

// --- the plain sampler's last two digits, from the keys of the first digit's bin (header, 4).

// By the last block of collect_candidates (SELECT_THREADS threads): the second and third digits
// of the high word, each from a histogram of the candidates that agree with the prefix (what
// radix_pass would count over all keys), picked by select_digit; then each candidate above H or
// tied with it is added to its block's count. On an overflowed list, the same over all keys
// (those of the first bin).
__device__ void select_candidates(const u64* keys, int n, u64* state, u32* hist,
                                  const u64* candidates, int capacity, u64* block_counts) {
    u64 count = __ldcg(&state[ST_CANDIDATES]);
    bool overflow = count > (u64)capacity;
    const u64* src = overflow ? keys : candidates;
    u64 len = overflow ? (u64)n : count;
    for (int d = 0; d < 2; d++) {
        int shift = d == 0 ? 42 : 32, bits = d == 0 ? 11 : 10;
        u64 prefix = __ldcg(&state[ST_PREFIX]);
        u64 rank = __ldcg(&state[ST_RANK]);
        u64 high_mask = ~0ull << (shift + bits);
        u32 digit_mask = (1u << bits) - 1u;
        for (u64 j = threadIdx.x; j < len; j += blockDim.x) {
            u64 key = __ldcg(&src[j]);  // other blocks' appends
            if ((key & high_mask) == prefix) atomicAdd(&hist[(key >> shift) & digit_mask], 1u);
        }
        __syncthreads();
        select_digit(state, hist, shift, rank);
        __syncthreads();  // thread 0's new prefix and rank, and the cleared histogram
    }
    u64 prefix = __ldcg(&state[ST_PREFIX]);
    u32 h = (u32)(prefix >> 32), digit = (u32)(prefix >> 53);
    for (u64 j = threadIdx.x; j < len; j += blockDim.x) {
        u64 key = __ldcg(&src[j]);
        u32 kh = (u32)(key >> 32);
        if ((kh >> 21) != digit || kh < h) continue;
        u32 cls = 0xFFFFFFFFu - (u32)key;
        atomicAdd(&block_counts[cls / SCAN_BLOCK], kh > h ? 1ull : (1ull << 32));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        state[ST_LAST_CANDIDATES] = count;
        state[ST_CANDIDATES] = 0;  // ready for the next call
    }
}

// One block per SCAN_BLOCK classes: the keys of the chosen first-digit bin appended to
// `candidates` (up to `capacity`; state[5] counts them all), and per block the number of keys
// in higher bins, which are all selected, as the block's count (ties 0 so far).
extern "C" __global__ void __launch_bounds__(SCAN_BLOCK) collect_candidates(const u64* keys, int n, u64* state, u64* block_counts,
                                             u64* candidates, int capacity, u32* hist) {
    int c = blockIdx.x * SCAN_BLOCK + threadIdx.x;
    u32 digit = (u32)(state[ST_PREFIX] >> 53);
    bool live = c < n;
    u64 key = live ? keys[c] : 0;
    u32 top = (u32)(key >> 53);
    int above = __syncthreads_count(live && top > digit);
    bool candidate = live && top == digit;
    int lane = threadIdx.x % WARP;
    u32 ballot = __ballot_sync(0xffffffffu, candidate);
    u64 base = 0;
    if (lane == 0 && ballot) base = atomicAdd(&state[ST_CANDIDATES], (u64)__popc(ballot));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (candidate) {
        u64 at = base + (u64)__popc(ballot & ((1u << lane) - 1u));
        if (at < (u64)capacity) candidates[at] = key;
    }
    if (threadIdx.x == 0) block_counts[blockIdx.x] = (u64)above;
    if (!last_block_done(state)) return;
    select_candidates(keys, n, state, hist, candidates, capacity, block_counts);
    __syncthreads();
    scan_block_counts(block_counts, gridDim.x, state);
}

// The hard-negative path's per-block counts over all keys; its last block scans them.
extern "C" __global__ void __launch_bounds__(SCAN_BLOCK) count_selected(const u64* keys, int n, u64* state, u64* block_counts) {
    int c = blockIdx.x * SCAN_BLOCK + threadIdx.x;
    u32 h = (u32)(state[ST_PREFIX] >> 32);
    u32 kh = c < n ? (u32)(keys[c] >> 32) : 0;
    bool live = c < n;
    int above = __syncthreads_count(live && kh > h);
    int ties = __syncthreads_count(live && kh == h);
    if (threadIdx.x == 0) block_counts[blockIdx.x] = ((u64)ties << 32) | (u64)above;
    if (!last_block_done(state)) return;
    scan_block_counts(block_counts, gridDim.x, state);
}


// Label -> position in the sorted sample (every positive is in it). The count comes from
// state[4]; on an overflow of `sampled` the labels are left untouched and the host reports an
// error. Plain loads of `sampled`: it is read only after it was written (a kernel boundary, or
// the last-block fence in a block that never read it before), and L1 keeps the search's top.
__device__ __forceinline__ void remap_label(int* labels, int i, const int* sampled, int count) {
    int l = labels[i];
    if (l < 0) return;
    int lo = 0, hi = count;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (sampled[mid] < l) lo = mid + 1; else hi = mid;
    }
    labels[i] = (lo < count && sampled[lo] == l) ? lo : -1;
}

// Rows that compact_selected's last block remaps itself: up to two searches per thread; more
// rows go to remap_labels over a grid (one block doing 64k latency-bound searches would idle the
// device for hundreds of microseconds).
#define REMAP_IN_LAST_BLOCK 2048

extern "C" __global__ void remap_labels(int* labels, int rows, const int* sampled, const u64* state,
                                        int capacity) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    u64 selected = state[ST_SELECTED];
    if (i >= rows || selected > (u64)capacity) return;
    remap_label(labels, i, sampled, (int)selected);
}

// Writes each selected class at its place in class order; with up to REMAP_IN_LAST_BLOCK rows the
// last block remaps the labels.
extern "C" __global__ void __launch_bounds__(SCAN_BLOCK) compact_selected(const u64* keys, int n, u64* state,
                                            const u64* block_offsets, int* sampled, int capacity,
                                            int* labels, int rows) {
    __shared__ u32 warp_above[WARP], warp_ties[WARP];
    int c = blockIdx.x * SCAN_BLOCK + threadIdx.x;
    u32 h = (u32)(state[ST_PREFIX] >> 32);
    u64 r = state[ST_RANK];
    u32 kh = c < n ? (u32)(keys[c] >> 32) : 0;
    bool above = c < n && kh > h, tie = c < n && kh == h;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    u32 ba = __ballot_sync(0xffffffffu, above), bt = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) { warp_above[warp] = __popc(ba); warp_ties[warp] = __popc(bt); }
    __syncthreads();
    u64 off = block_offsets[blockIdx.x];
    u64 a = off & 0xFFFFFFFFull, t = off >> 32;
    for (int w = 0; w < warp; w++) { a += warp_above[w]; t += warp_ties[w]; }
    u32 below = (1u << lane) - 1u;
    a += __popc(ba & below);
    t += __popc(bt & below);
    bool take = above || (tie && t < r);
    u64 at = a + (t < r ? t : r);
    if (take && at < (u64)capacity) sampled[at] = c;
    if (rows > REMAP_IN_LAST_BLOCK || !last_block_done(state)) return;
    u64 selected = __ldcg(&state[ST_SELECTED]);
    if (selected > (u64)capacity) return;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) remap_label(labels, i, sampled, (int)selected);
}


