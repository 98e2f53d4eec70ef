// The tile sweep shared by every fused CPU kernel (docs/design.md#fused-primitive): similarity tiles S = X_I Y_J^T
// produced by a register-blocked micro-kernel, handed to an epilogue while they sit in L2, and the two gradient GEMMs
// dX_I += G' Y_J, dY_J += G'^T X_I over a tile of gradient weights G' that the epilogue wrote in place of S.
//
// An epilogue is a callable `consume(scratch, i0, mc, j0, nc)` that turns one tile of similarities into its own
// reductions (online max / sum-exp for the LSE, softplus sums for the sigmoid loss) and, when gradients are wanted,
// into scaled gradient weights; `gradient_gemms` then feeds dX and dY from them. lse.h (forward + recompute
// backward) and sigmoid.h (fused forward + backward) are the two epilogues; a new elementwise-or-LSE loss is a
// third.
//
// Tiling: rows are cut into blocks of MC, columns into blocks of NC (the ISA policy's Shape). bf16 / fp16 inputs are
// converted to fp32 one block at a time; all arithmetic and every accumulation is fp32. Memory per thread: an
// MC x NC tile, the column block twice (NC x D transposed into NR-wide panels for the similarity GEMM, NC x D by
// NR-wide feature panels for dX) and the row block twice (MC x D rows, read in place when fp32 needs no padding;
// MC x D by feature panels for dY); nothing N x M.
//
// Every GEMM streams its B operand from a contiguous NR-wide panel: reading B rows at stride D instead (as an
// earlier version did for the gradient GEMMs) maps all of them to a few L1 sets when D is a power of two, and the
// gradient GEMMs then ran at ~70% of the similarity GEMM's rate.
//
// Threads and determinism: rows and columns are each split into T groups. In step s (of T), thread t works on
// row group t x column group (t + s) mod T, so every row state and every column state has exactly one writer per
// step, no atomics and no per-thread copies of dY are needed, and the accumulation order is fixed for a given T:
// results are bit-identical run to run.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "dispatch.h"
#include "half.h"

// Each ISA build compiles this header into its own namespace (MMCL_ISA), so that no inline function compiled
// with AVX-512 flags can be merged by the linker into the portable build.
#ifndef MMCL_ISA
#error "define MMCL_ISA (the ISA namespace) before including sweep.h"
#endif

