// Standalone test of the compiled CPU core: no Python, no torch. For one ISA build (argv[1]) it checks the
// forward LSEs and every gradient of the backward (dx, dy, dscale, drow, dcol, with all the folded linear terms),
// and the fused sigmoid loss with its gradients (random CSR positives, logit scale up to 100, bias down to -20),
// against a double-precision reference on the same rounded inputs, at awkward sizes (N = 1, primes, sizes that
// are not multiples of any tile, D = 1, D = 1000), for fp32 / bf16 / fp16 inputs, strided rows and 1 or 3
// threads. Exit codes: 0 pass, 1 a check failed, 77 this CPU lacks the ISA (ctest reports a skip), 2 bad usage.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "half.h"
#include "isa.h"

namespace {

using mmcl::kBF16;
using mmcl::kF16;
using mmcl::kF32;

const char* dtype_name(int dtype) { return dtype == kF32 ? "fp32" : dtype == kBF16 ? "bf16" : "fp16"; }

// Tolerances (docs/design.md#precision, tests/tolerances.py): fp32 math on the rounded inputs is good to 1e-5 relative for every
// fp32 output; feature gradients of 16-bit inputs are rounded once to the input dtype.
constexpr double kF32Rtol = 1e-5;
constexpr double kHalfGradRtol = 4e-3;

// Features of one dtype: the raw buffer the kernel reads (rows at stride `rs`) and the rounded values as doubles.
struct Features {
    int64_t rows, d, rs;
    int dtype;
    std::vector<float> f32;
    std::vector<uint16_t> half;
    std::vector<double> value;  // rows x d, the exact values the kernel sees

    Features(int64_t rows_, int64_t d_, int dtype_, std::mt19937_64& rng)
        : rows(rows_), d(d_), rs(d_ + 3), dtype(dtype_), value(rows_ * d_) {
        std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(static_cast<float>(d_)));
        (dtype == kF32 ? f32.resize(rows * rs, NAN) : half.resize(rows * rs, 0x7fc0));  // padding poisoned
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < d; ++k) {
                const float v = normal(rng);
                if (dtype == kF32) {
                    f32[r * rs + k] = v;
                    value[r * d + k] = v;
                } else {
                    const uint16_t h = dtype == kBF16 ? float_to_bf16_bits(v) : float_to_f16_bits(v);
                    half[r * rs + k] = h;
                    value[r * d + k] = dtype == kBF16 ? bf16_bits_to_float(h) : f16_bits_to_float(h);
                }
            }
    }
    const void* data() const { return dtype == kF32 ? static_cast<const void*>(f32.data()) : half.data(); }
    double out_value(const std::vector<float>& f, const std::vector<uint16_t>& h, int64_t i) const {
        if (dtype == kF32) return f[i];
        return dtype == kBF16 ? bf16_bits_to_float(h[i]) : f16_bits_to_float(h[i]);
    }
};

std::vector<float> uniform(int64_t size, float lo, float hi, std::mt19937_64& rng) {
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(size);
    for (float& e : v) e = u(rng);
    return v;
}

// max |actual - expected| / max |expected| (a single bad entry fails), inf if anything is not finite.
double rel_err(const std::vector<double>& actual, const std::vector<double>& expected) {
    double diff = 0.0, scale = 0.0;
    for (size_t i = 0; i < expected.size(); ++i) {
        if (!std::isfinite(actual[i])) return INFINITY;
        diff = std::max(diff, std::fabs(actual[i] - expected[i]));
        scale = std::max(scale, std::fabs(expected[i]));
    }
    return scale > 0.0 ? diff / scale : diff;
}

struct Checker {
    int failures = 0, checks = 0;
    void expect(const std::string& what, const std::vector<double>& actual, const std::vector<double>& expected,
                double rtol) {
        ++checks;
        const double err = rel_err(actual, expected);
        if (!(err <= rtol)) {
            ++failures;
            std::printf("  FAIL %s: relative error %.3e > %.1e\n", what.c_str(), err, rtol);
        }
    }
};

