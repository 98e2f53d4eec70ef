// Portable vector policy for the kernels in lse.h: 16 fp32 lanes as a plain array. Any C++17 compiler, any
// CPU; the compiler may auto-vectorise the lane loops for the baseline ISA. The tests run this path too.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>

#include "half.h"

namespace mmcl { namespace MMCL_ISA {
struct VecScalar {
    struct type { float v[16]; };
    static constexpr const char* name = "scalar";
    static constexpr bool has_bf16_dot = false;
    template <int MR_, int NRV_>
    static inline void bf16_dot_kernel(int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t) {}

    static inline type zero() { type r; for (int i = 0; i < 16; ++i) r.v[i] = 0.0f; return r; }
    static inline type set1(float s) { type r; for (int i = 0; i < 16; ++i) r.v[i] = s; return r; }
    static inline type load(const float* p) { type r; std::memcpy(r.v, p, sizeof(r.v)); return r; }
    static inline void store(float* p, const type& a) { std::memcpy(p, a.v, sizeof(a.v)); }
    static inline type fma(const type& a, const type& b, const type& c) {
        type r; for (int i = 0; i < 16; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return r;
    }
    static inline type add(const type& a, const type& b) { type r; for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
    static inline type sub(const type& a, const type& b) { type r; for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] - b.v[i]; return r; }
    static inline type mul(const type& a, const type& b) { type r; for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
    // Same NaN rule as the AVX-512 policy: the second operand wins when either is NaN.
    static inline type max(const type& a, const type& b) {
        type r; for (int i = 0; i < 16; ++i) r.v[i] = (a.v[i] > b.v[i]) ? a.v[i] : b.v[i]; return r;
    }
    static inline type add_at_lane(type v, int lane, float value) { v.v[lane] += value; return v; }
    static inline type add_where_equal(type v, const type& key, const type& probe, const type& value) {
        for (int i = 0; i < 16; ++i) if (key.v[i] == probe.v[i]) v.v[i] += value.v[i];
        return v;
    }
    static inline float reduce_add(const type& a) { float s = 0.0f; for (int i = 0; i < 16; ++i) s += a.v[i]; return s; }
    static inline float reduce_max(const type& a) {
        float m = a.v[0]; for (int i = 1; i < 16; ++i) m = (m > a.v[i]) ? m : a.v[i]; return m;
    }
    static inline type exp(const type& a) { type r; for (int i = 0; i < 16; ++i) r.v[i] = std::exp(a.v[i]); return r; }

    static inline void bf16_to_f32(const uint16_t* src, float* dst) { for (int i = 0; i < 16; ++i) dst[i] = bf16_bits_to_float(src[i]); }
    static inline void f16_to_f32(const uint16_t* src, float* dst) { for (int i = 0; i < 16; ++i) dst[i] = f16_bits_to_float(src[i]); }
};
}  // namespace MMCL_ISA
}  // namespace mmcl
