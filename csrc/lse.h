// Fused streamed log-sum-exp over an affine similarity, forward and backward (docs/design.md#fused-primitive), CPU.
//
//   L_ij = scale_i * <x_i, y_j> + row_bias_i + col_bias_j
//   forward:  row_lse_i = log sum_j exp(L_ij),  col_lse_j = log sum_i exp(L_ij)       (one sweep over tiles)
//   backward: G_ij = grow_i exp(L_ij - row_lse_i) + gcol_j exp(L_ij - col_lse_j)
//             dx_i = scale_i sum_j G_ij y_j,  dy_j = sum_i G_ij scale_i x_i,
//             dscale_i = sum_j G_ij <x_i,y_j>,  drow_i = sum_j G_ij,  dcol_j = sum_i G_ij  (one recompute sweep)
//
// GEMM count: 4 N*M*D GEMM-equivalents for forward + backward (1 forward; 3 backward: recompute S, G.Y, G^T.X),
// against Inf-CL's 10 for the symmetric loss.
// Memory: O((N + M) * D) for the fp32 gradient accumulators plus the sweep's per-thread blocks (an MC x NC
// similarity tile and two packed fp32 copies each of the current MC x D row block and NC x D column block, see
// sweep.h). Nothing N x M is ever allocated. MR, NR, MC, NC are the ISA policy's (Shape in sweep.h).
//
// The tiles, the thread schedule and the gradient GEMMs are the shared sweep of sweep.h; this file holds the two LSE
// epilogues: the online max / sum-exp update (forward) and the gradient weights G (backward).
#pragma once
#include "sweep.h"

namespace mmcl {
namespace MMCL_ISA {

template <class V>
struct LseKernel {
    using T = typename V::type;
    static constexpr int L = Shape<V>::L, NC = Shape<V>::NC, MC = Shape<V>::MC;
    using Scratch = TileScratch<V>;

    TileSweep<V> tiles;
    const Problem& p;

    LseKernel(const Problem& prob, int nthreads) : tiles(prob, nthreads), p(tiles.p) {}

    // ---------------------------------------------------------------------------------------------------------
    // forward
    // ---------------------------------------------------------------------------------------------------------
    void forward(float* row_lse, float* col_lse) const {
        const bool need_row = row_lse != nullptr, need_col = col_lse != nullptr;
        const float ninf = -std::numeric_limits<float>::infinity();
        const int64_t mpad_total = round_up(p.m, NC);
        std::vector<float> row_max(p.n, ninf), row_sum(p.n, 0.0f);
        std::vector<float> col_max(mpad_total, ninf), col_sum(mpad_total, 0.0f);

        tiles.sweep(false, [&](Scratch& s, int64_t i0, int64_t mc, int64_t j0, int64_t nc) {
            forward_tile(s, i0, mc, j0, nc, need_row, need_col, row_max.data() + i0, row_sum.data() + i0,
                         col_max.data() + j0, col_sum.data() + j0);
        });
        if (need_row)
            for (int64_t i = 0; i < p.n; ++i) row_lse[i] = row_max[i] + std::log(row_sum[i]);
        if (need_col)
            for (int64_t j = 0; j < p.m; ++j) col_lse[j] = col_max[j] + std::log(col_sum[j]);
    }

