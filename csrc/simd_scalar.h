// Portable vector policy for the kernels in lse.h: 4 fp32 lanes as a plain array, every operation a fixed-length
// loop that the compiler vectorises for the baseline ISA (SSE2 on x86-64, ASIMD on aarch64). No libm call per
// element: fma is a multiply-add (contracted where the baseline has FMA), exp is the polynomial of vexp.h with
// the 2^n scale built in the exponent bits. Any C++17 compiler, any CPU; the tests run this path too.
#pragma once
#include <cstdint>
#include <cstring>

#include "half.h"
#include "vexp.h"

namespace mmcl { namespace MMCL_ISA {
struct VecScalar {
    static constexpr int lanes = 4;
    struct type { float v[lanes]; };
    static constexpr const char* name = "scalar";
    // 4 lanes = one 128-bit register of the baseline (SSE2 / ASIMD): a 6 x 2-vector accumulator tile (12 of 16 xmm),
    // measured 3-4x faster on SSE2 than 8-lane arrays (which the compiler splits and spills).
    static constexpr int MR = 6, NRV = 2, MC = 96, NC = 192;
    static constexpr bool has_bf16_dot = false;
    static constexpr bool has_amx = false;
    template <int MR_, int NRV_>
    static inline void bf16_dot_kernel(int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t) {}

    static inline type zero() { return set1(0.0f); }
    static inline type set1(float s) { type r; for (int i = 0; i < lanes; ++i) r.v[i] = s; return r; }
    static inline type load(const float* p) { type r; std::memcpy(r.v, p, sizeof(r.v)); return r; }
    static inline void store(float* p, const type& a) { std::memcpy(p, a.v, sizeof(a.v)); }
    static inline type fma(const type& a, const type& b, const type& c) {
        type r; for (int i = 0; i < lanes; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r;
    }
    static inline type add(const type& a, const type& b) { type r; for (int i = 0; i < lanes; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
    static inline type sub(const type& a, const type& b) { type r; for (int i = 0; i < lanes; ++i) r.v[i] = a.v[i] - b.v[i]; return r; }
    static inline type mul(const type& a, const type& b) { type r; for (int i = 0; i < lanes; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
    static inline type div(const type& a, const type& b) { type r; for (int i = 0; i < lanes; ++i) r.v[i] = a.v[i] / b.v[i]; return r; }
    // u >= 0 ? a : b, lane by lane
    static inline type select_nonneg(const type& u, const type& a, const type& b) {
        type r; for (int i = 0; i < lanes; ++i) r.v[i] = u.v[i] >= 0.0f ? a.v[i] : b.v[i]; return r;
    }
    // Same NaN rule as the x86 policies: the second operand wins when either is NaN.
    static inline type max(const type& a, const type& b) {
        type r; for (int i = 0; i < lanes; ++i) r.v[i] = (a.v[i] > b.v[i]) ? a.v[i] : b.v[i]; return r;
    }
    static inline type add_at_lane(type v, int lane, float value) { v.v[lane] += value; return v; }
    static inline type add_where_equal(type v, const type& key, const type& probe, const type& value) {
        for (int i = 0; i < lanes; ++i) v.v[i] += key.v[i] == probe.v[i] ? value.v[i] : 0.0f;
        return v;
    }
    static inline float reduce_add(const type& a) { float s = 0.0f; for (int i = 0; i < lanes; ++i) s += a.v[i]; return s; }
    static inline float reduce_max(const type& a) {
        float m = a.v[0]; for (int i = 1; i < lanes; ++i) m = (m > a.v[i]) ? m : a.v[i]; return m;
    }

    // exp(x) (vexp.h). Rounding to the nearest integer by the 1.5 * 2^23 trick leaves n in the low mantissa bits
    // of t, so 2^n is built with integer operations only (no float-to-int conversion of a possible NaN).
    static inline type exp(const type& x) {
        constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23
        uint32_t magic_bits; std::memcpy(&magic_bits, &round_magic, 4);
        type xc, n, pow2n;
        for (int i = 0; i < lanes; ++i) {
            float v = x.v[i] < kExpMin ? kExpMin : x.v[i];  // NaN compares false and stays NaN
            v = v > kExpMax ? kExpMax : v;
            const float t = v * kLog2e + round_magic;
            uint32_t t_bits; std::memcpy(&t_bits, &t, 4);
            const uint32_t scale_bits = (t_bits - magic_bits + 127u) << 23;
            std::memcpy(&pow2n.v[i], &scale_bits, 4);
            xc.v[i] = v;
            n.v[i] = t - round_magic;
        }
        const type p = exp_reduced<VecScalar>(exp_remainder<VecScalar>(xc, n));
        type r;
        for (int i = 0; i < lanes; ++i) r.v[i] = x.v[i] < kExpMin ? 0.0f : p.v[i] * pow2n.v[i];
        return r;
    }

    static inline void bf16_to_f32(const uint16_t* src, float* dst) {
        for (int i = 0; i < lanes; ++i) dst[i] = bf16_bits_to_float(src[i]);
    }
    static inline void f16_to_f32(const uint16_t* src, float* dst) {
        for (int i = 0; i < lanes; ++i) dst[i] = f16_bits_to_float(src[i]);
    }
};
}  // namespace MMCL_ISA
}  // namespace mmcl
