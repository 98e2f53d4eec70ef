"""The `cpu` backend: the compiled C++ kernel (`mmcl_fast._C`, csrc/lse.h) behind the streamed-LSE primitive.

Forward: one sweep over MC x NC tiles gives row and column LSE (1 N*M*D GEMM-equivalent). Backward: one
recompute sweep gives dX, dY, dscale, drow_bias, dcol_bias (3 GEMM-equivalents). Memory: O((N + M) * D) fp32
gradient accumulators plus per-thread tiles; never N x M. bf16/fp16 features are read as they are: on a CPU with
AVX512-BF16 the similarity GEMM runs on bf16 pairs (vdpbf16ps: exact products, fp32 sums); otherwise, and for
the gradient GEMMs, blocks are converted to fp32 one tile at a time. All accumulation is fp32. Threads: `torch.get_num_threads()`.

ISA builds (csrc/isa.cpp): x86-64 has avx512-bf16, avx512, avx2 (AVX2 + FMA + F16C) and the portable scalar build;
aarch64 has neon and scalar. The best one the CPU runs is picked at import; MMCL_FAST_CPU_ISA or `set_isa` names
another, and naming one the CPU lacks raises instead of executing unknown instructions.
"""
from __future__ import annotations

import torch
from torch import Tensor

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

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
    """The ISA build of the kernel in use ('avx512-bf16', 'avx512', 'avx2', 'neon' or 'scalar')."""
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


def _problem_args(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor):
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"the CPU kernel supports float32/bfloat16/float16, got {x.dtype}")
    for t, name in ((scale, "scale"), (row_bias, "row_bias"), (col_bias, "col_bias")):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 vector, got {t.dtype}")
    return (x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), _DTYPE_CODES[x.dtype], x.shape[0], y.shape[0],
            x.shape[1], scale.data_ptr(), row_bias.data_ptr(), col_bias.data_ptr())


def lse_fwd(x, y, scale, row_bias, col_bias, need_row: bool, need_col: bool):
    row_lse = torch.empty(x.shape[0] if need_row else 0, dtype=torch.float32)
    col_lse = torch.empty(y.shape[0] if need_col else 0, dtype=torch.float32)
    _module().lse_forward(*_problem_args(x, y, scale, row_bias, col_bias),
                          row_lse.data_ptr() if need_row else 0, col_lse.data_ptr() if need_col else 0,
                          torch.get_num_threads())
    return row_lse, col_lse


def _ptr(t) -> int:
    """Data pointer of an optional vector (0 = absent: None or empty)."""
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def lse_bwd(x, y, scale, row_bias, col_bias, row_lse, col_lse, grad_row, grad_col, extras=None):
    need_row = row_lse.numel() > 0 and grad_row.numel() > 0
    need_col = col_lse.numel() > 0 and grad_col.numel() > 0
    grad_row = grad_row.to(torch.float32).contiguous()
    grad_col = grad_col.to(torch.float32).contiguous()
    folded = [None] * 6
    if extras is not None:
        folded = [extras.row_const, extras.col_const, extras.row_target, extras.row_target_grad,
                  extras.col_target, extras.col_target_grad]
        if folded[2] is not None and folded[3] is not None and (folded[2].numel() == 0 or folded[3].numel() == 0):
            folded[2] = folded[3] = None  # a target without a gradient (or vice versa) contributes nothing
        if folded[4] is not None and folded[5] is not None and (folded[4].numel() == 0 or folded[5].numel() == 0):
            folded[4] = folded[5] = None
    dx = torch.empty(x.shape, dtype=x.dtype)
    dy = torch.empty(y.shape, dtype=y.dtype)
    dscale = torch.empty_like(scale)
    drow = torch.empty_like(row_bias)
    dcol = torch.empty_like(col_bias)
    _module().lse_backward(*_problem_args(x, y, scale, row_bias, col_bias),
                           row_lse.data_ptr() if need_row else 0, col_lse.data_ptr() if need_col else 0,
                           grad_row.data_ptr() if need_row else 0, grad_col.data_ptr() if need_col else 0,
                           *(_ptr(t) for t in folded), dx.data_ptr(), dy.data_ptr(), dscale.data_ptr(), drow.data_ptr(), dcol.data_ptr(),
                           torch.get_num_threads())
    return dx, dy, dscale, drow, dcol
