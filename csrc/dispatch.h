// One table of entry points per ISA build; isa.cpp lists the compiled ones and picks one by CPU feature detection.
#pragma once
#include <cstdint>

namespace mmcl {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct Problem {
    const void* x; int64_t x_rs;   // (n, d) with row stride x_rs elements, unit column stride
    const void* y; int64_t y_rs;   // (m, d)
    int dtype;
    int64_t n, m, d;
    const float* scale;     // (n,)
    const float* row_bias;  // (n,)
    const float* col_bias;  // (m,)
    int grad_dtype = -1;    // dtype of the dx / dy an LSE backward writes: -1 = dtype (the features'), or kF32
    bool grad_accumulate = false;  // fp32 dx / dy only: add the gradients to the outputs instead of overwriting them
    // With grad_accumulate: dx / dy are the kernel's fp32 accumulators themselves (row stride round_up(d,
    // feature_block), at least n + kSpareRows / m + kSpareRows rows: padded row blocks write past the last row), so
    // no accumulator-sized temporary is allocated and nothing is copied.
    bool grad_in_place = false;
};

// Rows past the last one that a kernel may write into an in-place accumulator (round_up(rows, MR or 32) - rows).
constexpr int64_t kSpareRows = 32;

// Linear terms of the loss folded into the gradient weights, so that dx / dy are rounded once:
//   G_ij += row_const_i + col_const_j + row_target_grad_i [j == row_target_i] + col_target_grad_j [i == col_target_j]
// (gradients of the row / column logit sums and of the positives' logits). Any pointer may be null.
struct Extras {
    const float* row_const = nullptr;        // (n,)
    const float* col_const = nullptr;        // (m,)
    const int64_t* row_target = nullptr;     // (n,) column index of each row's positive
    const float* row_target_grad = nullptr;  // (n,)
    const int64_t* col_target = nullptr;     // (m,) row index of each column's positive
    const float* col_target_grad = nullptr;  // (m,)
};

// Positive pairs of the sigmoid loss in CSR form: row i's positive columns are cols[ptr[i] .. ptr[i + 1]), sorted
// ascending, each in [0, m). ptr has n + 1 entries, ptr[0] = 0.
struct Positives {
    const int64_t* ptr = nullptr;
    const int64_t* cols = nullptr;
};

struct KernelTable {
    const char* isa;
    int feature_block;  // NR: the fp32 accumulators' row stride is d rounded up to a multiple of this
    void (*forward)(const Problem&, float* row_lse, float* col_lse, int threads);
    void (*backward)(const Problem&, const float* row_lse, const float* col_lse, const float* grad_row,
                     const float* grad_col, const Extras& extras, void* dx, void* dy, float* dscale, float* drow, float* dcol,
                     int threads);
    // Sigmoid loss: row sums of softplus(-z L) and, when dx is non-null, fp32 dx / dy and dscale / drow / dcol.
    void (*sigmoid)(const Problem&, const Positives&, float* row_loss, float* dx, float* dy, float* dscale,
                    float* drow, float* dcol, int threads);
};

// One table per translation unit; which ones exist depends on the target architecture (CMakeLists.txt), and
// isa.h lists the compiled ones.
extern const KernelTable amxbf16_table;     // x86-64
extern const KernelTable avx512bf16_table;  // x86-64
extern const KernelTable avx512_table;      // x86-64
extern const KernelTable avx2_table;        // x86-64
extern const KernelTable neon_table;        // aarch64
extern const KernelTable scalar_table;      // every target
}  // namespace mmcl
