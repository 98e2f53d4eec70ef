// AMX (Intel Advanced Matrix Extensions, AMX-TILE + AMX-BF16) building blocks of the tile sweep for bf16 inputs.
// Only included by the amx-bf16 build (core_amx.cpp, compiled with -mamx-tile -mamx-bf16), entered only after
// isa.cpp has checked the CPU and obtained the kernel's permission to use the tile registers.
//
// TDPBF16PS multiplies a 16 x 32 bf16 tile A by a 32 x 16 bf16 tile B held in "VNNI" order (16 rows of 16 bf16
// pairs: B[k][n] at row k / 2, element 2 n + k % 2) into a 16 x 16 fp32 tile C: products of bf16 values are exact
// and sums are fp32, as in the vdpbf16ps and fp32 paths.
//
// The three GEMMs of a tile:
//   S   = X_I Y_J^T           A = X rows (bf16 as given),  B = Y^T in VNNI order (packed once per column block)
//   dX += G Y_J               A = G,                       B = Y rows in VNNI pairs (once per column block)
//   dY += G^T X_I             A = G^T,                     B = X rows in VNNI pairs (once per row block)
// G (fp32 gradient weights) is split as G = G_hi + G_lo with both parts bf16 (G_hi = bf16(G), G_lo =
// bf16(G - G_hi)): 16 significant bits, a relative error below 2^-16 per weight, far under the single bf16
// rounding of the output that the bf16 gradients get anyway; each gradient GEMM runs on both parts (2 passes).
// Per tile that is 5 GEMM passes of 16 x 16 x 32 tiles against 3 fp32 GEMMs on AVX-512, at ~16x the throughput.
//
// Register use: C tiles 0-3 (a 32 x 32 fp32 block), A tiles 4-5 (two 16-row slices), B tiles 6-7 (two 16-column
// panels); every tile is configured as 16 rows x 64 bytes. Operands are zero-padded to whole tiles (rows and K to
// 32, columns to 32), so no tile is ever partial.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace mmcl {
namespace MMCL_ISA {

// The AMX pieces of the sweep, as static members of one type that the AVX-512 policy of the amx-bf16 build names
// (VecAvx512::Amx): TileSweep calls them as V::Amx::..., dependent names, so builds without AMX need no
// declarations of them.
struct Amx {
    struct alignas(64) AmxTileConfig {
        uint8_t palette;
        uint8_t start_row;
        uint8_t reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    };

    // Load the tile configuration on the calling thread (tile state is per thread: the sweep configures each of its
    // threads once and releases the tiles at the end).
    static void configure() {
        AmxTileConfig cfg;
        std::memset(&cfg, 0, sizeof(cfg));
        cfg.palette = 1;
        for (int t = 0; t < 8; ++t) {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        _tile_loadconfig(&cfg);
    }

    static void release() { _tile_release(); }

    // C tiles 0-3 += (A rows 0-15 | 16-31, 32 bf16 columns at row stride a_rs) x (B tiles 6 | 7, already loaded).
    static void accumulate_a(const uint16_t* a, int64_t a_rs) {
        _tile_loadd(4, a, a_rs * 2);
        _tile_loadd(5, a + 16 * a_rs, a_rs * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }

    // C (32 x 32 fp32 at row stride c_rs floats) (+)= sum over the A operands of A (32 x 32 kchunks bf16 at row stride
    // a_rs elements) times B, B given as two VNNI column panels b0, b1 (kchunks blocks of 16 x 16 pairs, 512 bf16 each,
    // contiguous). NA = 2 adds a second A operand a2 (the low part of a split G) against the same B.
    template <int NA>
    static void block(int64_t kchunks, const uint16_t* a, const uint16_t* a2, int64_t a_rs, const uint16_t* b0,
                          const uint16_t* b1, float* c, int64_t c_rs, bool accumulate) {
        const int64_t cs = c_rs * 4;
        if (accumulate) {
            _tile_loadd(0, c, cs);
            _tile_loadd(1, c + 16, cs);
            _tile_loadd(2, c + 16 * c_rs, cs);
            _tile_loadd(3, c + 16 * c_rs + 16, cs);
        } else {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t kc = 0; kc < kchunks; ++kc) {
            _tile_loadd(6, b0 + kc * 512, 64);
            _tile_loadd(7, b1 + kc * 512, 64);
            accumulate_a(a + kc * 32, a_rs);
            if constexpr (NA == 2) accumulate_a(a2 + kc * 32, a_rs);
        }
        _tile_stored(0, c, cs);
        _tile_stored(1, c + 16, cs);
        _tile_stored(2, c + 16 * c_rs, cs);
        _tile_stored(3, c + 16 * c_rs + 16, cs);
    }

    // B = R^T in VNNI order, for S = X R^T: R is `rows` bf16 rows of d features at row stride rs; out holds
    // round_up(rows, 32) / 16 panels of (k32 / 2) x 16 pairs, panel q = columns 16 q .. 16 q + 15 of B (rows of R),
    // element [q][kp][n] = (R[16 q + n][2 kp], R[16 q + n][2 kp + 1]); zero past `rows` and past d (up to k32).
    static void pack_vnni_transposed(const uint16_t* r, int64_t rs, int64_t rows, int64_t d, int64_t k32,
                                     uint16_t* out) {
        const int64_t panels = (rows + 31) / 32 * 2, kpairs = k32 / 2;
        for (int64_t q = 0; q < panels; ++q) {
            uint32_t* panel = reinterpret_cast<uint32_t*>(out + q * 16 * k32);
            for (int64_t n = 0; n < 16; ++n) {
                const int64_t row = q * 16 + n;
                if (row >= rows) {
                    for (int64_t kp = 0; kp < kpairs; ++kp) panel[kp * 16 + n] = 0;
                    continue;
                }
                const uint16_t* src = r + row * rs;
                const int64_t full = d / 2;
                for (int64_t kp = 0; kp < full; ++kp) {
                    uint32_t pair;
                    std::memcpy(&pair, src + 2 * kp, sizeof(pair));
                    panel[kp * 16 + n] = pair;
                }
                int64_t kp = full;
                if (d % 2) panel[kp++ * 16 + n] = src[d - 1];  // (last feature, 0)
                for (; kp < kpairs; ++kp) panel[kp * 16 + n] = 0;
            }
        }
    }

    // B = R in VNNI pairs, for C += A R with K running over the rows of R: R is `rows` bf16 rows of d features at row
    // stride rs; out holds dp / 16 panels of (kmax / 2) x 16 pairs, element [e][kp][n] = (R[2 kp][16 e + n],
    // R[2 kp + 1][16 e + n]); zero past `rows` (up to kmax, a multiple of 32) and past d (up to dp, a multiple of 32).
    static void pack_vnni_pairs(const uint16_t* r, int64_t rs, int64_t rows, int64_t d, int64_t dp, int64_t kmax,
                                uint16_t* out) {
        const int64_t panels = dp / 16, kpairs = kmax / 2;
        const __m512i zero = _mm512_setzero_si512();
        for (int64_t kp = 0; kp < kpairs; ++kp) {
            const int64_t r0 = 2 * kp, r1 = 2 * kp + 1;
            const uint16_t* s0 = r0 < rows ? r + r0 * rs : nullptr;
            const uint16_t* s1 = r1 < rows ? r + r1 * rs : nullptr;
            for (int64_t e = 0; e < panels; ++e) {
                __m512i* dst = reinterpret_cast<__m512i*>(out + (e * kpairs + kp) * 32);
                const int64_t f0 = e * 16;
                if ((s0 == nullptr && s1 == nullptr) || f0 >= d) {
                    _mm512_storeu_si512(dst, zero);
                    continue;
                }
                const __mmask16 m = f0 + 16 <= d ? __mmask16(0xFFFF) : __mmask16((1u << (d - f0)) - 1);
                const __m512i lo = s0 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s0 + f0)) : zero;
                const __m512i hi = s1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s1 + f0)) : zero;
                _mm512_storeu_si512(dst, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        }
    }