namespace mmcl {
namespace MMCL_ISA {

// The register tile and the cache blocks belong to the ISA policy V (its register file decides them):
//   V::lanes  fp32 lanes per vector;  V::MR x V::NRV  micro-kernel accumulators (rows x vectors);
//   V::MC x V::NC  the similarity tile of one block step (MC a multiple of MR; NC a multiple of NR and of MR,
//   since NC is also the row dimension of the dY GEMM).
template <class V>
struct Shape {
    static constexpr int L = V::lanes;
    static constexpr int MR = V::MR;
    static constexpr int NRV = V::NRV;
    static constexpr int NR = L * NRV;
    static constexpr int MC = V::MC;
    static constexpr int NC = V::NC;
    static_assert(MC % MR == 0, "MC must be a multiple of MR");
    static_assert(NC % NR == 0 && NC % MR == 0 && NC % L == 0, "NC must be a multiple of NR, MR and the lanes");
};

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Denormals flushed to zero (and read as zero) on the calling thread while the object lives; the previous mode is
// restored on exit, so torch's own code on the same OpenMP threads is not affected. Why: the LSE and sigmoid
// epilogues take exp of logits far below the row maximum, and exp(x) for x in [-104, -87.3] is an fp32 denormal;
// Intel cores handle denormal operands and results in microcode, which made the fused CLIP forward + backward
// ~14x slower once logit scales reach ~100 (N = 4096, D = 64, scale 150: 818 ms against 60 ms at scale 10, on a
// Sapphire Rapids class Xeon). What is flushed is below 1.2e-38 in absolute value, next to sums of at least 1 (the
// row maximum's own term) and gradient weights that sum to 1 per row: far below every tolerance.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
    unsigned int saved = _mm_getcsr();
    FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
    ~FlushDenormals() { _mm_setcsr(saved); }
#elif defined(__aarch64__)
    unsigned int saved = __builtin_aarch64_get_fpcr();
    FlushDenormals() { __builtin_aarch64_set_fpcr(saved | (1u << 24)); }  // FPCR.FZ
    ~FlushDenormals() { __builtin_aarch64_set_fpcr(saved); }
#endif
    FlushDenormals(const FlushDenormals&) = delete;
    FlushDenormals& operator=(const FlushDenormals&) = delete;
};


// Copy rows [r0, r0 + rows) of a (·, d) matrix of `dtype` into a zero-padded fp32 buffer (rows_pad x dp).
template <class V>
inline void load_rows_f32(const void* src, int64_t rs, int dtype, int64_t r0, int64_t rows, int64_t rows_pad,
                          int64_t d, int64_t dp, float* dst) {
    constexpr int L = V::lanes;
    for (int64_t r = 0; r < rows; ++r) {
        float* out = dst + r * dp;
        const int64_t row = r0 + r;
        if (dtype == kF32) {
            std::memcpy(out, static_cast<const float*>(src) + row * rs, sizeof(float) * d);
        } else {
            const uint16_t* in = static_cast<const uint16_t*>(src) + row * rs;
            int64_t k = 0;
            for (; k + L <= d; k += L) {
                if (dtype == kBF16) V::bf16_to_f32(in + k, out + k); else V::f16_to_f32(in + k, out + k);
            }
            for (; k < d; ++k) out[k] = dtype == kBF16 ? bf16_bits_to_float(in[k]) : f16_bits_to_float(in[k]);
        }
        std::fill(out + d, out + dp, 0.0f);
    }
    for (int64_t r = rows; r < rows_pad; ++r) std::fill(dst + r * dp, dst + (r + 1) * dp, 0.0f);
}

// C[r, 0:NR] (+)= sum_k A(r, k) * B[k, 0:NR] for r < MR, with A(r, k) = a[r * a_rs + k * a_ks] and B rows
// NR-contiguous at stride b_ks. The accumulators stay in registers for the whole k loop.
template <class V>
inline void micro_kernel(int64_t kc, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t b_ks,
                         float* c, int64_t c_rs, bool accumulate) {
    using T = typename V::type;
    constexpr int L = V::lanes, MR = V::MR, NRV = V::NRV;
    T acc[MR][NRV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NRV; ++v) acc[r][v] = accumulate ? V::load(c + r * c_rs + L * v) : V::zero();
    for (int64_t k = 0; k < kc; ++k) {
        T bv[NRV];
        for (int v = 0; v < NRV; ++v) bv[v] = V::load(b + k * b_ks + L * v);
        const float* ak = a + k * a_ks;
        for (int r = 0; r < MR; ++r) {
            const T av = V::set1(ak[r * a_rs]);
            for (int v = 0; v < NRV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NRV; ++v) V::store(c + r * c_rs + L * v, acc[r][v]);
}

// Per-thread scratch: the current row block and column block in fp32, the column block transposed into
// NR-wide panels for the similarity GEMM, and the similarity / gradient-weight tile.
template <class V>
struct TileScratch {
    static constexpr int MC = Shape<V>::MC, NC = Shape<V>::NC;
    std::vector<float> x_blk;    // MC x dp
    const float* x_rows = nullptr;  // the current row block in fp32: x_blk, or the input itself (see load_row_block)
    int64_t x_stride = 0;           // its row stride
    std::vector<float> y_row;    // dp: one column-block row converted to fp32
    std::vector<float> y_pack;   // (NC / NR) panels of d x NR: the column block transposed, for the similarity GEMM
    std::vector<float> y_grad;   // (dp / NR) panels of NC x NR: the column block by feature panels, for dX
    std::vector<float> x_grad;   // (dp / NR) panels of MC x NR: the row block by feature panels, for dY
    std::vector<float> tile;     // MC x NC
    std::vector<float> col_bias; // NC (padding: -inf, so padded columns never count)
    std::vector<float> col_aux;  // NC (per-column scratch: tile max, gradient weights)
    std::vector<float> col_aux2; // NC
    std::vector<float> col_aux3; // NC
    // bf16 dot-product path: the raw bf16 row block (MC x d2) and the column block packed as (NC / NR) panels of
    // (d2 / 2) x NR x 2 bf16 pairs, d2 = d rounded up to even (zero-padded).
    std::vector<uint16_t> x_bf;
    std::vector<uint16_t> y_pack_bf;
    // AMX path (amx.h; bf16 inputs on the amx-bf16 build), d32 = d rounded up to 32: the row block as A rows
    // (MC x d32), the column block as VNNI panels of Y^T (NC x d32), both blocks as VNNI row pairs for the
    // gradient GEMMs (NC x dp, MC x dp), and the gradient weights split into bf16 hi / lo, plain and transposed.
    std::vector<uint16_t> amx_x, amx_yt, amx_yg, amx_xg, amx_g_hi, amx_g_lo, amx_gt_hi, amx_gt_lo;
    TileScratch(int64_t d, int64_t dp, bool bf16_dot, bool amx = false)
        : x_blk(amx ? 0 : MC * dp), y_row(dp), y_pack(amx ? 0 : NC * std::max<int64_t>(d, 1)),
          y_grad(amx ? 0 : NC * dp), x_grad(amx ? 0 : MC * dp),
          tile(MC * NC), col_bias(NC),
          col_aux(NC), col_aux2(NC), col_aux3(NC), x_bf(bf16_dot ? MC * round_up(d, 2) : 0),
          y_pack_bf(bf16_dot ? NC * round_up(d, 2) : 0) {
        if (amx) {
            const int64_t d32 = round_up(d, 32);
            amx_x.assign(MC * d32, 0);
            amx_yt.assign(NC * d32, 0);
            amx_yg.assign(NC * dp, 0);
            amx_xg.assign(MC * dp, 0);
            amx_g_hi.assign(MC * NC, 0);
            amx_g_lo.assign(MC * NC, 0);
            amx_gt_hi.assign(NC * MC, 0);
            amx_gt_lo.assign(NC * MC, 0);
        }
    }
};

template <class V>
struct TileSweep {
    using T = typename V::type;
    static constexpr int L = Shape<V>::L, MR = Shape<V>::MR, NRV = Shape<V>::NRV, NR = Shape<V>::NR;
    static constexpr int MC = Shape<V>::MC, NC = Shape<V>::NC;
    using Scratch = TileScratch<V>;

    const Problem p;
    int64_t dp;                          // d padded to NR
    int64_t d2;                          // d padded to even (bf16 pairs)
    bool amx;                            // bf16 inputs on the amx-bf16 build: all three GEMMs on AMX tiles (amx.h)
    bool bf16_dot;                       // bf16 inputs on a CPU with AVX512-BF16: similarity GEMM on bf16 pairs
    int threads;
    std::vector<int64_t> row_groups;     // block-aligned boundaries, size threads + 1
    std::vector<int64_t> col_groups;

    TileSweep(const Problem& prob, int nthreads)
        : p(prob), dp(round_up(prob.d, NR)), d2(round_up(prob.d, 2)), amx(V::has_amx && prob.dtype == kBF16),
          bf16_dot(V::has_bf16_dot && prob.dtype == kBF16 && !amx) {
        static_assert(!V::has_amx || (MC % 32 == 0 && NC % 32 == 0 && NR % 32 == 0),
                      "the AMX path needs MC, NC and NR multiples of 32");
        const int64_t row_blocks = (p.n + MC - 1) / MC, col_blocks = (p.m + NC - 1) / NC;
#ifndef _OPENMP
        nthreads = 1;  // a build without OpenMP (e.g. macOS without libomp) runs the whole sweep on one thread
#endif
        threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, std::max(row_blocks, col_blocks))));
        row_groups = split(row_blocks, MC, p.n);
        col_groups = split(col_blocks, NC, p.m);
    }