void run_case(const mmcl::KernelTable& table, int64_t n, int64_t m, int64_t d, int dtype, int threads,
              std::mt19937_64& rng, Checker& check) {
    const Features x(n, d, dtype, rng), y(m, d, dtype, rng);
    const std::vector<float> scale = uniform(n, 0.5f, 30.0f, rng);
    const std::vector<float> row_bias = uniform(n, -2.0f, 2.0f, rng), col_bias = uniform(m, -2.0f, 2.0f, rng);
    const mmcl::Problem p{x.data(), x.rs, y.data(), y.rs, dtype, n, m, d, scale.data(), row_bias.data(),
                          col_bias.data()};

    // double reference: logits, LSEs
    std::vector<double> sim(n * m), logit(n * m), row_lse(n), col_lse(m, -INFINITY);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < m; ++j) {
            double s = 0.0;
            for (int64_t k = 0; k < d; ++k) s += x.value[i * d + k] * y.value[j * d + k];
            sim[i * m + j] = s;
            logit[i * m + j] = scale[i] * s + row_bias[i] + col_bias[j];
        }
    auto lse = [&](bool rows, int64_t idx) {
        const int64_t count = rows ? m : n;
        double mx = -INFINITY, sum = 0.0;
        for (int64_t t = 0; t < count; ++t) mx = std::max(mx, rows ? logit[idx * m + t] : logit[t * m + idx]);
        for (int64_t t = 0; t < count; ++t) sum += std::exp((rows ? logit[idx * m + t] : logit[t * m + idx]) - mx);
        return mx + std::log(sum);
    };
    for (int64_t i = 0; i < n; ++i) row_lse[i] = lse(true, i);
    for (int64_t j = 0; j < m; ++j) col_lse[j] = lse(false, j);

    const std::string tag = std::string(dtype_name(dtype)) + " n=" + std::to_string(n) + " m=" + std::to_string(m) +
                            " d=" + std::to_string(d) + " threads=" + std::to_string(threads);
    std::vector<float> k_row(n), k_col(m);
    table.forward(p, k_row.data(), k_col.data(), threads);
    check.expect(tag + " row_lse", std::vector<double>(k_row.begin(), k_row.end()), row_lse, kF32Rtol);
    check.expect(tag + " col_lse", std::vector<double>(k_col.begin(), k_col.end()), col_lse, kF32Rtol);

    // backward with every folded term: G_ij = grow_i e^(L-rl_i) + gcol_j e^(L-cl_j) + rc_i + cc_j + targets
    const std::vector<float> grad_row = uniform(n, -1.0f, 1.0f, rng), grad_col = uniform(m, -1.0f, 1.0f, rng);
    const std::vector<float> row_const = uniform(n, -0.1f, 0.1f, rng), col_const = uniform(m, -0.1f, 0.1f, rng);
    const std::vector<float> row_target_grad = uniform(n, -1.0f, 1.0f, rng);
    const std::vector<float> col_target_grad = uniform(m, -1.0f, 1.0f, rng);
    std::vector<int64_t> row_target(n), col_target(m);
    for (int64_t i = 0; i < n; ++i) row_target[i] = static_cast<int64_t>(rng() % static_cast<uint64_t>(m));
    for (int64_t j = 0; j < m; ++j) col_target[j] = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
    mmcl::Extras ex;
    ex.row_const = row_const.data();
    ex.col_const = col_const.data();
    ex.row_target = row_target.data();
    ex.row_target_grad = row_target_grad.data();
    ex.col_target = col_target.data();
    ex.col_target_grad = col_target_grad.data();

    std::vector<double> dx(n * d, 0.0), dy(m * d, 0.0), dscale(n, 0.0), drow(n, 0.0), dcol(m, 0.0);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < m; ++j) {
            double g = grad_row[i] * std::exp(logit[i * m + j] - row_lse[i]) +
                       grad_col[j] * std::exp(logit[i * m + j] - col_lse[j]) + row_const[i] + col_const[j];
            if (row_target[i] == j) g += row_target_grad[i];
            if (col_target[j] == i) g += col_target_grad[j];
            dscale[i] += g * sim[i * m + j];
            drow[i] += g;
            dcol[j] += g;
            for (int64_t k = 0; k < d; ++k) {
                dx[i * d + k] += scale[i] * g * y.value[j * d + k];
                dy[j * d + k] += scale[i] * g * x.value[i * d + k];
            }
        }
    // The kernel reads the fp32 LSEs it produced, as the Python layer passes them.
    std::vector<float> dx_f(dtype == kF32 ? n * d : 0), dy_f(dtype == kF32 ? m * d : 0);
    std::vector<uint16_t> dx_h(dtype == kF32 ? 0 : n * d), dy_h(dtype == kF32 ? 0 : m * d);
    std::vector<float> k_dscale(n), k_drow(n), k_dcol(m);
    void* dx_out = dtype == kF32 ? static_cast<void*>(dx_f.data()) : dx_h.data();
    void* dy_out = dtype == kF32 ? static_cast<void*>(dy_f.data()) : dy_h.data();
    table.backward(p, k_row.data(), k_col.data(), grad_row.data(), grad_col.data(), ex, dx_out, dy_out,
                   k_dscale.data(), k_drow.data(), k_dcol.data(), threads);
    std::vector<double> a_dx(n * d), a_dy(m * d);
    for (int64_t i = 0; i < n * d; ++i) a_dx[i] = x.out_value(dx_f, dx_h, i);
    for (int64_t i = 0; i < m * d; ++i) a_dy[i] = y.out_value(dy_f, dy_h, i);
    const double feature_rtol = dtype == kF32 ? kF32Rtol : kHalfGradRtol;
    check.expect(tag + " dx", a_dx, dx, feature_rtol);
    check.expect(tag + " dy", a_dy, dy, feature_rtol);
    check.expect(tag + " dscale", std::vector<double>(k_dscale.begin(), k_dscale.end()), dscale, kF32Rtol);
    check.expect(tag + " drow", std::vector<double>(k_drow.begin(), k_drow.end()), drow, kF32Rtol);
    check.expect(tag + " dcol", std::vector<double>(k_dcol.begin(), k_dcol.end()), dcol, kF32Rtol);
}

