"""The op registry: the streamed log-sum-exp primitive of SPEC §1 as a `torch.library` custom op.

Every loss in mmcl_fast is assembled from one primitive over the affine similarity

    L_ij = scale_i * <x_i, y_j> + row_bias_i + col_bias_j

which returns the per-row and per-column log-sum-exp of L (fp32, O(N + M) numbers) and, in the
backward, the gradients of any linear function of those LSEs:

    G_ij  = grad_row_i * exp(L_ij - row_lse_i) + grad_col_j * exp(L_ij - col_lse_j)
    dx_i  = scale_i * sum_j G_ij y_j          dy_j = sum_i G_ij scale_i x_i
    dscale_i = sum_j G_ij <x_i, y_j>           drow_i = sum_j G_ij      dcol_j = sum_i G_ij

The positives' logits and label-smoothing sums are O(N*D) and are left to plain torch autograd in the
loss modules. This file holds the custom ops (eager, fake/meta kernels, autograd) and the dispatch to
the backends: `reference` (dense torch, ground truth), `cpu` (compiled C++ kernel), `triton` (GPU, or the
Triton interpreter on CPU tensors when TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

BACKENDS = ("auto", "reference", "cpu", "triton")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the concrete backend for tensors on `device` of `dtype` ("auto" → cpu / triton / reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if dtype not in _KERNEL_DTYPES:
            return "reference"  # float64 and friends: the dense reference is the exact path
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu":
            return "cpu"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device}")
        if dtype not in _KERNEL_DTYPES:
            raise TypeError(f"backend='cpu' supports float32/bfloat16/float16 features, got {dtype}")
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreter_on()):
            raise ValueError(
                "backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                f"got device {device}")
        if dtype not in _KERNEL_DTYPES:
            raise TypeError(f"backend='triton' supports float32/bfloat16/float16 features, got {dtype}")
    return backend


def _backend_module(backend: str):
    if backend == "reference":
        from .backends import reference
        return reference
    if backend == "cpu":
        from .backends import cpu
        return cpu
    if backend == "triton":
        from .backends import triton as triton_backend
        return triton_backend
    raise ValueError(f"unknown concrete backend {backend!r}")


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("mmcl_fast::lse_fwd", mutates_args=())
def lse_fwd(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor,
            need_row: bool, need_col: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Row and column LSE of L = scale*X@Y^T + row_bias + col_bias. An unneeded side comes back empty."""
    return _backend_module(backend).lse_fwd(x, y, scale, row_bias, col_bias, need_row, need_col)


@lse_fwd.register_fake
def _lse_fwd_fake(x, y, scale, row_bias, col_bias, need_row, need_col, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, m = x.shape[0], y.shape[0]
    return (x.new_empty((n if need_row else 0,), dtype=acc),
            x.new_empty((m if need_col else 0,), dtype=acc))


@torch.library.custom_op("mmcl_fast::lse_bwd", mutates_args=())
def lse_bwd(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor,
            row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor,
            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dy, dscale, drow_bias, dcol_bias) of sum(grad_row*row_lse) + sum(grad_col*col_lse)."""
    return _backend_module(backend).lse_bwd(x, y, scale, row_bias, col_bias,
                                            row_lse, col_lse, grad_row, grad_col)


@lse_bwd.register_fake
def _lse_bwd_fake(x, y, scale, row_bias, col_bias, row_lse, col_lse, grad_row, grad_col, backend):
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale),
            torch.empty_like(row_bias), torch.empty_like(col_bias))


def _lse_setup_context(ctx, inputs, output):
    x, y, scale, row_bias, col_bias, need_row, need_col, backend = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(x, y, scale, row_bias, col_bias, row_lse, col_lse)
    ctx.need_row, ctx.need_col, ctx.backend = need_row, need_col, backend


def _lse_backward(ctx, grad_row_lse, grad_col_lse):
    x, y, scale, row_bias, col_bias, row_lse, col_lse = ctx.saved_tensors
    # A side that was not computed has an empty LSE and gets an empty (all-zero) gradient.
    grad_row = row_lse.new_zeros(row_lse.shape) if grad_row_lse is None else grad_row_lse.to(row_lse.dtype)
    grad_col = col_lse.new_zeros(col_lse.shape) if grad_col_lse is None else grad_col_lse.to(col_lse.dtype)
    dx, dy, dscale, drow, dcol = lse_bwd(x, y, scale, row_bias, col_bias, row_lse, col_lse,
                                         grad_row.contiguous(), grad_col.contiguous(), ctx.backend)
    return dx, dy, dscale, drow, dcol, None, None, None


torch.library.register_autograd("mmcl_fast::lse_fwd", _lse_backward, setup_context=_lse_setup_context)


# ---------------------------------------------------------------------------------------------
# the Python entry point every loss calls
# ---------------------------------------------------------------------------------------------

def _as_vector(value, length: int, name: str, like: Tensor, acc_dtype: torch.dtype) -> Tensor:
    """A float, 0-d tensor or (length,) tensor → contiguous (length,) tensor in the accumulation dtype."""
    if value is None:
        return torch.zeros(length, dtype=acc_dtype, device=like.device)
    if not isinstance(value, Tensor):
        return torch.full((length,), float(value), dtype=acc_dtype, device=like.device)
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    if not (value.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() == 0:
        return value.to(acc_dtype).expand(length).contiguous()
    if value.dim() == 1 and value.shape[0] == length:
        return value.to(acc_dtype).contiguous()
    raise ValueError(f"{name} must be a scalar or a ({length},) tensor, got shape {tuple(value.shape)}")


def affine_lse(x: Tensor, y: Tensor, scale=1.0, row_bias=None, col_bias=None, *,
               need_row: bool = True, need_col: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of ``L = scale_i * <x_i, y_j> + row_bias_i + col_bias_j``, exact, never N x M.

    Args:
        x: (N, D) features; y: (M, D) features of the same dtype and device.
        scale: float, 0-d tensor or (N,) tensor (per-row scale). row_bias: (N,) or scalar; col_bias: (M,) or scalar.
        need_row / need_col: which LSE to compute (the other comes back as an empty tensor).
        backend: "auto" | "reference" | "cpu" | "triton".

    Returns:
        (row_lse (N,), col_lse (M,)) in float32 (float64 for float64 inputs), differentiable w.r.t. x, y, scale,
        row_bias and col_bias.
    """
    from ._validate import check_features
    check_features(x, "x", y, "y")
    if not (need_row or need_col):
        raise ValueError("at least one of need_row / need_col must be True")
    resolved = resolve_backend(backend, x.device, x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, m = x.shape[0], y.shape[0]
    scale_v = _as_vector(scale, n, "scale", x, acc)
    row_v = _as_vector(row_bias, n, "row_bias", x, acc)
    col_v = _as_vector(col_bias, m, "col_bias", x, acc)
    x, y = _unit_stride(x), _unit_stride(y)
    return lse_fwd(x, y, scale_v, row_v, col_v, need_row, need_col, resolved)


def _unit_stride(t: Tensor) -> Tensor:
    """Kernels take a row stride but need unit stride along features; other layouts are copied once."""
    if t.stride(1) == 1 and (t.stride(0) >= t.shape[1] or t.shape[0] == 1):
        return t
    return t.contiguous()