    // Online LSE update with one tile: pass 1 turns similarities into logits and finds row and column maxima,
    // pass 2 adds exp(L - running max) to the row and column sums (rescaling the old sums once per tile).
    void forward_tile(Scratch& s, int64_t i0, int64_t mc, int64_t j0, int64_t nc, bool need_row, bool need_col,
                      float* rmax, float* rsum, float* cmax, float* csum) const {
        const int64_t nv = round_up(nc, L) / L;
        const float ninf = -std::numeric_limits<float>::infinity();
        float* tile_cmax = s.col_aux.data();
        float* col_acc = s.col_aux2.data();
        std::fill(tile_cmax, tile_cmax + NC, ninf);
        std::vector<float>& cb = s.col_bias;
        for (int64_t i = 0; i < mc; ++i) {
            const T a = V::set1(p.scale[i0 + i]), r = V::set1(p.row_bias[i0 + i]);
            float* row = s.tile.data() + i * NC;
            T vmax = V::set1(ninf);
            for (int64_t v = 0; v < nv; ++v) {
                const T logit = V::add(V::fma(a, V::load(row + L * v), r), V::load(cb.data() + L * v));
                V::store(row + L * v, logit);
                vmax = V::max(vmax, logit);
                V::store(tile_cmax + L * v, V::max(V::load(tile_cmax + L * v), logit));
            }
            if (need_row) {
                const float m_old = rmax[i];
                const float m_new = std::max(m_old, V::reduce_max(vmax));
                rsum[i] *= std::exp(m_old - m_new);
                rmax[i] = m_new;
            }
        }
        if (need_col) {
            for (int64_t v = 0; v < nv; ++v) {
                const T m_old = V::load(cmax + L * v);
                const T m_new = V::max(m_old, V::load(tile_cmax + L * v));
                V::store(csum + L * v, V::mul(V::load(csum + L * v), V::exp(V::sub(m_old, m_new))));
                V::store(cmax + L * v, m_new);
                V::store(col_acc + L * v, V::zero());
            }
        }
        for (int64_t i = 0; i < mc; ++i) {
            const float* row = s.tile.data() + i * NC;
            const T rm = V::set1(rmax[i]);
            T racc = V::zero();
            for (int64_t v = 0; v < nv; ++v) {
                const T logit = V::load(row + L * v);
                if (need_row) racc = V::add(racc, V::exp(V::sub(logit, rm)));
                if (need_col)
                    V::store(col_acc + L * v,
                             V::add(V::load(col_acc + L * v), V::exp(V::sub(logit, V::load(cmax + L * v)))));
            }
            if (need_row) rsum[i] += V::reduce_add(racc);
        }
        if (need_col)
            for (int64_t v = 0; v < nv; ++v)
                V::store(csum + L * v, V::add(V::load(csum + L * v), V::load(col_acc + L * v)));
        (void)j0;
    }

    // ---------------------------------------------------------------------------------------------------------
    // backward
    // ---------------------------------------------------------------------------------------------------------
    // dx / dy: fp32 accumulators of row stride dp, zero-initialised here ((round_up(n, MC) x dp) and
    // (round_up(m, NC) x dp)) unless `zero` is false (in-place accumulation: n + kSpareRows / m + kSpareRows rows).
    void backward(const float* row_lse, const float* col_lse, const float* grad_row, const float* grad_col,
                  const Extras& ex, float* dx_acc, float* dy_acc, float* dscale, float* drow, float* dcol,
                  bool zero = true) const {
        const bool use_row = row_lse != nullptr, use_col = col_lse != nullptr;
        const int64_t mpad_total = round_up(p.m, NC);
        // Column-side vectors padded to whole blocks; padded columns have zero gradient weight.
        std::vector<float> lse_c(mpad_total, 0.0f), g_c(mpad_total, 0.0f), dcol_acc(mpad_total, 0.0f);
        std::vector<float> const_c(mpad_total, 0.0f);
        if (use_col)
            for (int64_t j = 0; j < p.m; ++j) { lse_c[j] = col_lse[j]; g_c[j] = grad_col[j]; }
        if (ex.col_const)
            for (int64_t j = 0; j < p.m; ++j) const_c[j] = ex.col_const[j];
        if (zero) {
            std::fill(dx_acc, dx_acc + round_up(p.n, MC) * tiles.dp, 0.0f);
            std::fill(dy_acc, dy_acc + mpad_total * tiles.dp, 0.0f);
        }
        for (int64_t i = 0; i < p.n; ++i) { dscale[i] = 0.0f; drow[i] = 0.0f; }

        tiles.sweep(true, [&](Scratch& s, int64_t i0, int64_t mc, int64_t j0, int64_t nc) {
            backward_tile(s, i0, mc, j0, nc, use_row ? row_lse : nullptr, use_row ? grad_row : nullptr,
                          lse_c.data() + j0, g_c.data() + j0, const_c.data() + j0, use_col, ex, dscale, drow,
                          dcol_acc.data() + j0);
            tiles.gradient_gemms(s, i0, mc, j0, nc, dx_acc, dy_acc);
        });
        for (int64_t j = 0; j < p.m; ++j) dcol[j] = dcol_acc[j];
    }

