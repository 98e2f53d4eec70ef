"""The custom ops of the fused primitive (docs/design.md#fused-primitive), registered with `torch.library`, and the
entry points the losses call (`affine_lse`, public; `softmax_stats`, `sigmoid_stats`).

Every loss in mmcl_fast is assembled from one primitive over the affine similarity

    L_ij = scale_i * <x_i, y_j> + row_bias_i + col_bias_j

which returns the per-row and per-column log-sum-exp of L (fp32, O(N + M) numbers) and, in the backward, the
gradients of any linear function of those LSEs:

    G_ij  = grad_row_i * exp(L_ij - row_lse_i) + grad_col_j * exp(L_ij - col_lse_j)
    dx_i  = scale_i * sum_j G_ij y_j          dy_j = sum_i G_ij scale_i x_i
    dscale_i = sum_j G_ij <x_i, y_j>           drow_i = sum_j G_ij      dcol_j = sum_i G_ij

`lse_fwd` also returns the O((N + M) D) statistics of a cross-entropy (`_stats.py`), whose gradients are folded into
G as `Extras`; `sigmoid_fwd` is the SigLIP loss with its gradients from the same sweep. Each op has an eager kernel
(the backend named by its `backend` argument, `backends.get_backend`), a fake kernel for torch.compile and an
autograd formula. Around them: `_autocast.py` (autocast policy), `_stats.py` (the O(N D) statistics),
`_validate.py` (argument checks and coercion), `backends/` (the contract and the registry).
"""
# No `from __future__ import annotations` in this module: torch.library.custom_op infers each op's schema from the
# annotations of its function, and torch 2.4 does not resolve string annotations ("Parameter x has unsupported type
# Tensor"). Every annotation here must therefore be a real object at definition time (Python >= 3.10: `X | None`).
import torch
from torch import Tensor

from ._autocast import autocast_off, no_autocast
from ._numerics import accumulation_dtype
from ._problem import Extras, Problem
from ._stats import empty_vector, linear_stats
from ._validate import as_vector, check_features, unit_stride
from .backends import get_backend, resolve_backend


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------
# Besides the two LSEs, the forward returns the linear statistics a cross-entropy needs: the positives' logits
# L[i, row_target_i] and L[col_target_j, j], and the row / column sums of L (label smoothing). They cost
# O((N + M) D) and are computed here with plain torch; their gradients are folded into the kernels' gradient
# weights G (so bf16 / fp16 feature gradients are rounded once, from one fp32 accumulator).

@torch.library.custom_op("mmcl_fast::lse_fwd", mutates_args=())
def lse_fwd(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor, row_target: Tensor,
            col_target: Tensor, need_row: bool, need_col: bool, need_sums: bool,
            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(row_lse, col_lse, row_pos, col_pos, row_sum, col_sum) of L = scale*X@Y^T + row_bias + col_bias.

    An output that was not asked for (need_* False, empty target) comes back as an empty tensor.
    """
    with torch.no_grad(), no_autocast(x.device):
        row_lse, col_lse = get_backend(backend).lse_fwd(Problem(x, y, scale, row_bias, col_bias), need_row,
                                                        need_col)
        stats = linear_stats(x, y, scale, row_bias, col_bias, row_target, col_target, need_sums)
    return (row_lse, col_lse) + stats


@lse_fwd.register_fake
def _lse_fwd_fake(x, y, scale, row_bias, col_bias, row_target, col_target, need_row, need_col, need_sums,
                  backend):
    acc = scale.dtype
    n, m = x.shape[0], y.shape[0]
    vec = lambda size: x.new_empty((size,), dtype=acc)  # noqa: E731
    return (vec(n if need_row else 0), vec(m if need_col else 0), vec(row_target.shape[0]),
            vec(col_target.shape[0]), vec(n if need_sums else 0), vec(m if need_sums else 0))


@torch.library.custom_op("mmcl_fast::lse_bwd", mutates_args=())
def lse_bwd(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor, row_target: Tensor,
            col_target: Tensor, row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor,
            grad_row_pos: Tensor, grad_col_pos: Tensor, grad_row_sum: Tensor, grad_col_sum: Tensor,
            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dscale, drow_bias, dcol_bias) for the given output gradients (empty = zero)."""
    extras = Extras(grad_row_sum, grad_col_sum, row_target, grad_row_pos, col_target, grad_col_pos)
    with no_autocast(x.device):
        return get_backend(backend).lse_bwd(Problem(x, y, scale, row_bias, col_bias, extras), row_lse, col_lse,
                                            grad_row, grad_col)


@lse_bwd.register_fake
def _lse_bwd_fake(x, y, scale, row_bias, col_bias, row_target, col_target, row_lse, col_lse, grad_row,
                  grad_col, grad_row_pos, grad_col_pos, grad_row_sum, grad_col_sum, backend):
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale),
            torch.empty_like(row_bias), torch.empty_like(col_bias))


