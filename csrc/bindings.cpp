// pybind11 bindings of the compiled CPU core. No math here: tensors come in as data pointers, sizes and row
// strides (the Python side owns allocation and checks), the GIL is released around the kernels, and the ISA
// build is chosen once at import by CPU feature detection (isa.cpp; MMCL_FAST_CPU_ISA names another build).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "isa.h"

namespace py = pybind11;

namespace {

const mmcl::KernelTable* active = nullptr;

template <class T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

mmcl::Problem make_problem(std::uintptr_t x, int64_t x_rs, std::uintptr_t y, int64_t y_rs, int dtype, int64_t n,
                           int64_t m, int64_t d, std::uintptr_t scale, std::uintptr_t row_bias,
                           std::uintptr_t col_bias) {
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
    if (n < 1 || m < 1 || d < 1) throw std::invalid_argument("n, m and d must be >= 1");
    return mmcl::Problem{ptr<const void>(x), x_rs, ptr<const void>(y), y_rs, dtype, n, m, d,
                         ptr<const float>(scale), ptr<const float>(row_bias), ptr<const float>(col_bias)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "mmcl_fast compiled CPU core: fused streamed log-sum-exp over affine similarities";
    const char* env = std::getenv("MMCL_FAST_CPU_ISA");
    active = mmcl::select_isa(env ? env : "auto");

    m.def("isa", []() { return std::string(active->isa); }, "The ISA build in use (e.g. 'avx2', 'neon', 'scalar').");
    m.def("set_isa", [](const std::string& isa) { active = mmcl::select_isa(isa); return std::string(active->isa); },
          "Switch the ISA build ('auto' or a name from compiled_isas()); returns the one now in use.");
    m.def("compiled_isas",
          []() {
              std::vector<std::pair<std::string, bool>> out;
              for (const mmcl::IsaBuild& b : mmcl::compiled_isas()) out.emplace_back(b.table->isa, b.cpu_has());
              return out;
          },
          "[(name, this CPU runs it)] for every ISA build compiled into the module, best first.");

    m.def("lse_forward",
          [](std::uintptr_t x, int64_t x_rs, std::uintptr_t y, int64_t y_rs, int dtype, int64_t n, int64_t mm,
             int64_t d, std::uintptr_t scale, std::uintptr_t row_bias, std::uintptr_t col_bias,
             std::uintptr_t row_lse, std::uintptr_t col_lse, int threads) {
              const mmcl::Problem p = make_problem(x, x_rs, y, y_rs, dtype, n, mm, d, scale, row_bias, col_bias);
              py::gil_scoped_release release;
              active->forward(p, ptr<float>(row_lse), ptr<float>(col_lse), threads);
          },
          "Row/column LSE of scale_i*<x_i,y_j> + row_bias_i + col_bias_j (row_lse / col_lse may be 0 = skip).");

    m.def("lse_backward",
          [](std::uintptr_t x, int64_t x_rs, std::uintptr_t y, int64_t y_rs, int dtype, int64_t n, int64_t mm,
             int64_t d, std::uintptr_t scale, std::uintptr_t row_bias, std::uintptr_t col_bias,
             std::uintptr_t row_lse, std::uintptr_t col_lse, std::uintptr_t grad_row, std::uintptr_t grad_col,
             std::uintptr_t row_const, std::uintptr_t col_const, std::uintptr_t row_target,
             std::uintptr_t row_target_grad, std::uintptr_t col_target, std::uintptr_t col_target_grad,
             std::uintptr_t dx, std::uintptr_t dy, std::uintptr_t dscale, std::uintptr_t drow, std::uintptr_t dcol,
             int threads) {
              const mmcl::Problem p = make_problem(x, x_rs, y, y_rs, dtype, n, mm, d, scale, row_bias, col_bias);
              mmcl::Extras ex;
              ex.row_const = ptr<const float>(row_const);
              ex.col_const = ptr<const float>(col_const);
              ex.row_target = ptr<const int64_t>(row_target);
              ex.row_target_grad = ptr<const float>(row_target_grad);
              ex.col_target = ptr<const int64_t>(col_target);
              ex.col_target_grad = ptr<const float>(col_target_grad);
              if ((ex.row_target == nullptr) != (ex.row_target_grad == nullptr) ||
                  (ex.col_target == nullptr) != (ex.col_target_grad == nullptr))
                  throw std::invalid_argument("a target index vector needs its gradient vector and vice versa");
              py::gil_scoped_release release;
              active->backward(p, ptr<const float>(row_lse), ptr<const float>(col_lse), ptr<const float>(grad_row),
                               ptr<const float>(grad_col), ex, ptr<void>(dx), ptr<void>(dy), ptr<float>(dscale),
                               ptr<float>(drow), ptr<float>(dcol), threads);
          },
          "Gradients of sum(grad_row*row_lse) + sum(grad_col*col_lse) + the folded linear terms (0 = absent); "
          "dx/dy are written in the input dtype.");
}
