// pybind11 bindings of the compiled CPU core. No math here. Tensors come in as typed views (`Matrix`, `Vector`:
// data pointer, sizes, row stride, dtype code) grouped into problem structs (`AffineProblem`, `Positives`, the
// gradient outputs), and every size, dtype and stride is checked against the others before a kernel runs, so a
// mistake on the Python side raises ValueError instead of reading out of bounds. The GIL is released around the
// kernels, and the ISA build is chosen once at import by CPU feature detection (isa.cpp; MMCL_FAST_CPU_ISA names
// another build).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "isa.h"

namespace py = pybind11;

namespace {

const mmcl::KernelTable* active = nullptr;

enum Code : int { kF32 = mmcl::kF32, kBF16 = mmcl::kBF16, kF16 = mmcl::kF16, kI64 = 3 };

const char* code_name(int code) {
    switch (code) {
        case kF32: return "float32";
        case kBF16: return "bfloat16";
        case kF16: return "float16";
        case kI64: return "int64";
        default: return "unknown";
    }
}

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// A (rows, cols) matrix with unit column stride: element (r, c) at data + (r * row_stride + c) * itemsize.
struct Matrix {
    std::uintptr_t data;
    int64_t rows, cols, row_stride;
    int dtype;
    Matrix(std::uintptr_t data_, int64_t rows_, int64_t cols_, int64_t row_stride_, int dtype_)
        : data(data_), rows(rows_), cols(cols_), row_stride(row_stride_), dtype(dtype_) {
        if (data == 0) fail("Matrix: null data pointer");
        if (rows < 1 || cols < 1) fail("Matrix: rows and cols must be >= 1, got " + std::to_string(rows) + " x " + std::to_string(cols));
        if (dtype != kF32 && dtype != kBF16 && dtype != kF16) fail("Matrix: dtype code must be 0, 1 or 2 (float32, bfloat16, float16)");
        if (rows > 1 && row_stride < cols) fail("Matrix: row_stride " + std::to_string(row_stride) + " < cols " + std::to_string(cols));
    }
};

// A (length,) contiguous vector.
struct Vector {
    std::uintptr_t data;
    int64_t length;
    int dtype;
    Vector(std::uintptr_t data_, int64_t length_, int dtype_) : data(data_), length(length_), dtype(dtype_) {
        if (length < 0) fail("Vector: negative length");
        if (length > 0 && data == 0) fail("Vector: null data pointer");
        if (dtype != kF32 && dtype != kI64) fail("Vector: dtype code must be 0 (float32) or 3 (int64)");
    }
};

void expect_vector(const Vector& v, const char* name, int64_t length, int dtype) {
    if (v.length != length || v.dtype != dtype)
        fail(std::string(name) + ": expected a (" + std::to_string(length) + ",) " + code_name(dtype) + " vector, got (" +
             std::to_string(v.length) + ",) " + code_name(v.dtype));
}

void expect_output_matrix(const Matrix& out, const char* name, int64_t rows, int64_t cols, int dtype) {
    if (out.rows != rows || out.cols != cols || out.dtype != dtype || (rows > 1 && out.row_stride != cols))
        fail(std::string(name) + ": expected a contiguous (" + std::to_string(rows) + ", " + std::to_string(cols) + ") " +
             code_name(dtype) + " matrix, got (" + std::to_string(out.rows) + ", " + std::to_string(out.cols) +
             ") " + code_name(out.dtype) + " with row stride " + std::to_string(out.row_stride));
}

template <class T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

template <class T>
T* ptr(const std::optional<Vector>& v) { return v && v->length ? ptr<T>(v->data) : nullptr; }

// L_ij = scale_i <x_i, y_j> + row_bias_i + col_bias_j: the operands every kernel shares.
struct AffineProblem {
    Matrix x, y;
    Vector scale, row_bias, col_bias;
    AffineProblem(const Matrix& x_, const Matrix& y_, const Vector& scale_, const Vector& row_bias_,
                  const Vector& col_bias_)
        : x(x_), y(y_), scale(scale_), row_bias(row_bias_), col_bias(col_bias_) {
        if (x.cols != y.cols) fail("AffineProblem: x and y have different feature sizes (" + std::to_string(x.cols) + " and " + std::to_string(y.cols) + ")");
        if (x.dtype != y.dtype) fail("AffineProblem: x and y have different dtypes");
        expect_vector(scale, "AffineProblem.scale", x.rows, kF32);
        expect_vector(row_bias, "AffineProblem.row_bias", x.rows, kF32);
        expect_vector(col_bias, "AffineProblem.col_bias", y.rows, kF32);
    }
    mmcl::Problem problem() const {
        return mmcl::Problem{ptr<const void>(x.data), x.row_stride, ptr<const void>(y.data), y.row_stride, x.dtype,
                             x.rows, y.rows, x.cols, ptr<const float>(scale.data), ptr<const float>(row_bias.data),
                             ptr<const float>(col_bias.data)};
    }
};

// The gradients a backward writes: dx / dy (contiguous, of the dtype the kernel documents) and the three vectors.
struct Gradients {
    Matrix dx, dy;
    Vector dscale, drow, dcol;
    Gradients(const Matrix& dx_, const Matrix& dy_, const Vector& dscale_, const Vector& drow_, const Vector& dcol_)
        : dx(dx_), dy(dy_), dscale(dscale_), drow(drow_), dcol(dcol_) {}
    void check(const AffineProblem& pr, int feature_dtype) const {
        expect_output_matrix(dx, "Gradients.dx", pr.x.rows, pr.x.cols, feature_dtype);
        expect_output_matrix(dy, "Gradients.dy", pr.y.rows, pr.y.cols, feature_dtype);
        expect_vector(dscale, "Gradients.dscale", pr.x.rows, kF32);
        expect_vector(drow, "Gradients.drow", pr.x.rows, kF32);
        expect_vector(dcol, "Gradients.dcol", pr.y.rows, kF32);
    }
};

// In-place accumulation (Problem::grad_in_place): dx / dy are the kernel's fp32 accumulators, given with their full
// capacity in rows, which must leave kSpareRows past the problem's rows, and the kernel's padded row stride.
void check_in_place(const Gradients& out, const AffineProblem& pr, int64_t feature_block) {
    const int64_t stride = (pr.x.cols + feature_block - 1) / feature_block * feature_block;
    auto check = [&](const Matrix& acc, const char* name, int64_t rows) {
        if (acc.dtype != kF32 || acc.cols != pr.x.cols || acc.row_stride != stride ||
            acc.rows < rows + mmcl::kSpareRows)
            fail(std::string(name) + ": an in-place accumulator must be float32 with " + std::to_string(pr.x.cols) +
                 " columns, row stride " + std::to_string(stride) + " and at least " +
                 std::to_string(rows + mmcl::kSpareRows) + " rows of capacity, got (" + std::to_string(acc.rows) +
                 ", " + std::to_string(acc.cols) + ") " + code_name(acc.dtype) + " with row stride " +
                 std::to_string(acc.row_stride));
    };
    check(out.dx, "Gradients.dx", pr.x.rows);
    check(out.dy, "Gradients.dy", pr.y.rows);
    expect_vector(out.dscale, "Gradients.dscale", pr.x.rows, kF32);
    expect_vector(out.drow, "Gradients.drow", pr.x.rows, kF32);
    expect_vector(out.dcol, "Gradients.dcol", pr.y.rows, kF32);
}

// The linear terms folded into the LSE backward's gradient weights (dispatch.h: Extras); each optional.
struct LseExtras {
    std::optional<Vector> row_const, col_const, row_target, row_target_grad, col_target, col_target_grad;
};

// CSR positives of the sigmoid loss, checked in full (O(n + positives)): the kernel indexes with them.
struct PositivePairs {
    Vector ptr_, cols;
    PositivePairs(const Vector& ptr_v, const Vector& cols_v) : ptr_(ptr_v), cols(cols_v) {}
    mmcl::Positives check(int64_t n, int64_t m) const {
        expect_vector(ptr_, "Positives.ptr", n + 1, kI64);
        if (cols.dtype != kI64) fail("Positives.cols must be int64");
        const int64_t* p = ptr<const int64_t>(ptr_.data);
        const int64_t* c = cols.length ? ptr<const int64_t>(cols.data) : nullptr;
        if (p[0] != 0 || p[n] != cols.length) fail("Positives.ptr must start at 0 and end at len(cols)");
        for (int64_t i = 0; i < n; ++i) {
            if (p[i + 1] < p[i]) fail("Positives.ptr must be non-decreasing");
            for (int64_t k = p[i]; k < p[i + 1]; ++k) {
                if (c[k] < 0 || c[k] >= m) fail("Positives.cols: column index " + std::to_string(c[k]) + " outside [0, " + std::to_string(m) + ")");
                if (k > p[i] && c[k] <= c[k - 1]) fail("Positives.cols must be strictly increasing within each row");
            }
        }
        return mmcl::Positives{p, c};
    }
};

int check_threads(int threads) {
    if (threads < 1) fail("threads must be >= 1");
    return threads;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "mmcl_fast compiled CPU core: fused streamed log-sum-exp and sigmoid losses over affine similarities";
    const char* env = std::getenv("MMCL_FAST_CPU_ISA");
    active = mmcl::select_isa(env ? env : "auto");

    py::class_<Matrix>(m, "Matrix", "A (rows, cols) matrix view with unit column stride (dtype 0 f32, 1 bf16, 2 f16).")
        .def(py::init<std::uintptr_t, int64_t, int64_t, int64_t, int>(), py::arg("data"), py::arg("rows"),
             py::arg("cols"), py::arg("row_stride"), py::arg("dtype"))
        .def_readonly("rows", &Matrix::rows).def_readonly("cols", &Matrix::cols)
        .def_readonly("row_stride", &Matrix::row_stride).def_readonly("dtype", &Matrix::dtype);
    py::class_<Vector>(m, "Vector", "A contiguous (length,) vector view (dtype 0 f32, 3 int64).")
        .def(py::init<std::uintptr_t, int64_t, int>(), py::arg("data"), py::arg("length"), py::arg("dtype"))
        .def_readonly("length", &Vector::length).def_readonly("dtype", &Vector::dtype);
    py::class_<AffineProblem>(m, "AffineProblem", "L_ij = scale_i <x_i, y_j> + row_bias_i + col_bias_j (sizes checked).")
        .def(py::init<const Matrix&, const Matrix&, const Vector&, const Vector&, const Vector&>(), py::arg("x"),
             py::arg("y"), py::arg("scale"), py::arg("row_bias"), py::arg("col_bias"));
    py::class_<Gradients>(m, "Gradients", "Outputs of a backward: dx, dy (matrices), dscale, drow, dcol (vectors).")
        .def(py::init<const Matrix&, const Matrix&, const Vector&, const Vector&, const Vector&>(), py::arg("dx"),
             py::arg("dy"), py::arg("dscale"), py::arg("drow"), py::arg("dcol"));
    py::class_<LseExtras>(m, "LseExtras", "Linear terms folded into the LSE gradient weights (each optional).")
        .def(py::init([](std::optional<Vector> row_const, std::optional<Vector> col_const,
                         std::optional<Vector> row_target, std::optional<Vector> row_target_grad,
                         std::optional<Vector> col_target, std::optional<Vector> col_target_grad) {
                 return LseExtras{row_const, col_const, row_target, row_target_grad, col_target, col_target_grad};
             }),
             py::arg("row_const") = py::none(), py::arg("col_const") = py::none(), py::arg("row_target") = py::none(),
             py::arg("row_target_grad") = py::none(), py::arg("col_target") = py::none(),
             py::arg("col_target_grad") = py::none());
    py::class_<PositivePairs>(m, "Positives", "CSR positive pairs: row i's columns are cols[ptr[i]:ptr[i+1]], sorted.")
        .def(py::init<const Vector&, const Vector&>(), py::arg("ptr"), py::arg("cols"));

    m.def("isa", []() { return std::string(active->isa); }, "The ISA build in use (e.g. 'avx2', 'neon', 'scalar').");
    m.def("feature_block", []() { return active->feature_block; },
          "The feature block of the ISA build in use: in-place fp32 accumulators have row stride d rounded up to it.");
    m.attr("spare_rows") = mmcl::kSpareRows;
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
          [](const AffineProblem& pr, std::optional<Vector> row_lse, std::optional<Vector> col_lse, int threads) {
              if (row_lse) expect_vector(*row_lse, "row_lse", pr.x.rows, kF32);
              if (col_lse) expect_vector(*col_lse, "col_lse", pr.y.rows, kF32);
              if (!row_lse && !col_lse) fail("lse_forward: need row_lse, col_lse or both");
              const mmcl::Problem p = pr.problem();
              check_threads(threads);
              py::gil_scoped_release release;
              active->forward(p, ptr<float>(row_lse), ptr<float>(col_lse), threads);
          },
          py::arg("problem"), py::arg("row_lse"), py::arg("col_lse"), py::arg("threads"),
          "Row/column LSE of the affine logits into float32 vectors (None = skip that side).");