def _lse_setup_context(ctx, inputs, output):
    x, y, scale, row_bias, col_bias, row_target, col_target, need_row, need_col, need_sums, backend = inputs
    row_lse, col_lse = output[:2]
    ctx.save_for_backward(x, y, scale, row_bias, col_bias, row_target, col_target, row_lse, col_lse)
    ctx.backend = backend


def _lse_backward(ctx, *grads):
    x, y, scale, row_bias, col_bias, row_target, col_target, row_lse, col_lse = ctx.saved_tensors
    # A missing gradient is zero: passed as an empty tensor, which every backend reads as "absent".
    grad_row, grad_col, grad_row_pos, grad_col_pos, grad_row_sum, grad_col_sum = (
        scale.new_empty((0,)) if grad is None else grad.to(scale.dtype).contiguous() for grad in grads)
    dx, dy, dscale, drow, dcol = lse_bwd(x, y, scale, row_bias, col_bias, row_target, col_target, row_lse,
                                         col_lse, grad_row, grad_col, grad_row_pos, grad_col_pos, grad_row_sum,
                                         grad_col_sum, ctx.backend)
    return dx, dy, dscale, drow, dcol, None, None, None, None, None, None


torch.library.register_autograd("mmcl_fast::lse_fwd", _lse_backward, setup_context=_lse_setup_context)


# ---------------------------------------------------------------------------------------------
# the sigmoid (SigLIP) loss: forward and backward fused into one sweep
# ---------------------------------------------------------------------------------------------
# Its gradient weights are elementwise (no row or column statistic), so the kernels compute the loss and, when
# gradients are wanted, the gradients of the loss in the same sweep (3 GEMM-equivalents instead of 1 + 3). The op
# returns those gradients, unscaled and in the accumulation dtype, as extra outputs; the autograd backward scales them
# by the upstream gradient and rounds once to the features' dtype.

@torch.library.custom_op("mmcl_fast::sigmoid_fwd", mutates_args=())
def sigmoid_fwd(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor, pos_cols: Tensor,
                need_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(total, dx, dy, dscale, drow_bias, dcol_bias): total = sum_ij softplus(-z_ij L_ij) (0-d, accumulation dtype)
    and, with need_grad, its gradients (accumulation dtype; empty tensors otherwise). pos_cols: (N, K) int64, each
    row's positive columns ascending, then -1 padding."""
    acc = scale.dtype
    with torch.no_grad(), no_autocast(x.device):
        row_loss, grads = get_backend(backend).sigmoid_loss(Problem(x, y, scale, row_bias, col_bias, pos_cols=pos_cols),
                                                            need_grad)
        total = row_loss.to(torch.float64).sum().to(acc)
    if grads is None:
        return (total,) + tuple(empty_vector(x, acc) for _ in range(5))
    return (total,) + tuple(g.to(acc) for g in grads)


@sigmoid_fwd.register_fake
def _sigmoid_fwd_fake(x, y, scale, row_bias, col_bias, pos_cols, need_grad, backend):
    acc = scale.dtype
    n, m = x.shape[0], y.shape[0]
    if not need_grad:
        return (x.new_empty((), dtype=acc),) + tuple(x.new_empty((0,), dtype=acc) for _ in range(5))
    return (x.new_empty((), dtype=acc), x.new_empty(x.shape, dtype=acc), x.new_empty(y.shape, dtype=acc),
            x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc), x.new_empty((m,), dtype=acc))


def _sigmoid_setup_context(ctx, inputs, output):
    x, y, scale, row_bias, col_bias, pos_cols, need_grad, backend = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])
    ctx.need_grad = need_grad
    ctx.dtypes = (x.dtype, y.dtype, scale.dtype, row_bias.dtype, col_bias.dtype)