    std::vector<int64_t> split(int64_t blocks, int64_t block, int64_t total) const {
        std::vector<int64_t> bounds(threads + 1);
        for (int t = 0; t <= threads; ++t) bounds[t] = std::min(total, (blocks * t / threads) * block);
        bounds[threads] = total;
        return bounds;
    }

    // Load column block [j0, j0 + nc). The similarity GEMM reads it as NR-wide transposed panels (fp32, or bf16
    // pairs on the bf16 path; VNNI panels on the AMX path); the gradient GEMMs read fp32 rows (`need_f32_rows`; VNNI
    // row pairs on the AMX path).
    void load_col_block(Scratch& s, int64_t j0, int64_t nc, bool need_f32_rows) const {
        if constexpr (V::has_amx) {
            if (amx) {
                const uint16_t* y = static_cast<const uint16_t*>(p.y) + j0 * p.y_rs;
                V::Amx::pack_vnni_transposed(y, p.y_rs, nc, p.d, round_up(p.d, 32), s.amx_yt.data());
                if (need_f32_rows) V::Amx::pack_vnni_pairs(y, p.y_rs, nc, p.d, dp, NC, s.amx_yg.data());
                return;
            }
        }
        const int64_t panels = round_up(nc, NR) / NR;
        if (bf16_dot) {
            const uint16_t* y = static_cast<const uint16_t*>(p.y);
            for (int64_t q = 0; q < panels; ++q) {
                uint16_t* panel = s.y_pack_bf.data() + q * d2 * NR;
                for (int64_t c = 0; c < NR; ++c) {
                    const int64_t col = q * NR + c;
                    const uint16_t* row = y + (j0 + col) * p.y_rs;
                    for (int64_t k = 0; k < d2; ++k)
                        panel[(k >> 1) * 2 * NR + 2 * c + (k & 1)] = (col < nc && k < p.d) ? row[k] : 0;
                }
            }
        }
        if (!bf16_dot || need_f32_rows) {
            const int64_t npad = round_up(nc, NR);
            for (int64_t c = 0; c < npad; ++c) {
                const float* row = s.y_row.data();
                if (c < nc) {
                    if (p.dtype == kF32 && p.d == dp) row = static_cast<const float*>(p.y) + (j0 + c) * p.y_rs;
                    else load_rows_f32<V>(p.y, p.y_rs, p.dtype, j0 + c, 1, 1, p.d, dp, s.y_row.data());
                } else {
                    std::fill(s.y_row.begin(), s.y_row.end(), 0.0f);
                }
                if (!bf16_dot) {
                    float* panel = s.y_pack.data() + (c / NR) * p.d * NR + (c % NR);
                    for (int64_t k = 0; k < p.d; ++k) panel[k * NR] = row[k];
                }
                if (need_f32_rows)
                    for (int64_t d0 = 0; d0 < dp; d0 += NR)
                        std::memcpy(s.y_grad.data() + d0 * NC + c * NR, row + d0, sizeof(float) * NR);
            }
        }
    }