    // Split 16 fp32 values into bf16 hi + lo (round to nearest even both times).
    static void split_bf16(__m512 g, uint16_t* hi, uint16_t* lo) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(g);
        const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), h);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(g, hf)));
    }

    // Transpose a 16 x 16 fp32 block held in 16 registers (r[i] = row i) in place: unpack pairs of rows, then
    // shuffle 4 x 4 blocks within 128-bit lanes, then move lanes across registers.
    static void transpose16(__m512 r[16]) {
        __m512 t[16], u[16], v[16];
        for (int k = 0; k < 8; ++k) {
            t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        // u[4k + j], 128-bit lane L: rows 4k .. 4k + 3 of column 4L + j
        for (int k = 0; k < 4; ++k) {
            u[4 * k + 0] = _mm512_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0x44);
            u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0xEE);
            u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
            u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
        }
        for (int j = 0; j < 4; ++j) {
            v[j] = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
            v[4 + j] = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
            v[8 + j] = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
            v[12 + j] = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
        }
        for (int j = 0; j < 4; ++j) {
            r[j] = _mm512_shuffle_f32x4(v[j], v[8 + j], 0x88);
            r[8 + j] = _mm512_shuffle_f32x4(v[j], v[8 + j], 0xDD);
            r[4 + j] = _mm512_shuffle_f32x4(v[4 + j], v[12 + j], 0x88);
            r[12 + j] = _mm512_shuffle_f32x4(v[4 + j], v[12 + j], 0xDD);
        }
    }

    // The gradient-weight tile g (mc x nc of a tile at row stride g_rs) as the A operands of both gradient GEMMs:
    // hi / lo (m32 x n32 at row stride g_rs, for dX) and its transpose hi_t / lo_t (n32 x m32 at row stride t_rs, for
    // dY), zero outside mc x nc. One pass over 16 x 16 blocks, transposed in registers.
    static void split_gradient_tile(const float* g, int64_t g_rs, int64_t mc, int64_t nc, int64_t m32, int64_t n32,
                                    uint16_t* hi, uint16_t* lo, int64_t t_rs, uint16_t* hi_t, uint16_t* lo_t) {
        __m512 r[16];
        for (int64_t i0 = 0; i0 < m32; i0 += 16) {
            for (int64_t j0 = 0; j0 < n32; j0 += 16) {
                const __mmask16 cols = j0 >= nc ? __mmask16(0)
                                       : j0 + 16 <= nc ? __mmask16(0xFFFF) : __mmask16((1u << (nc - j0)) - 1);
                for (int k = 0; k < 16; ++k) {
                    r[k] = i0 + k < mc ? _mm512_maskz_loadu_ps(cols, g + (i0 + k) * g_rs + j0) : _mm512_setzero_ps();
                    split_bf16(r[k], hi + (i0 + k) * g_rs + j0, lo + (i0 + k) * g_rs + j0);
                }
                transpose16(r);
                for (int k = 0; k < 16; ++k)
                    split_bf16(r[k], hi_t + (j0 + k) * t_rs + i0, lo_t + (j0 + k) * t_rs + i0);
            }
        }
    }
};

}  // namespace MMCL_ISA
}  // namespace mmcl
