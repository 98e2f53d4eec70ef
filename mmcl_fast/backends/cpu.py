"""The `cpu` backend: the compiled C++ kernel (`mmcl_fast._C`, csrc/lse.h) behind the streamed-LSE primitive.

Forward: one sweep over MC x NC tiles gives row and column LSE (1 N*M*D GEMM-equivalent). Backward: one
recompute sweep gives dX, dY, dscale, drow_bias, dcol_bias (3 GEMM-equivalents). Memory: O((N + M) * D) fp32
gradient accumulators plus per-thread tiles; never N x M. bf16/fp16 features are read as they are: on a CPU with
AMX (Sapphire Rapids and later) all three GEMMs of bf16 inputs run on AMX tiles, the gradient weights split into
two bf16 parts (csrc/amx.h); with AVX512-BF16 alone the similarity GEMM runs on bf16 pairs (vdpbf16ps: exact
products, fp32 sums); otherwise, and for the gradient GEMMs, blocks are converted to fp32 one tile at a time. All
accumulation is fp32. Threads: `torch.get_num_threads()`.

ISA builds (csrc/isa.cpp): x86-64 has amx-bf16, avx512-bf16, avx512, avx2 (AVX2 + FMA + F16C) and the portable scalar build;
aarch64 has neon and scalar. The best one the CPU runs is picked at import; MMCL_FAST_CPU_ISA or `set_isa` names
another, and naming one the CPU lacks fails instead of executing unknown instructions (`set_isa`: RuntimeError;
the environment variable: the compiled core does not import, and backend="auto" falls back to "torch" with a warning).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._problem import Gradients, Problem

try:
    from .. import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def available() -> bool:
    return _C is not None


PORTABLE_ISA = "scalar"


def isa() -> str:
    """The ISA build of the kernel in use ('amx-bf16', 'avx512-bf16', 'avx512', 'avx2', 'neon' or 'scalar')."""
    return _module().isa()


def set_isa(name: str) -> str:
    """Use another ISA build ('auto' or a name from `compiled_isas()`); returns the one now in use.

    Raises RuntimeError if the name is not compiled here or the CPU lacks its instructions."""
    return _module().set_isa(name)


def compiled_isas() -> dict[str, bool]:
    """{ISA build compiled into mmcl_fast._C: whether this CPU runs it}, best first."""
    return dict(_module().compiled_isas())


def runnable_isas() -> list[str]:
    """The ISA builds this CPU runs, best first (the portable 'scalar' build is always last)."""
    return [name for name, ok in compiled_isas().items() if ok]


def portable_only() -> bool:
    """True when the only build this CPU runs is the portable one (a warning for `mmcl-fast info`/bench)."""
    return runnable_isas() == [PORTABLE_ISA]


def _module():
    if _C is None:
        raise RuntimeError(f"the compiled CPU core mmcl_fast._C failed to import ({_IMPORT_ERROR}); reinstall "
                           "mmcl_fast with `pip install -e .` or use backend='reference'")
    return _C


_FEATURE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_VECTOR_CODES = {torch.float32: 0, torch.int64: 3}


def _matrix(t: Tensor, name: str):
    if t.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got {name} on {t.device}")
    if t.dim() != 2 or t.dtype not in _FEATURE_CODES:
        raise TypeError(f"{name} must be a 2-D float32/bfloat16/float16 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"{name} must have unit stride along features, got strides {t.stride()}")
    return _module().Matrix(t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), _FEATURE_CODES[t.dtype])


def _vector(t: Tensor, name: str):
    if t.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got {name} on {t.device}")
    if t.dim() != 1 or t.dtype not in _VECTOR_CODES or not t.is_contiguous():
        raise TypeError(f"{name} must be a contiguous 1-D float32 or int64 tensor, got {t.dtype} of shape "
                        f"{tuple(t.shape)}")
    return _module().Vector(t.data_ptr(), t.shape[0], _VECTOR_CODES[t.dtype])


def _optional_vector(t, name: str):
    """A vector view, or None for an absent one (None or empty)."""
    return None if t is None or t.numel() == 0 else _vector(t, name)


def _affine(problem: Problem):
    x, y, scale, row_bias, col_bias = problem.operands
    return _module().AffineProblem(_matrix(x, "x"), _matrix(y, "y"), _vector(scale, "scale"),
                                   _vector(row_bias, "row_bias"), _vector(col_bias, "col_bias"))


def _capacity_rows(t: Tensor) -> int:
    """Rows of `t`'s width that its storage holds from its first element on (an accumulator's spare rows included)."""
    return (t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()) // max(t.shape[1], 1)


def _in_place_ok(out) -> bool:
    """Whether (dx, dy) can be the kernel's own accumulators: fp32, contiguous, spare rows, and a row stride (d)
    that is a multiple of the build's feature block (otherwise the kernel's padded layout differs)."""
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.shape[1] % _module().feature_block() == 0
               and _capacity_rows(t) >= t.shape[0] + _module().spare_rows for t in out)


def _accumulator_matrix(t: Tensor, name: str):
    """An in-place accumulator with its whole capacity (checked against the kernel's needs in the binding)."""
    return _module().Matrix(t.data_ptr(), _capacity_rows(t), t.shape[1], t.shape[1], _FEATURE_CODES[t.dtype])


def _gradients(grads: Gradients, in_place: bool = False):
    matrix = _accumulator_matrix if in_place else _matrix
    return _module().Gradients(matrix(grads.dx, "dx"), matrix(grads.dy, "dy"), _vector(grads.dscale, "dscale"),
                               _vector(grads.drow_bias, "drow_bias"), _vector(grads.dcol_bias, "dcol_bias"))


def lse_fwd(problem: Problem, need_row: bool, need_col: bool):
    x, y = problem.x, problem.y
    row_lse = torch.empty(x.shape[0] if need_row else 0, dtype=torch.float32)
    col_lse = torch.empty(y.shape[0] if need_col else 0, dtype=torch.float32)
    _module().lse_forward(_affine(problem), _optional_vector(row_lse, "row_lse"),
                          _optional_vector(col_lse, "col_lse"), torch.get_num_threads())
    return row_lse, col_lse


def lse_bwd(problem: Problem, row_lse, col_lse, grad_row, grad_col, *, grad_dtype=None, out=None, in_place=False):
    """(dx, dy, dscale, drow_bias, dcol_bias); dx / dy in `grad_dtype`: the features' dtype (default) or float32.

    out: optional (dx, dy) float32 tensors the gradients are added to (returned as dx, dy): a cross-rank running sum.
    in_place: out comes from `_problem.accumulator` (spare rows past the end): the kernel adds into it directly,
    without its own accumulator-sized temporaries (when d is a multiple of the build's feature block)."""
    x, y = problem.x, problem.y
    need_row = row_lse.numel() > 0 and grad_row.numel() > 0
    need_col = col_lse.numel() > 0 and grad_col.numel() > 0
    grad_row = grad_row.to(torch.float32).contiguous()
    grad_col = grad_col.to(torch.float32).contiguous()
    folded = problem.extra_terms()
    grad_dtype = torch.float32 if out is not None else (grad_dtype or x.dtype)
    dx, dy = out if out is not None else (torch.empty(x.shape, dtype=grad_dtype),
                                          torch.empty(y.shape, dtype=grad_dtype))
    grads = Gradients(dx, dy, torch.empty_like(problem.scale), torch.empty_like(problem.row_bias),
                      torch.empty_like(problem.col_bias))
    in_place = in_place and out is not None and _in_place_ok(out)
    _module().lse_backward(
        _affine(problem), _vector(row_lse, "row_lse") if need_row else None,
        _vector(col_lse, "col_lse") if need_col else None, _vector(grad_row, "grad_row") if need_row else None,
        _vector(grad_col, "grad_col") if need_col else None,
        _module().LseExtras(**{name: _optional_vector(t, name) for name, t in folded.items()}),
        _gradients(grads, in_place), torch.get_num_threads(), out is not None, in_place)
    return tuple(grads)


def sigmoid_loss(problem: Problem, need_grad: bool, *, out=None, in_place=False):
    """(row_loss (N,), Gradients in fp32 or None): row sums of softplus(-z L) and the gradients of their total.

    The positives, `problem.pos_cols` ((N, K), -1 padded), become the core's CSR `Positives` here, at the boundary.
    out: optional (dx, dy) float32 tensors the feature gradients are added to (with need_grad); in_place: as in
    `lse_bwd`."""
    x, y, pos_cols = problem.x, problem.y, problem.pos_cols
    valid = pos_cols >= 0
    ptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(valid.sum(1), 0, out=ptr[1:])
    cols = pos_cols[valid].contiguous()  # row-major: row by row, ascending within a row
    row_loss = torch.empty(x.shape[0], dtype=torch.float32)
    grads = None
    if need_grad:
        dx, dy = out if out is not None else (torch.empty(x.shape, dtype=torch.float32),
                                              torch.empty(y.shape, dtype=torch.float32))
        grads = Gradients(dx, dy, torch.empty_like(problem.scale), torch.empty_like(problem.row_bias),
                          torch.empty_like(problem.col_bias))
    in_place = in_place and need_grad and out is not None and _in_place_ok(out)
    _module().sigmoid_loss(_affine(problem), _module().Positives(_vector(ptr, "positives.ptr"),
                                                                 _vector(cols, "positives.cols")),
                           _vector(row_loss, "row_loss"), None if grads is None else _gradients(grads, in_place),
                           torch.get_num_threads(), need_grad and out is not None, in_place)
    return row_loss, grads