// The fused sigmoid loss (sigmoid.h): row sums of softplus(-z L) and the gradients of their total, with random
// CSR positives (empty rows, several per row, rows whose positives straddle column blocks), against double.
void run_sigmoid_case(const mmcl::KernelTable& table, int64_t n, int64_t m, int64_t d, int dtype, int threads,
                      std::mt19937_64& rng, Checker& check) {
    const Features x(n, d, dtype, rng), y(m, d, dtype, rng);
    const std::vector<float> scale = uniform(n, 0.5f, 100.0f, rng);
    const std::vector<float> row_bias = uniform(n, -20.0f, 5.0f, rng), col_bias = uniform(m, -2.0f, 2.0f, rng);
    const mmcl::Problem p{x.data(), x.rs, y.data(), y.rs, dtype, n, m, d, scale.data(), row_bias.data(),
                          col_bias.data()};
    std::vector<int64_t> ptr(n + 1, 0), cols;
    std::vector<char> positive(n * m, 0);
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t kind = rng() % 4;  // 0: none, 1: one, 2: a few, 3: every third column
        for (int64_t j = 0; j < m; ++j) {
            const bool pos = kind == 1 ? j == i % m : kind == 2 ? rng() % 7 == 0 : kind == 3 ? j % 3 == 0 : false;
            if (pos) { cols.push_back(j); positive[i * m + j] = 1; }
        }
        ptr[i + 1] = static_cast<int64_t>(cols.size());
    }
    const mmcl::Positives pos{ptr.data(), cols.empty() ? nullptr : cols.data()};

    std::vector<double> row_loss(n, 0.0), dx(n * d, 0.0), dy(m * d, 0.0), dscale(n, 0.0), drow(n, 0.0), dcol(m, 0.0);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < m; ++j) {
            double s = 0.0;
            for (int64_t k = 0; k < d; ++k) s += x.value[i * d + k] * y.value[j * d + k];
            const double sign = positive[i * m + j] ? -1.0 : 1.0;  // -z
            const double u = sign * (scale[i] * s + row_bias[i] + col_bias[j]);
            row_loss[i] += std::max(u, 0.0) + std::log1p(std::exp(-std::fabs(u)));
            const double g = sign / (1.0 + std::exp(-u));
            dscale[i] += g * s;
            drow[i] += g;
            dcol[j] += g;
            for (int64_t k = 0; k < d; ++k) {
                dx[i * d + k] += scale[i] * g * y.value[j * d + k];
                dy[j * d + k] += scale[i] * g * x.value[i * d + k];
            }
        }
    const std::string tag = std::string("sigmoid ") + dtype_name(dtype) + " n=" + std::to_string(n) + " m=" +
                            std::to_string(m) + " d=" + std::to_string(d) + " threads=" + std::to_string(threads);
    std::vector<float> k_loss(n), k_dx(n * d), k_dy(m * d), k_dscale(n), k_drow(n), k_dcol(m);
    table.sigmoid(p, pos, k_loss.data(), nullptr, nullptr, nullptr, nullptr, nullptr, threads);
    check.expect(tag + " row_loss (no grad)", std::vector<double>(k_loss.begin(), k_loss.end()), row_loss, kF32Rtol);
    table.sigmoid(p, pos, k_loss.data(), k_dx.data(), k_dy.data(), k_dscale.data(), k_drow.data(), k_dcol.data(),
                  threads);
    auto as_double = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
    check.expect(tag + " row_loss", as_double(k_loss), row_loss, kF32Rtol);
    check.expect(tag + " dx", as_double(k_dx), dx, kF32Rtol);  // fp32 outputs: the caller rounds once
    check.expect(tag + " dy", as_double(k_dy), dy, kF32Rtol);
    check.expect(tag + " dscale", as_double(k_dscale), dscale, kF32Rtol);
    check.expect(tag + " drow", as_double(k_drow), drow, kF32Rtol);
    check.expect(tag + " dcol", as_double(k_dcol), dcol, kF32Rtol);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::printf("usage: %s ISA   (one of the builds compiled here, or 'auto')\n", argv[0]);
        return 2;
    }
    const std::string request = argv[1];
    const mmcl::KernelTable* table = nullptr;
    bool known = request == "auto";
    for (const mmcl::IsaBuild& b : mmcl::compiled_isas()) {
        if (request != b.table->isa) continue;
        known = true;
        if (!b.cpu_has()) {
            std::printf("SKIP: ISA %s is compiled but this CPU lacks its instructions\n", b.table->isa);
            return 77;
        }
    }
    if (!known) {
        std::printf("unknown ISA '%s'\n", request.c_str());
        return 2;
    }
    table = mmcl::select_isa(request);
    std::printf("ISA: %s\n", table->isa);

    // (n, m, d): single rows/columns, D = 1, primes, sizes that straddle every block (MC = 96, NC = 192) and
    // micro-tile (MR = 4..8, NR = 8..64), and D = 1000.
    const int64_t cases[][3] = {{1, 1, 1},     {1, 7, 3},     {5, 1, 2},    {13, 17, 1},  {97, 131, 7},
                                {193, 389, 64}, {211, 97, 33}, {31, 43, 1000}, {2, 200, 17}};
    std::mt19937_64 rng(20261130);
    Checker check;
    for (const auto& c : cases)
        for (int dtype : {kF32, kBF16, kF16})
            for (int threads : {1, 3}) {
                run_case(*table, c[0], c[1], c[2], dtype, threads, rng, check);
                run_sigmoid_case(*table, c[0], c[1], c[2], dtype, threads, rng, check);
            }
    std::printf("%s: %d checks, %d failed\n", table->isa, check.checks, check.failures);
    return check.failures == 0 ? 0 : 1;
}
