// Fused sigmoid (SigLIP) loss over an affine similarity, forward and backward in one sweep, CPU
// (docs/design.md#siglip).
//
//   L_ij = scale_i * <x_i, y_j> + row_bias_i + col_bias_j,   z_ij = +1 for a positive pair, -1 otherwise
//   loss terms:  row_loss_i = sum_j softplus(-z_ij L_ij)  (= -sum_j log sigmoid(z_ij L_ij))
//   gradients of sum_i row_loss_i:  G_ij = -z_ij sigmoid(-z_ij L_ij)   (elementwise: no row or column statistic)
//             dx_i = scale_i sum_j G_ij y_j,  dy_j = sum_i G_ij scale_i x_i,
//             dscale_i = sum_j G_ij <x_i,y_j>,  drow_i = sum_j G_ij,  dcol_j = sum_i G_ij
//
// Because G of a tile is known as soon as the tile's similarities are, forward and backward are one sweep:
// 3 N*M*D GEMM-equivalents with gradients (S, G.Y, G^T.X), 1 without; the LSE losses need 4. The caller scales
// the results by the loss's normalisation and the upstream gradient (one fp32 multiply before the single rounding).
// Memory: O((N + M) * D) fp32 gradient accumulators plus the sweep's per-thread tiles; nothing N x M.
//
// Positives come as a CSR list (row i's positive columns, sorted: pos_cols[pos_ptr[i] .. pos_ptr[i + 1])). A
// positive only flips the sign of its logit (u = -z L), so the tile pass is the same for every entry: per row, a
// sign vector of the tile's columns is set to -1 at the row's positives and reset afterwards (O(positives) work).
//
// Numerics (fp32): with u = -z L, e = exp(-|u|) in (0, 1]:
//   softplus(u) = max(u, 0) + log1p(e),   log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3] (odd series, 9 terms:
//                                         relative error < 2e-9, and exact to the last bit for tiny e)
//   sigmoid(u)  = 1 / (1 + e) for u >= 0, e / (1 + e) for u < 0   (no cancellation on either side)
// so the loss and every gradient stay accurate at logit scale 100 and bias -20 (|L| > 100: e underflows to 0).
#pragma once
#include "sweep.h"

namespace mmcl {
namespace MMCL_ISA {

template <class V>
struct SigmoidKernel {
    using T = typename V::type;
    static constexpr int L = Shape<V>::L, NC = Shape<V>::NC, MC = Shape<V>::MC;
    using Scratch = TileScratch<V>;

    TileSweep<V> tiles;
    const Problem& p;
    const Positives& pos;

    SigmoidKernel(const Problem& prob, const Positives& positives, int nthreads)
        : tiles(prob, nthreads), p(tiles.p), pos(positives) {}

    // log1p(e) for e in [0, 1]: 2 (s + s^3/3 + ... + s^17/17), s = e / (2 + e).
    static inline T log1p_unit(T e) {
        const T s = V::div(e, V::add(V::set1(2.0f), e));
        const T t = V::mul(s, s);
        T poly = V::set1(1.0f / 17.0f);
        poly = V::fma(poly, t, V::set1(1.0f / 15.0f));
        poly = V::fma(poly, t, V::set1(1.0f / 13.0f));
        poly = V::fma(poly, t, V::set1(1.0f / 11.0f));
        poly = V::fma(poly, t, V::set1(1.0f / 9.0f));
        poly = V::fma(poly, t, V::set1(1.0f / 7.0f));
        poly = V::fma(poly, t, V::set1(1.0f / 5.0f));
        poly = V::fma(poly, t, V::set1(1.0f / 3.0f));
        poly = V::fma(poly, t, V::set1(1.0f));
        return V::mul(V::add(s, s), poly);
    }

    // row_loss (n,) gets sum_j softplus(-z_ij L_ij). With gradients (dx_acc non-null): dx / dy fp32 accumulators of
    // (round_up(n, MC) x dp) and (round_up(m, NC) x dp), dscale / drow (n,), dcol (m,), all zero-initialised here.
    // zero = false: dx / dy are in-place accumulators (n + kSpareRows / m + kSpareRows rows), added to.
    void run(float* row_loss, float* dx_acc, float* dy_acc, float* dscale, float* drow, float* dcol,
             bool zero = true) const {
        const bool grads = dx_acc != nullptr;
        const int64_t mpad_total = round_up(p.m, NC);
        std::vector<float> dcol_acc(grads ? mpad_total : 0, 0.0f);
        std::fill(row_loss, row_loss + p.n, 0.0f);
        if (grads) {
            if (zero) {
                std::fill(dx_acc, dx_acc + round_up(p.n, MC) * tiles.dp, 0.0f);
                std::fill(dy_acc, dy_acc + mpad_total * tiles.dp, 0.0f);
            }
            std::fill(dscale, dscale + p.n, 0.0f);
            std::fill(drow, drow + p.n, 0.0f);
        }
        tiles.sweep(grads, [&](Scratch& s, int64_t i0, int64_t mc, int64_t j0, int64_t nc) {
            if (grads) {
                tile_epilogue<true>(s, i0, mc, j0, nc, row_loss, dscale, drow, dcol_acc.data() + j0);
                tiles.gradient_gemms(s, i0, mc, j0, nc, dx_acc, dy_acc);
            } else {
                tile_epilogue<false>(s, i0, mc, j0, nc, row_loss, nullptr, nullptr, nullptr);
            }
        });
        if (grads)
            for (int64_t j = 0; j < p.m; ++j) dcol[j] = dcol_acc[j];
    }

