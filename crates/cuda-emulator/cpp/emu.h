// The CUDA C++ dialect of cuda/*.cu as plain C++: included before each kernel family when the
// emulator builds it with the host compiler (PFC_EMULATOR is defined). Every GPU thread of a
// block is a fiber on one OS thread (fiber.cpp); barriers and warp collectives switch fibers.
// Shared memory is a function-local `static thread_local`: one copy per OS thread, and an OS
// thread runs one block at a time, so the threads of a block share it as on the GPU.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "half.h"

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) int2 { int x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

namespace emu {

// What the running fiber sees: its own index and its block's geometry.
struct ThreadView {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
};
extern thread_local const ThreadView* current;

// Block barrier: every live thread of the block arrives; returns the number of non-zero `pred`.
int block_barrier(int pred);

// The warp collectives, evaluated when every lane of `mask` has arrived.
enum WarpOp { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, SYNC };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int param, int width);

template <class T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace emu

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::current->block_idx)
#define blockDim (emu::current->block_dim)
#define gridDim (emu::current->grid_dim)
#define warpSize 32

#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __constant__ static const

// Shared memory starts as garbage on a GPU: build.rs follows every __shared__ declaration with
// this, which fills the variable with all-ones bytes the first time a thread of a block gets there.
namespace emu {
void poison_shared(void* p, size_t bytes);
}
#define EMU_POISON_SHARED(v) emu::poison_shared(&(v), sizeof(v))

inline void __syncthreads() { emu::block_barrier(0); }
inline int __syncthreads_count(int pred) { return emu::block_barrier(pred != 0); }
inline int __syncthreads_or(int pred) { return emu::block_barrier(pred != 0) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_collective(emu::SYNC, mask, 0, 0, 32); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::from_bits<T>(emu::warp_collective(emu::SHFL_IDX, mask, emu::to_bits(v), src, width));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::from_bits<T>(emu::warp_collective(emu::SHFL_UP, mask, emu::to_bits(v), (int)delta, width));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::from_bits<T>(emu::warp_collective(emu::SHFL_DOWN, mask, emu::to_bits(v), (int)delta, width));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::from_bits<T>(emu::warp_collective(emu::SHFL_XOR, mask, emu::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)emu::warp_collective(emu::BALLOT, mask, pred != 0, 0, 32);
}

// Bit casts and integer intrinsics.
inline unsigned __float_as_uint(float v) { return emu::from_bits<unsigned>(emu::to_bits(v)); }
inline float __uint_as_float(unsigned v) { return emu::from_bits<float>(v); }
inline int __float_as_int(float v) { return emu::from_bits<int>(emu::to_bits(v)); }
inline float __int_as_float(int v) { return emu::from_bits<float>((uint64_t)(unsigned)v); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int __clzll(unsigned long long v) { return v ? __builtin_clzll(v) : 64; }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldg(const T* p) { return *p; }

// Fast-math intrinsics: the accurate functions (the GPU's are within a few ulp of them).
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
// Round-to-nearest arithmetic that the GPU compiler may not contract into an FMA.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

// CUDA's min/max accept mixed integer and float arguments; on floats they are fmaxf/fminf
// (a NaN operand loses).
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) {
    using R = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<R>) return std::fmax((R)a, (R)b);
    else return a > b ? a : b;
}
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) {
    using R = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<R>) return std::fmin((R)a, (R)b);
    else return a < b ? a : b;
}

// Atomics: the threads of a launch run on one OS thread, so a read-modify-write is atomic.
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T> inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <class T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <class T> inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
template <class T> inline T atomicOr(T* p, T v) { T old = *p; *p = old | v; return old; }
template <class T> inline T atomicAnd(T* p, T v) { T old = *p; *p = old & v; return old; }

// f16 conversions of common.cuh (the GPU's cvt instructions).
inline float emu_f16_bits_to_f32(unsigned short b) { return emu_half::f16_to_f32(b); }
inline unsigned short emu_f32_to_f16_bits_rn(float v) { return emu_half::f32_to_f16(v); }

// Registration of the kernels of a family (EMU_KERNEL lines are generated by build.rs).
namespace emu {
using Thunk = void (*)(void* fn, void** args);
void register_kernel(const char* name, void* fn, Thunk thunk);

template <class... A, size_t... I>
inline void call_with(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <class... A> inline void thunk(void* fn, void** args) {
    call_with(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
}
template <class... A> inline Thunk thunk_of(void (*)(A...)) { return &thunk<A...>; }
struct Registrar {
    Registrar(const char* name, void* fn, Thunk t) { register_kernel(name, fn, t); }
};
}  // namespace emu
#define EMU_KERNEL(name) \
    static emu::Registrar emu_registrar_##name(#name, reinterpret_cast<void*>(&name), emu::thunk_of(&name));
