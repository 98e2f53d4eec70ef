// AVX-512 vector policy for the kernels in lse.h: 16 fp32 lanes in one zmm register.
// Only included by core_avx512.cpp, which is compiled with -mavx512f and friends and entered only after a
// run-time CPU check.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

#include "vexp.h"
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "amx.h"
#endif

namespace mmcl { namespace MMCL_ISA {
struct VecAvx512 {
    using type = __m512;
    // 32 zmm registers: a 6 x 4-vector (6 x 64) accumulator tile (24) + 4 B vectors + 1 broadcast.
    static constexpr int lanes = 16, MR = 6, NRV = 4, MC = 96, NC = 192;
#ifdef __AVX512BF16__
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    // bf16 inputs run all three GEMMs on AMX tiles (amx.h); fp32 / fp16 inputs take the AVX-512 fp32 path.
    static constexpr const char* name = "amx-bf16";
    static constexpr bool has_amx = true;
    using Amx = mmcl::MMCL_ISA::Amx;
#else
    static constexpr const char* name = "avx512-bf16";
    static constexpr bool has_amx = false;
#endif
    static constexpr bool has_bf16_dot = true;

    // C[r, 0:16*NRV] = sum_kp A(r, kp) . B(kp, :) over bf16 pairs with vdpbf16ps (exact products, fp32 sums).
    // A: rows of bf16 at stride a_rs (pairs read as one 32-bit broadcast); B: panel of kpairs x (16*NRV) pairs.
    template <int MR_, int NRV_>
    static inline void bf16_dot_kernel(int64_t kpairs, const uint16_t* a, int64_t a_rs, const uint16_t* b,
                                       float* c, int64_t c_rs) {
        __m512 acc[MR_][NRV_];
        for (int r = 0; r < MR_; ++r)
            for (int v = 0; v < NRV_; ++v) acc[r][v] = _mm512_setzero_ps();
        for (int64_t kp = 0; kp < kpairs; ++kp) {
            __m512bh bv[NRV_];
            for (int v = 0; v < NRV_; ++v)
                bv[v] = (__m512bh)_mm512_loadu_si512(b + kp * 32 * NRV_ + 32 * v);
            for (int r = 0; r < MR_; ++r) {
                int32_t pair;
                std::memcpy(&pair, a + r * a_rs + 2 * kp, sizeof(pair));
                const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                for (int v = 0; v < NRV_; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
            }
        }
        for (int r = 0; r < MR_; ++r)
            for (int v = 0; v < NRV_; ++v) _mm512_storeu_ps(c + r * c_rs + 16 * v, acc[r][v]);
    }
#else
    static constexpr const char* name = "avx512";
    static constexpr bool has_bf16_dot = false;
    static constexpr bool has_amx = false;
    template <int MR_, int NRV_>
    static inline void bf16_dot_kernel(int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t) {}
#endif

    static inline type zero() { return _mm512_setzero_ps(); }
    static inline type set1(float v) { return _mm512_set1_ps(v); }
    static inline type load(const float* p) { return _mm512_loadu_ps(p); }
    static inline void store(float* p, type v) { _mm512_storeu_ps(p, v); }
    static inline type fma(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
    static inline type add(type a, type b) { return _mm512_add_ps(a, b); }
    static inline type sub(type a, type b) { return _mm512_sub_ps(a, b); }
    static inline type mul(type a, type b) { return _mm512_mul_ps(a, b); }
    static inline type div(type a, type b) { return _mm512_div_ps(a, b); }
    // u >= 0 ? a : b, lane by lane
    static inline type select_nonneg(type u, type a, type b) {
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
    }
    // max(a, b) returns b when either is NaN: callers put the value that may be NaN second.
    static inline type max(type a, type b) { return _mm512_max_ps(a, b); }
    static inline type add_at_lane(type v, int lane, float value) {
        return _mm512_mask_add_ps(v, static_cast<__mmask16>(1u << lane), v, _mm512_set1_ps(value));
    }
    // v + (key == probe ? value : 0), lane by lane
    static inline type add_where_equal(type v, type key, type probe, type value) {
        return _mm512_mask_add_ps(v, _mm512_cmp_ps_mask(key, probe, _CMP_EQ_OQ), v, value);
    }
    static inline float reduce_add(type v) { return _mm512_reduce_add_ps(v); }
    static inline float reduce_max(type v) { return _mm512_reduce_max_ps(v); }

    // exp(x) (vexp.h); inputs below -104 flush to 0 (exp(-104) is below the smallest fp32 denormal), NaN propagates.
    static inline type exp(type x) {
        x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
        x = _mm512_min_ps(_mm512_set1_ps(88.72f), x);
        const type n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm512_scalef_ps(exp_reduced<VecAvx512>(exp_remainder<VecAvx512>(x, n)), n);
    }

    // 16 half-precision values -> fp32.
    static inline void bf16_to_f32(const uint16_t* src, float* dst) {
        __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
        _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
    }
    static inline void f16_to_f32(const uint16_t* src, float* dst) {
        _mm512_storeu_ps(dst, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
    }
};
}  // namespace MMCL_ISA
}  // namespace mmcl