def _sigmoid_backward(ctx, grad_total, *unused):
    if not ctx.need_grad:
        raise RuntimeError("mmcl_fast sigmoid loss: the forward ran without gradients (need_grad=False), so it has no "
                           "backward; call it with grad mode on and inputs that require grad")
    # one fp32 (fp64) multiply by the upstream gradient, then a single rounding to each input's dtype
    return tuple((grad_total * g).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)) + (None, None, None)


torch.library.register_autograd("mmcl_fast::sigmoid_fwd", _sigmoid_backward, setup_context=_sigmoid_setup_context)


def sigmoid_stats(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor, pos_cols: Tensor, *,
                  backend: str) -> Tensor:
    """sum_ij softplus(-z_ij L_ij) over L = scale_i <x_i, y_j> + row_bias_i + col_bias_j, differentiable (internal:
    the SigLIP losses call it). scale / row_bias: (N,), col_bias: (M,) in the accumulation dtype; pos_cols: (N, K)
    positive columns per row, ascending, -1 padded. Gradients are computed in the same sweep when grad mode is on
    and an input requires grad."""
    resolved = resolve_backend(backend, x.device, x.dtype)
    acc = accumulation_dtype(x.dtype)
    operands = (x, y, scale, row_bias, col_bias)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in operands)
    out = sigmoid_fwd(unit_stride(x), unit_stride(y), scale.to(acc).contiguous(), row_bias.to(acc).contiguous(),
                      col_bias.to(acc).contiguous(), pos_cols.contiguous(), need_grad, resolved)
    return out[0]


# ---------------------------------------------------------------------------------------------
# the Python entry point every loss calls
# ---------------------------------------------------------------------------------------------

@autocast_off
def affine_lse(x: Tensor, y: Tensor, scale=1.0, row_bias=None, col_bias=None, *,
               need_row: bool = True, need_col: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of ``L = scale_i * <x_i, y_j> + row_bias_i + col_bias_j``, exact, never N x M.

    Args:
        x: (N, D) features.
        y: (M, D) features of the same dtype and device.
        scale: float, 0-d tensor or (N,) tensor (per-row scale).
        row_bias: (N,) tensor or scalar.
        col_bias: (M,) tensor or scalar.
        need_row: compute the row LSE (else it comes back as an empty tensor).
        need_col: compute the column LSE (else it comes back as an empty tensor).
        backend: "auto" | "reference" | "torch" | "cpu" | "triton".

    Returns:
        (row_lse (N,), col_lse (M,)) in float32 (float64 for float64 inputs), differentiable w.r.t. x, y, scale,
        row_bias and col_bias.
    """
    check_features(x, "x", y, "y")
    if not (need_row or need_col):
        raise ValueError("at least one of need_row / need_col must be True")
    resolved = resolve_backend(backend, x.device, x.dtype)
    acc = accumulation_dtype(x.dtype)
    n, m = x.shape[0], y.shape[0]
    scale_v = as_vector(scale, n, "scale", x, acc)
    row_v = as_vector(row_bias, n, "row_bias", x, acc)
    col_v = as_vector(col_bias, m, "col_bias", x, acc)
    x, y = unit_stride(x), unit_stride(y)
    no_target = torch.empty(0, dtype=torch.int64, device=x.device)
    out = lse_fwd(x, y, scale_v, row_v, col_v, no_target, no_target, need_row, need_col, False, resolved)
    return out[0], out[1]


def softmax_stats(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor, *,
                  row_target: Tensor | None, col_target: Tensor | None, need_row: bool, need_col: bool,
                  need_sums: bool, backend: str):
    """Everything a (label-smoothed) cross-entropy over L needs, in one op (internal: the losses call it).

    scale / row_bias: (N,), col_bias: (M,) in the accumulation dtype; row_target: (N,) int64 column indices or
    None; col_target: (M,) int64 row indices or None. Returns (row_lse, col_lse, row_pos, col_pos, row_sum,
    col_sum); outputs not asked for are empty.
    """
    resolved = resolve_backend(backend, x.device, x.dtype)
    acc = accumulation_dtype(x.dtype)
    no_target = torch.empty(0, dtype=torch.int64, device=x.device)
    row_target = no_target if row_target is None else row_target.to(torch.int64).contiguous()
    col_target = no_target if col_target is None else col_target.to(torch.int64).contiguous()
    return lse_fwd(unit_stride(x), unit_stride(y), scale.to(acc).contiguous(), row_bias.to(acc).contiguous(),
                   col_bias.to(acc).contiguous(), row_target, col_target, need_row, need_col, need_sums, resolved)