    // One tile: softplus sums into row_loss and, with GRADS, scaled gradient weights scale_i * G_ij written over
    // the similarities (for the sweep's gradient GEMMs) and the tile's dscale / drow / dcol sums. Padded columns
    // carry col_bias = -inf: u = -inf there, so they add 0 to the loss and get G = 0.
    template <bool GRADS>
    void tile_epilogue(Scratch& s, int64_t i0, int64_t mc, int64_t j0, int64_t nc, float* row_loss, float* dscale,
                       float* drow, float* dcol) const {
        const int64_t nv = round_up(nc, L) / L;
        float* sign = s.col_aux3.data();  // -z of the current row for the tile's columns
        std::fill(sign, sign + NC, 1.0f);
        float* dcol_tile = s.col_aux.data();
        if (GRADS) std::fill(dcol_tile, dcol_tile + NC, 0.0f);
        const float* cb = s.col_bias.data();
        const T zero = V::zero(), one = V::set1(1.0f);
        for (int64_t i = 0; i < mc; ++i) {
            const int64_t row_index = i0 + i;
            const int64_t* first = pos.cols + pos.ptr[row_index];
            const int64_t* last = pos.cols + pos.ptr[row_index + 1];
            const int64_t* lo = std::lower_bound(first, last, j0);
            const int64_t* hi = std::lower_bound(lo, last, j0 + nc);
            for (const int64_t* q = lo; q < hi; ++q) sign[*q - j0] = -1.0f;

            const T a = V::set1(p.scale[row_index]), r = V::set1(p.row_bias[row_index]);
            float* row = s.tile.data() + i * NC;
            T loss = zero, da = zero, dr = zero;
            for (int64_t v = 0; v < nv; ++v) {
                const T sim = V::load(row + L * v);
                const T sgn = V::load(sign + L * v);
                const T u = V::mul(sgn, V::add(V::fma(a, sim, r), V::load(cb + L * v)));
                const T e = V::exp(V::sub(zero, V::max(u, V::sub(zero, u))));  // exp(-|u|)
                loss = V::add(loss, V::add(V::max(zero, u), log1p_unit(e)));
                if (GRADS) {
                    const T inv = V::div(one, V::add(one, e));
                    const T g = V::mul(sgn, V::select_nonneg(u, inv, V::mul(e, inv)));
                    da = V::fma(g, sim, da);
                    dr = V::add(dr, g);
                    V::store(dcol_tile + L * v, V::add(V::load(dcol_tile + L * v), g));
                    V::store(row + L * v, V::mul(a, g));
                }
            }
            for (const int64_t* q = lo; q < hi; ++q) sign[*q - j0] = 1.0f;
            row_loss[row_index] += V::reduce_add(loss);
            if (GRADS) {
                dscale[row_index] += V::reduce_add(da);
                drow[row_index] += V::reduce_add(dr);
            }
        }
        if (GRADS)
            for (int64_t v = 0; v < nv; ++v)
                V::store(dcol + L * v, V::add(V::load(dcol + L * v), V::load(dcol_tile + L * v)));
    }
};

// dx / dy (when non-null) are written in fp32 (added to, with p.grad_accumulate): the caller scales them by the loss
// weight and rounds once.
template <class V>
void sigmoid_loss(const Problem& p, const Positives& pos, float* row_loss, float* dx, float* dy, float* dscale,
                  float* drow, float* dcol, int threads) {
    SigmoidKernel<V> k(p, pos, threads);
    if (dx == nullptr) {
        k.run(row_loss, nullptr, nullptr, nullptr, nullptr, nullptr);
        return;
    }
    if (p.grad_in_place) {
        k.run(row_loss, dx, dy, dscale, drow, dcol, false);
        return;
    }
    std::vector<float> dx_acc(round_up(p.n, Shape<V>::MC) * k.tiles.dp), dy_acc(round_up(p.m, Shape<V>::NC) * k.tiles.dp);
    k.run(row_loss, dx_acc.data(), dy_acc.data(), dscale, drow, dcol);
    store_rows(dx_acc.data(), p.n, p.d, k.tiles.dp, kF32, dx, p.grad_accumulate);
    store_rows(dy_acc.data(), p.m, p.d, k.tiles.dp, kF32, dy, p.grad_accumulate);
}

}  // namespace MMCL_ISA
}  // namespace mmcl