    m.def("lse_backward",
          [](const AffineProblem& pr, std::optional<Vector> row_lse, std::optional<Vector> col_lse,
             std::optional<Vector> grad_row, std::optional<Vector> grad_col, const LseExtras& ex,
             const Gradients& out, int threads, bool accumulate, bool in_place) {
              if (row_lse.has_value() != grad_row.has_value() || col_lse.has_value() != grad_col.has_value())
                  fail("lse_backward: an LSE needs its gradient and vice versa");
              if (row_lse) { expect_vector(*row_lse, "row_lse", pr.x.rows, kF32); expect_vector(*grad_row, "grad_row", pr.x.rows, kF32); }
              if (col_lse) { expect_vector(*col_lse, "col_lse", pr.y.rows, kF32); expect_vector(*grad_col, "grad_col", pr.y.rows, kF32); }
              const int64_t n = pr.x.rows, mm = pr.y.rows;
              if (ex.row_const) expect_vector(*ex.row_const, "row_const", n, kF32);
              if (ex.col_const) expect_vector(*ex.col_const, "col_const", mm, kF32);
              if (ex.row_target.has_value() != ex.row_target_grad.has_value() ||
                  ex.col_target.has_value() != ex.col_target_grad.has_value())
                  fail("lse_backward: a target index vector needs its gradient vector and vice versa");
              if (ex.row_target) { expect_vector(*ex.row_target, "row_target", n, kI64); expect_vector(*ex.row_target_grad, "row_target_grad", n, kF32); }
              if (ex.col_target) { expect_vector(*ex.col_target, "col_target", mm, kI64); expect_vector(*ex.col_target_grad, "col_target_grad", mm, kF32); }
              // target indices are read as tile offsets: check their range here
              auto check_range = [](const std::optional<Vector>& t, int64_t bound, const char* name) {
                  if (!t) return;
                  const int64_t* v = ptr<const int64_t>(t->data);
                  for (int64_t k = 0; k < t->length; ++k)
                      if (v[k] < 0 || v[k] >= bound) fail(std::string(name) + ": index outside [0, " + std::to_string(bound) + ")");
              };
              check_range(ex.row_target, mm, "row_target");
              check_range(ex.col_target, n, "col_target");
              // dx / dy in the features' dtype, or fp32 (partials of a cross-rank sum, rounded once at the owner)
              const int grad_dtype = out.dx.dtype == kF32 ? kF32 : pr.x.dtype;
              if (in_place && !accumulate) fail("lse_backward: in_place=True needs accumulate=True");
              if (in_place) check_in_place(out, pr, active->feature_block);
              else out.check(pr, grad_dtype);
              if (accumulate && grad_dtype != kF32) fail("lse_backward: accumulate=True needs float32 dx / dy");
              mmcl::Extras extras;
              extras.row_const = ptr<const float>(ex.row_const);
              extras.col_const = ptr<const float>(ex.col_const);
              extras.row_target = ptr<const int64_t>(ex.row_target);
              extras.row_target_grad = ptr<const float>(ex.row_target_grad);
              extras.col_target = ptr<const int64_t>(ex.col_target);
              extras.col_target_grad = ptr<const float>(ex.col_target_grad);
              mmcl::Problem p = pr.problem();
              p.grad_dtype = grad_dtype;
              p.grad_accumulate = accumulate;
              p.grad_in_place = in_place;
              check_threads(threads);
              py::gil_scoped_release release;
              active->backward(p, ptr<const float>(row_lse), ptr<const float>(col_lse), ptr<const float>(grad_row),
                               ptr<const float>(grad_col), extras, ptr<void>(out.dx.data), ptr<void>(out.dy.data),
                               ptr<float>(out.dscale.data), ptr<float>(out.drow.data), ptr<float>(out.dcol.data),
                               threads);
          },
          py::arg("problem"), py::arg("row_lse"), py::arg("col_lse"), py::arg("grad_row"), py::arg("grad_col"),
          py::arg("extras"), py::arg("out"), py::arg("threads"), py::arg("accumulate") = false,
          py::arg("in_place") = false,
          "Gradients of sum(grad_row*row_lse) + sum(grad_col*col_lse) + the folded linear terms; dx/dy in the "
          "features' dtype or float32 (accumulate: added to fp32 dx/dy instead of overwriting them; in_place: dx/dy "
          "are the kernel's own accumulators, see check_in_place).");

