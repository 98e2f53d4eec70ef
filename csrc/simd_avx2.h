// AVX2 + FMA (+ F16C) vector policy for the kernels in lse.h: 8 fp32 lanes in one ymm register (x86-64-v3).
// Only included by core_avx2.cpp, which is compiled with -mavx2 -mfma -mf16c and entered only after a run-time
// CPU check.
#pragma once
#include <immintrin.h>
#include <cstdint>

#include "vexp.h"

namespace mmcl { namespace MMCL_ISA {
struct VecAvx2 {
    using type = __m256;
    static constexpr const char* name = "avx2";
    // 16 ymm registers: a 6 x 2-vector (6 x 16) accumulator tile (12) + 2 B vectors + 1 broadcast, as in the
    // classic Haswell SGEMM kernels; a wider tile would spill. Blocks: 96 x 288 tiles, re-measured on Zen 3 at
    // N = 8192, D = 512 once fp32 row blocks were read in place and the fused sigmoid sweep existed (of 96/144/192 x
    // 96/192/288/384: the sigmoid sweep 110 -> 131 GFLOP/s against 192 x 96, the CLIP fwd+bwd 123 -> 127-141).
    static constexpr int lanes = 8, MR = 6, NRV = 2, MC = 96, NC = 288;
    static constexpr bool has_bf16_dot = false;
    static constexpr bool has_amx = false;
    template <int MR_, int NRV_>
    static inline void bf16_dot_kernel(int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t) {}

    static inline type zero() { return _mm256_setzero_ps(); }
    static inline type set1(float v) { return _mm256_set1_ps(v); }
    static inline type load(const float* p) { return _mm256_loadu_ps(p); }
    static inline void store(float* p, type v) { _mm256_storeu_ps(p, v); }
    static inline type fma(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
    static inline type add(type a, type b) { return _mm256_add_ps(a, b); }
    static inline type sub(type a, type b) { return _mm256_sub_ps(a, b); }
    static inline type mul(type a, type b) { return _mm256_mul_ps(a, b); }
    static inline type div(type a, type b) { return _mm256_div_ps(a, b); }
    // u >= 0 ? a : b, lane by lane
    static inline type select_nonneg(type u, type a, type b) {
        return _mm256_blendv_ps(b, a, _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_GE_OQ));
    }
    // max(a, b) returns b when either is NaN: callers put the value that may be NaN second.
    static inline type max(type a, type b) { return _mm256_max_ps(a, b); }
    static inline type add_at_lane(type v, int lane, float value) {
        const __m256i hit = _mm256_cmpeq_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(lane));
        return _mm256_add_ps(v, _mm256_and_ps(_mm256_castsi256_ps(hit), _mm256_set1_ps(value)));
    }
    // v + (key == probe ? value : 0), lane by lane
    static inline type add_where_equal(type v, type key, type probe, type value) {
        return _mm256_add_ps(v, _mm256_and_ps(_mm256_cmp_ps(key, probe, _CMP_EQ_OQ), value));
    }
    static inline float reduce_add(type v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static inline float reduce_max(type v) {
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
    }

    // exp(x) (vexp.h), 2^n built in the exponent bits; x < kExpMin gives 0, NaN propagates (NaN converts to
    // 0x80000000, whose 2^n is 1.0, and the polynomial is NaN).
    static inline type exp(type x) {
        const type lo = _mm256_set1_ps(kExpMin);
        const type xc = _mm256_min_ps(_mm256_set1_ps(kExpMax), _mm256_max_ps(lo, x));
        const type n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i pow2n =
            _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        const type e = _mm256_mul_ps(exp_reduced<VecAvx2>(exp_remainder<VecAvx2>(xc, n)), _mm256_castsi256_ps(pow2n));
        return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), e);
    }

    // 8 half-precision values -> fp32 (bf16: a 16-bit shift; fp16: F16C).
    static inline void bf16_to_f32(const uint16_t* src, float* dst) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        _mm256_storeu_ps(dst, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
    static inline void f16_to_f32(const uint16_t* src, float* dst) {
        _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
    }
};
}  // namespace MMCL_ISA
}  // namespace mmcl
