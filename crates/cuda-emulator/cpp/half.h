// 16-bit floats as bit patterns, for the emulated libraries: f16 through the host compiler's
// _Float16 (round to nearest even, as the GPU's cvt.rn), bf16 as the high half of an f32 rounded
// to nearest even with a NaN kept quiet (the `half` crate's rule, and common.cuh's).
#pragma once
#include <cstdint>
#include <cstring>

namespace emu_half {

inline float f16_to_f32(uint16_t b) {
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return (float)h;
}

inline uint16_t f32_to_f16(float v) {
    _Float16 h = (_Float16)v;
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
}

inline float bf16_to_f32(uint16_t b) {
    uint32_t w = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
}

inline uint16_t f32_to_bf16(float v) {
    uint32_t w;
    std::memcpy(&w, &v, 4);
    if ((w & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((w >> 16) | 0x0040u);
    w += 0x7fffu + ((w >> 16) & 1u);
    return (uint16_t)(w >> 16);
}

}  // namespace emu_half