    // Turn the similarity tile into scaled gradient weights G'_ij = scale_i * G_ij (in place), accumulating
    // dscale_i += sum_j G_ij s_ij, drow_i += sum_j G_ij and dcol_j += sum_i G_ij on the way.
    void backward_tile(Scratch& s, int64_t i0, int64_t mc, int64_t j0, int64_t nc, const float* row_lse,
                       const float* grad_row, const float* lse_c, const float* g_c, const float* const_c,
                       bool use_col, const Extras& ex, float* dscale, float* drow, float* dcol) const {
        const int64_t nv = round_up(nc, L) / L;
        float* dcol_tile = s.col_aux.data();
        std::fill(dcol_tile, dcol_tile + NC, 0.0f);
        // Columns whose positive row falls in this tile: its local row index as a float key (-1: none).
        float* target_row_key = s.col_aux2.data();
        float* target_row_grad = s.col_aux3.data();
        bool any_col_target = false;
        for (int64_t c = 0; c < NC; ++c) {
            const int64_t u = (ex.col_target && c < nc) ? ex.col_target[j0 + c] - i0 : -1;
            const bool here = u >= 0 && u < mc;
            target_row_key[c] = here ? static_cast<float>(u) : -1.0f;
            target_row_grad[c] = here ? ex.col_target_grad[j0 + c] : 0.0f;
            any_col_target |= here;
        }
        const float* cb = s.col_bias.data();
        const bool use_row = row_lse != nullptr;
        for (int64_t i = 0; i < mc; ++i) {
            const T a = V::set1(p.scale[i0 + i]), r = V::set1(p.row_bias[i0 + i]);
            const T lr = V::set1(use_row ? row_lse[i0 + i] : 0.0f);
            const T gr = V::set1(use_row ? grad_row[i0 + i] : 0.0f);
            const T row_const = V::set1(ex.row_const ? ex.row_const[i0 + i] : 0.0f);
            const int64_t target_col = ex.row_target ? ex.row_target[i0 + i] - j0 : -1;
            const bool row_target_here = target_col >= 0 && target_col < nc;
            const float row_target_grad = row_target_here ? ex.row_target_grad[i0 + i] : 0.0f;
            const T row_key = V::set1(static_cast<float>(i));
            float* row = s.tile.data() + i * NC;
            T da = V::zero(), dr = V::zero();
            for (int64_t v = 0; v < nv; ++v) {
                const T sim = V::load(row + L * v);
                const T logit = V::add(V::fma(a, sim, r), V::load(cb + L * v));
                T g = V::load(const_c + L * v);
                if (use_row) g = V::fma(gr, V::exp(V::sub(logit, lr)), g);
                if (use_col) g = V::fma(V::load(g_c + L * v), V::exp(V::sub(logit, V::load(lse_c + L * v))), g);
                if (row_target_here && target_col / L == v)
                    g = V::add_at_lane(g, static_cast<int>(target_col % L), row_target_grad);
                if (any_col_target)
                    g = V::add_where_equal(g, V::load(target_row_key + L * v), row_key,
                                           V::load(target_row_grad + L * v));
                // row_const joins G after drow's sum: padded lanes (c >= nc) must not count it
                dr = V::add(dr, g);
                g = V::add(g, row_const);
                da = V::fma(g, sim, da);
                V::store(dcol_tile + L * v, V::add(V::load(dcol_tile + L * v), g));
                V::store(row + L * v, V::mul(a, g));
            }
            dscale[i0 + i] += V::reduce_add(da);
            drow[i0 + i] += V::reduce_add(dr) + (ex.row_const ? ex.row_const[i0 + i] * static_cast<float>(nc) : 0.0f);
        }
        for (int64_t v = 0; v < nv; ++v)
            V::store(dcol + L * v, V::add(V::load(dcol + L * v), V::load(dcol_tile + L * v)));
    }
};

template <class V>
void lse_forward(const Problem& p, float* row_lse, float* col_lse, int threads) {
    LseKernel<V>(p, threads).forward(row_lse, col_lse);
}

template <class V>
void lse_backward(const Problem& p, const float* row_lse, const float* col_lse, const float* grad_row,
                  const float* grad_col, const Extras& ex, void* dx, void* dy, float* dscale, float* drow,
                  float* dcol, int threads) {
    LseKernel<V> k(p, threads);
    if (p.grad_in_place) {
        k.backward(row_lse, col_lse, grad_row, grad_col, ex, static_cast<float*>(dx), static_cast<float*>(dy), dscale,
                   drow, dcol, false);
        return;
    }
    std::vector<float> dx_acc(round_up(p.n, Shape<V>::MC) * k.tiles.dp), dy_acc(round_up(p.m, Shape<V>::NC) * k.tiles.dp);
    k.backward(row_lse, col_lse, grad_row, grad_col, ex, dx_acc.data(), dy_acc.data(), dscale, drow, dcol);
    const int out_dtype = p.grad_dtype < 0 ? p.dtype : p.grad_dtype;
    store_rows(dx_acc.data(), p.n, p.d, k.tiles.dp, out_dtype, dx, p.grad_accumulate);
    store_rows(dy_acc.data(), p.m, p.d, k.tiles.dp, out_dtype, dy, p.grad_accumulate);
}

}  // namespace MMCL_ISA
}  // namespace mmcl
