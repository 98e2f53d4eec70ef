// bf16 / fp16 <-> fp32 bit conversions (round to nearest even), shared by both ISA builds.
#pragma once
#include <cstdint>
#include <cstring>

static inline float bits_to_float(uint32_t bits) { float f; std::memcpy(&f, &bits, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

static inline float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

static inline uint16_t float_to_bf16_bits(float f) {
    uint32_t b = float_to_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);  // quiet NaN
    b += 0x7fffu + ((b >> 16) & 1u);
    return static_cast<uint16_t>(b >> 16);
}

static inline float f16_bits_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));      // inf / NaN
    if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));  // normal
    if (mant == 0) return bits_to_float(sign);                                       // +-0
    int e = -1;                                                                       // subnormal: normalise
    do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
    return bits_to_float(sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13));
}

static inline uint16_t float_to_f16_bits(float f) {
    const uint32_t b = float_to_bits(f);
    const uint32_t sign = (b >> 16) & 0x8000u;
    const uint32_t abs = b & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);             // NaN
    if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);            // overflow -> inf
    if (abs >= 0x38800000u) {                                                         // normal half
        uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
        return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
    }
    // subnormal half (or zero): value = abs_float * 2^24 rounded to an integer mantissa
    const int shift = 126 - static_cast<int>(abs >> 23);  // 14 for the largest subnormal exponent
    if (shift > 24) return static_cast<uint16_t>(sign);
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | r);
}