    m.def("sigmoid_loss",
          [](const AffineProblem& pr, const PositivePairs& positives, const Vector& row_loss,
             std::optional<Gradients> out, int threads, bool accumulate, bool in_place) {
              expect_vector(row_loss, "row_loss", pr.x.rows, kF32);
              const mmcl::Positives pos = positives.check(pr.x.rows, pr.y.rows);
              if (in_place && !(accumulate && out)) fail("sigmoid_loss: in_place=True needs out and accumulate=True");
              if (out && in_place) check_in_place(*out, pr, active->feature_block);
              else if (out) out->check(pr, kF32);
              mmcl::Problem p = pr.problem();
              p.grad_accumulate = accumulate;
              p.grad_in_place = in_place;
              check_threads(threads);
              py::gil_scoped_release release;
              if (out)
                  active->sigmoid(p, pos, ptr<float>(row_loss.data), ptr<float>(out->dx.data), ptr<float>(out->dy.data),
                                  ptr<float>(out->dscale.data), ptr<float>(out->drow.data), ptr<float>(out->dcol.data),
                                  threads);
              else
                  active->sigmoid(p, pos, ptr<float>(row_loss.data), nullptr, nullptr, nullptr, nullptr, nullptr, threads);
          },
          py::arg("problem"), py::arg("positives"), py::arg("row_loss"), py::arg("out"), py::arg("threads"),
          py::arg("accumulate") = false, py::arg("in_place") = false,
          "Row sums of softplus(-z L) (z = +1 on positives, -1 elsewhere) and, with `out`, the gradients of their "
          "total: fp32 dx / dy (accumulate: added to them; in_place: they are the kernel's own accumulators), dscale, "
          "drow, dcol (one fused sweep).");
}