    // The column block's biases, -inf past its end (padded columns never count).
    void load_col_bias(Scratch& s, int64_t j0, int64_t nc) const {
        for (int64_t c = 0; c < NC; ++c)
            s.col_bias[c] = c < nc ? p.col_bias[j0 + c] : -std::numeric_limits<float>::infinity();
    }

    // Load row block [i0, i0 + mc): fp32 rows for the fp32 similarity GEMM and the gradient GEMMs, raw bf16 rows
    // for the bf16 similarity GEMM.
    void load_row_block(Scratch& s, int64_t i0, int64_t mc, bool need_f32_rows) const {
        if constexpr (V::has_amx) {
            if (amx) {
                const int64_t d32 = round_up(p.d, 32);
                const uint16_t* x = static_cast<const uint16_t*>(p.x) + i0 * p.x_rs;
                for (int64_t r = 0; r < round_up(mc, 32); ++r) {
                    uint16_t* out = s.amx_x.data() + r * d32;
                    if (r < mc) std::memcpy(out, x + r * p.x_rs, sizeof(uint16_t) * p.d);
                    std::fill(out + (r < mc ? p.d : 0), out + d32, uint16_t(0));
                }
                if (need_f32_rows) V::Amx::pack_vnni_pairs(x, p.x_rs, mc, p.d, dp, MC, s.amx_xg.data());
                return;
            }
        }
        if (bf16_dot) {
            const uint16_t* x = static_cast<const uint16_t*>(p.x);
            for (int64_t r = 0; r < round_up(mc, MR); ++r) {
                uint16_t* out = s.x_bf.data() + r * d2;
                if (r < mc) std::memcpy(out, x + (i0 + r) * p.x_rs, sizeof(uint16_t) * p.d);
                std::fill(out + (r < mc ? p.d : 0), out + d2, uint16_t(0));
            }
        }
        if (bf16_dot && !need_f32_rows) return;
        // fp32 rows that need no padding (D a multiple of NR, a whole number of MR-row micro-panels) are read in
        // place: at large N the row blocks stream from memory, and a copy would stall every tile on it.
        if (p.dtype == kF32 && p.d == dp && mc % MR == 0) {
            s.x_rows = static_cast<const float*>(p.x) + i0 * p.x_rs;
            s.x_stride = p.x_rs;
        } else {
            load_rows_f32<V>(p.x, p.x_rs, p.dtype, i0, mc, round_up(mc, MR), p.d, dp, s.x_blk.data());
            s.x_rows = s.x_blk.data();
            s.x_stride = dp;
        }
        if (need_f32_rows) {
            const int64_t mpad = round_up(mc, MR);
            for (int64_t r = 0; r < mpad; ++r)
                for (int64_t d0 = 0; d0 < dp; d0 += NR)
                    std::memcpy(s.x_grad.data() + d0 * MC + r * NR, s.x_rows + r * s.x_stride + d0, sizeof(float) * NR);
        }
    }

