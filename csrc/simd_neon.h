// aarch64 Advanced SIMD (NEON) vector policy for the kernels in lse.h: 4 fp32 lanes in one 128-bit register.
// ASIMD is part of the aarch64 baseline, so this build needs no extra compiler flags; it is compiled only for
// aarch64 targets (core_neon.cpp).
#pragma once
#include <arm_neon.h>
#include <cstdint>

#include "vexp.h"

namespace mmcl { namespace MMCL_ISA {
struct VecNeon {
    using type = float32x4_t;
    static constexpr const char* name = "neon";
    // 32 vector registers: an 8 x 3-vector (8 x 12) accumulator tile (24) + 3 B vectors + 1 broadcast.
    static constexpr int lanes = 4, MR = 8, NRV = 3, MC = 96, NC = 192;
    static constexpr bool has_bf16_dot = false;
    static constexpr bool has_amx = false;
    template <int MR_, int NRV_>
    static inline void bf16_dot_kernel(int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t) {}

    static inline type zero() { return vdupq_n_f32(0.0f); }
    static inline type set1(float v) { return vdupq_n_f32(v); }
    static inline type load(const float* p) { return vld1q_f32(p); }
    static inline void store(float* p, type v) { vst1q_f32(p, v); }
    static inline type fma(type a, type b, type c) { return vfmaq_f32(c, a, b); }
    static inline type add(type a, type b) { return vaddq_f32(a, b); }
    static inline type sub(type a, type b) { return vsubq_f32(a, b); }
    static inline type mul(type a, type b) { return vmulq_f32(a, b); }
    static inline type div(type a, type b) { return vdivq_f32(a, b); }
    // u >= 0 ? a : b, lane by lane
    static inline type select_nonneg(type u, type a, type b) { return vbslq_f32(vcgeq_f32(u, vdupq_n_f32(0.0f)), a, b); }
    // FMAX propagates a NaN from either operand (the other policies' contract is weaker: NaN from b).
    static inline type max(type a, type b) { return vmaxq_f32(a, b); }
    static inline type add_at_lane(type v, int lane, float value) {
        const uint32x4_t hit = vceqq_u32(uint32x4_t{0, 1, 2, 3}, vdupq_n_u32(static_cast<uint32_t>(lane)));
        return vaddq_f32(v, vreinterpretq_f32_u32(vandq_u32(hit, vreinterpretq_u32_f32(vdupq_n_f32(value)))));
    }
    // v + (key == probe ? value : 0), lane by lane
    static inline type add_where_equal(type v, type key, type probe, type value) {
        return vaddq_f32(v, vreinterpretq_f32_u32(vandq_u32(vceqq_f32(key, probe), vreinterpretq_u32_f32(value))));
    }
    static inline float reduce_add(type v) { return vaddvq_f32(v); }
    static inline float reduce_max(type v) { return vmaxvq_f32(v); }

    // exp(x) (vexp.h), 2^n built in the exponent bits; x < kExpMin gives 0, NaN propagates.
    static inline type exp(type x) {
        const type lo = vdupq_n_f32(kExpMin);
        const type xc = vminq_f32(vdupq_n_f32(kExpMax), vmaxq_f32(lo, x));
        const type n = vrndnq_f32(vmulq_f32(xc, vdupq_n_f32(kLog2e)));
        const int32x4_t pow2n = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
        const type e = vmulq_f32(exp_reduced<VecNeon>(exp_remainder<VecNeon>(xc, n)), vreinterpretq_f32_s32(pow2n));
        return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(e), vcltq_f32(x, lo)));
    }

    // 4 half-precision values -> fp32 (bf16: a widening 16-bit shift; fp16: FCVTL).
    static inline void bf16_to_f32(const uint16_t* src, float* dst) {
        vst1q_f32(dst, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(src), 16)));
    }
    static inline void f16_to_f32(const uint16_t* src, float* dst) {
        vst1q_f32(dst, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src))));
    }
};
}  // namespace MMCL_ISA
}  // namespace mmcl
