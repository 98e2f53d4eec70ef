// One table of entry points per ISA build; bindings.cpp picks one at import by CPU feature detection.
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
};

struct KernelTable {
    const char* isa;
    void (*forward)(const Problem&, float* row_lse, float* col_lse, int threads);
    void (*backward)(const Problem&, const float* row_lse, const float* col_lse, const float* grad_row,
                     const float* grad_col, void* dx, void* dy, float* dscale, float* drow, float* dcol,
                     int threads);
};

extern const KernelTable avx512_table;
extern const KernelTable scalar_table;
}  // namespace mmcl