    // tile[i, j] = <x_i, y_j> for the loaded blocks (rows padded to MR, columns to NR).
    void similarity_tile(Scratch& s, int64_t mc, int64_t nc) const {
        if constexpr (V::has_amx) {
            if (amx) {
                const int64_t d32 = round_up(p.d, 32), m32 = round_up(mc, 32), n32 = round_up(nc, 32);
                for (int64_t i = 0; i < m32; i += 32)
                    for (int64_t q = 0; q < n32; q += 32)
                        V::Amx::template block<1>(d32 / 32, s.amx_x.data() + i * d32, nullptr, d32,
                                                  s.amx_yt.data() + q * d32, s.amx_yt.data() + (q + 16) * d32,
                                                  s.tile.data() + i * NC + q, NC, false);
                return;
            }
        }
        const int64_t mpad = round_up(mc, MR), npad = round_up(nc, NR);
        for (int64_t q = 0; q < npad / NR; ++q) {
            if constexpr (V::has_bf16_dot) {
                if (bf16_dot) {
                    const uint16_t* panel = s.y_pack_bf.data() + q * d2 * NR;
                    for (int64_t i = 0; i < mpad; i += MR)
                        V::template bf16_dot_kernel<MR, NRV>(d2 / 2, s.x_bf.data() + i * d2, d2, panel,
                                                             s.tile.data() + i * NC + q * NR, NC);
                    continue;
                }
            }
            const float* panel = s.y_pack.data() + q * p.d * NR;
            for (int64_t i = 0; i < mpad; i += MR)
                micro_kernel<V>(p.d, s.x_rows + i * s.x_stride, s.x_stride, 1, panel, NR, s.tile.data() + i * NC + q * NR, NC,
                                false);
        }
    }

