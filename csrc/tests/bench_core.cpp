// Standalone timing driver of the compiled CPU core (no Python, no torch): the fused kernels of one ISA build at one
// size, for tuning a policy's blocks or checking a kernel change without rebuilding the Python module. Not a test:
// it checks nothing but that the outputs are finite (ctest runs it once at a tiny size so that it keeps building).
//
//   bench_core [isa=auto] [n=4096] [d=512] [threads=1] [repeats=3] [dtype=fp32|bf16|fp16]
//
// Prints, per kernel, the best of `repeats` wall times and GFLOP/s counted as GEMM work: the LSE forward 2 N^2 D,
// the LSE backward 6 N^2 D (similarity recompute + dX + dY), the sigmoid loss 2 N^2 D without gradients and
// 6 N^2 D with them. Inputs are unit-norm-scale Gaussian features, logit scale 10, bias -10 (SigLIP's init).
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "half.h"
#include "isa.h"

namespace {

template <class F>
double best_seconds(int repeats, F&& run) {
    double best = 1e300;
    for (int r = 0; r < repeats; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        run();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
}

bool all_finite(const std::vector<float>& v) {
    for (float e : v)
        if (!std::isfinite(e)) return false;
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string isa = argc > 1 ? argv[1] : "auto";
    const int64_t n = argc > 2 ? std::atoll(argv[2]) : 4096, d = argc > 3 ? std::atoll(argv[3]) : 512;
    const int threads = argc > 4 ? std::atoi(argv[4]) : 1, repeats = argc > 5 ? std::atoi(argv[5]) : 3;
    const std::string dtype_name = argc > 6 ? argv[6] : "fp32";
    const int dtype = dtype_name == "fp32" ? mmcl::kF32 : dtype_name == "bf16" ? mmcl::kBF16 : dtype_name == "fp16" ? mmcl::kF16 : -1;
    if (n < 1 || d < 1 || threads < 1 || repeats < 1 || dtype < 0) {
        std::fprintf(stderr, "usage: bench_core [isa=auto] [n>=1] [d>=1] [threads>=1] [repeats>=1] [fp32|bf16|fp16]\n");
        return 2;
    }
    const mmcl::KernelTable* table;
    try {
        table = mmcl::select_isa(isa);
    } catch (const std::runtime_error& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 77;
    }

    std::mt19937_64 rng(0);
    std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(static_cast<float>(d)));
    std::vector<float> xf(n * d), yf(n * d);
    for (float& v : xf) v = normal(rng);
    for (float& v : yf) v = normal(rng);
    std::vector<uint16_t> xh, yh;
    if (dtype != mmcl::kF32) {
        xh.resize(n * d);
        yh.resize(n * d);
        for (int64_t i = 0; i < n * d; ++i) {
            xh[i] = dtype == mmcl::kBF16 ? float_to_bf16_bits(xf[i]) : float_to_f16_bits(xf[i]);
            yh[i] = dtype == mmcl::kBF16 ? float_to_bf16_bits(yf[i]) : float_to_f16_bits(yf[i]);
        }
    }
    const void* x = dtype == mmcl::kF32 ? static_cast<const void*>(xf.data()) : xh.data();
    const void* y = dtype == mmcl::kF32 ? static_cast<const void*>(yf.data()) : yh.data();
    std::vector<float> scale(n, 10.0f), row_bias(n, -10.0f), col_bias(n, 0.0f), zero_bias(n, 0.0f);
    const mmcl::Problem sig{x, d, y, d, dtype, n, n, d, scale.data(), row_bias.data(), col_bias.data()};
    const mmcl::Problem lse{x, d, y, d, dtype, n, n, d, scale.data(), zero_bias.data(), zero_bias.data()};

    std::vector<int64_t> ptr(n + 1), cols(n);
    for (int64_t i = 0; i <= n; ++i) ptr[i] = i;
    for (int64_t i = 0; i < n; ++i) cols[i] = i;
    const mmcl::Positives pos{ptr.data(), cols.data()};

    std::vector<float> row_lse(n), col_lse(n), grad(n, 0.5f / static_cast<float>(n)), row_loss(n);
    std::vector<float> dx(n * d), dy(n * d), dscale(n), drow(n), dcol(n);
    const size_t half_elems = dtype == mmcl::kF32 ? 0 : static_cast<size_t>(n * d);
    std::vector<uint16_t> dxh(half_elems), dyh(half_elems);
    void* dx_out = dtype == mmcl::kF32 ? static_cast<void*>(dx.data()) : dxh.data();
    void* dy_out = dtype == mmcl::kF32 ? static_cast<void*>(dy.data()) : dyh.data();

    const double nnd = static_cast<double>(n) * n * d;
    std::printf("isa %s, n = m = %lld, d = %lld, %s, %d thread(s), best of %d\n", table->isa, static_cast<long long>(n),
                static_cast<long long>(d), dtype_name.c_str(), threads, repeats);
    auto report = [&](const char* what, double flops, double seconds, bool ok) {
        std::printf("  %-24s %10.4f s  %7.1f GFLOP/s%s\n", what, seconds, flops / seconds * 1e-9, ok ? "" : "  NON-FINITE");
        return ok;
    };
    bool ok = true;
    ok &= report("lse forward", 2 * nnd, best_seconds(repeats, [&] {
        table->forward(lse, row_lse.data(), col_lse.data(), threads);
    }), all_finite(row_lse) && all_finite(col_lse));
    ok &= report("lse backward", 6 * nnd, best_seconds(repeats, [&] {
        table->backward(lse, row_lse.data(), col_lse.data(), grad.data(), grad.data(), mmcl::Extras{}, dx_out, dy_out,
                        dscale.data(), drow.data(), dcol.data(), threads);
    }), all_finite(dscale) && (dtype != mmcl::kF32 || all_finite(dx)));
    ok &= report("sigmoid loss", 2 * nnd, best_seconds(repeats, [&] {
        table->sigmoid(sig, pos, row_loss.data(), nullptr, nullptr, nullptr, nullptr, nullptr, threads);
    }), all_finite(row_loss));
    ok &= report("sigmoid loss + grads", 6 * nnd, best_seconds(repeats, [&] {
        table->sigmoid(sig, pos, row_loss.data(), dx.data(), dy.data(), dscale.data(), drow.data(), dcol.data(), threads);
    }), all_finite(row_loss) && all_finite(dx) && all_finite(dy));
    return ok ? 0 : 1;
}