    // The ring schedule over all tiles: in step s thread t visits row group t x column group (t + s) mod T, column
    // block outer (loaded once), row block inner; `consume(scratch, i0, mc, j0, nc)` gets each similarity tile.
    template <class Consume>
    void sweep(bool need_f32_rows, Consume&& consume) const {
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            const int t = omp_get_thread_num();
#else
            const int t = 0;
#endif
            const FlushDenormals no_denormals;
            if constexpr (V::has_amx) {
                if (amx) V::Amx::configure();  // tile configuration: per thread, until release() below
            }
            Scratch s(p.d, dp, bf16_dot, amx);
            for (int step = 0; step < threads; ++step) {
                const int cg = (t + step) % threads;
                for (int64_t j0 = col_groups[cg]; j0 < col_groups[cg + 1]; j0 += NC) {
                    const int64_t nc = std::min<int64_t>(NC, col_groups[cg + 1] - j0);
                    load_col_block(s, j0, nc, need_f32_rows);
                    load_col_bias(s, j0, nc);
                    for (int64_t i0 = row_groups[t]; i0 < row_groups[t + 1]; i0 += MC) {
                        const int64_t mc = std::min<int64_t>(MC, row_groups[t + 1] - i0);
                        load_row_block(s, i0, mc, need_f32_rows);
                        similarity_tile(s, mc, nc);
                        consume(s, i0, mc, j0, nc);
                    }
                }
#pragma omp barrier
            }
            if constexpr (V::has_amx) {
                if (amx) V::Amx::release();
            }
        }
    }

    // dX_I += G' Y_J (k over the tile's columns) and dY_J += G'^T X_I (k over the tile's rows).
    void gradient_gemms(Scratch& s, int64_t i0, int64_t mc, int64_t j0, int64_t nc, float* dx_acc,
                        float* dy_acc) const {
        if constexpr (V::has_amx) {
            if (amx) {
                const int64_t m32 = round_up(mc, 32), n32 = round_up(nc, 32);
                V::Amx::split_gradient_tile(s.tile.data(), NC, mc, nc, m32, n32, s.amx_g_hi.data(),
                                            s.amx_g_lo.data(), MC, s.amx_gt_hi.data(), s.amx_gt_lo.data());
                for (int64_t i = 0; i < m32; i += 32)
                    for (int64_t d0 = 0; d0 < dp; d0 += 32)
                        V::Amx::template block<2>(n32 / 32, s.amx_g_hi.data() + i * NC, s.amx_g_lo.data() + i * NC,
                                                  NC, s.amx_yg.data() + d0 * NC, s.amx_yg.data() + (d0 + 16) * NC,
                                                  dx_acc + (i0 + i) * dp + d0, dp, true);
                for (int64_t j = 0; j < n32; j += 32)
                    for (int64_t d0 = 0; d0 < dp; d0 += 32)
                        V::Amx::template block<2>(m32 / 32, s.amx_gt_hi.data() + j * MC, s.amx_gt_lo.data() + j * MC,
                                                  MC, s.amx_xg.data() + d0 * MC, s.amx_xg.data() + (d0 + 16) * MC,
                                                  dy_acc + (j0 + j) * dp + d0, dp, true);
                return;
            }
        }
        const int64_t mpad = round_up(mc, MR), npad = round_up(nc, MR);
        if (mc < mpad)  // padded tile rows must not feed dY
            std::fill(s.tile.data() + mc * NC, s.tile.data() + mpad * NC, 0.0f);
        for (int64_t d0 = 0; d0 < dp; d0 += NR) {
            for (int64_t i = 0; i < mpad; i += MR)
                micro_kernel<V>(nc, s.tile.data() + i * NC, NC, 1, s.y_grad.data() + d0 * NC, NR,
                                dx_acc + (i0 + i) * dp + d0, dp, true);
            for (int64_t j = 0; j < npad; j += MR)
                micro_kernel<V>(mc, s.tile.data() + j, 1, NC, s.x_grad.data() + d0 * MC, NR,
                                dy_acc + (j0 + j) * dp + d0, dp, true);
        }
    }
};

// Round the fp32 accumulators (rows x dp) into the caller's (rows x d) output of `dtype`.
inline void store_rows(const float* acc, int64_t rows, int64_t d, int64_t dp, int dtype, void* out,
                       bool accumulate = false) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* in = acc + r * dp;
        if (accumulate) {  // fp32 only (checked at the binding): a cross-rank partial added to its running sum
            float* o = static_cast<float*>(out) + r * d;
            for (int64_t k = 0; k < d; ++k) o[k] += in[k];
        } else if (dtype == kF32) {
            std::memcpy(static_cast<float*>(out) + r * d, in, sizeof(float) * d);
        } else {
            uint16_t* o = static_cast<uint16_t*>(out) + r * d;
            for (int64_t k = 0; k < d; ++k) o[k] = dtype == kBF16 ? float_to_bf16_bits(in[k]) : float_to_f16_bits(in[k]);
        }
    }
}

}  // namespace MMCL_ISA
}  // namespace mmcl
