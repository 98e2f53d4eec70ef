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
the backends: `reference` (dense torch, ground truth), `torch` (blocked plain-torch, any device), `cpu` (compiled
C++ kernel), `triton` (GPU, or the Triton interpreter on CPU tensors when TRITON_INTERPRET=1).
"""
# No `from __future__ import annotations` in this module: torch.library.custom_op infers each op's schema from the
# annotations of its function, and torch 2.4 does not resolve string annotations ("Parameter x has unsupported type
# Tensor"). Every annotation here must therefore be a real object at definition time (Python >= 3.10: `X | None`).
import contextlib
import functools
import os

import torch
from torch import Tensor

from ._numerics import accumulation_dtype, batched_dot
from ._problem import Affine

BACKENDS = ("auto", "reference", "torch", "cpu", "triton")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cpu_kernel_available() -> bool:
    from .backends import cpu
    return cpu.available()


_warned_cpu_kernel_missing = False


def _warn_cpu_kernel_missing() -> None:
    """Once per process: backend="auto" falls back to the slower torch backend because the compiled core is missing.
    Never while torch.compile traces (warnings.warn is a graph break, an error under fullgraph=True)."""
    global _warned_cpu_kernel_missing
    if _warned_cpu_kernel_missing or torch.compiler.is_compiling():
        return
    _warned_cpu_kernel_missing = True
    import warnings

    from .backends import cpu
    warnings.warn(f"mmcl_fast: the compiled CPU core mmcl_fast._C does not import ({cpu._IMPORT_ERROR}); "
                  "backend='auto' uses the slower 'torch' backend on CPU tensors. Reinstall mmcl_fast (pip install "
                  ".) to build it, or pass backend='torch' to silence this warning", RuntimeWarning, stacklevel=3)


# The Triton backend (backends/triton) reads `triton.knobs`, new in triton 3.4 (the release torch 2.8 pins); the
# triton that torch 2.4-2.7 pin (3.0-3.3) lacks it, and importing the backend would fail with an AttributeError.
_TRITON_MIN = "3.4"


def _probe_triton() -> tuple[bool, str | None]:
    """(installed, why the Triton backend cannot use it, or None), without importing triton.

    Done once at import: a lookup through importlib is not traceable by torch.compile of torch <= 2.8 (a graph break
    on CUDA tensors), and the answer does not change within a process."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return False, None
    if spec is None:
        return False, None
    locations = list(spec.submodule_search_locations or ())
    if locations and not any(os.path.exists(os.path.join(loc, name)) for loc in locations
                             for name in ("knobs.py", "knobs")):
        try:
            from importlib.metadata import version
            found = f"triton {version('triton')}"
        except Exception:  # another distribution name (pytorch-triton, ...) or no metadata
            found = f"the triton at {locations[0]}"
        return True, (f"mmcl_fast's Triton backend needs triton >= {_TRITON_MIN} (triton.knobs), found {found} "
                      f"(torch < 2.8 pins an older triton)")
    return True, None


_TRITON_INSTALLED, _TRITON_UNUSABLE = _probe_triton()
_warned_triton_unusable = False


def _triton_available() -> bool:
    return _TRITON_INSTALLED and _TRITON_UNUSABLE is None


def _warn_triton_unusable() -> None:
    """Once per process (and never while torch.compile traces): backend="auto" on CUDA tensors falls back to the
    blocked torch backend because the installed triton is too old for the Triton backend."""
    global _warned_triton_unusable
    if _warned_triton_unusable or torch.compiler.is_compiling():
        return
    _warned_triton_unusable = True
    import warnings
    warnings.warn(f"{_TRITON_UNUSABLE}; backend='auto' uses the slower 'torch' backend on CUDA tensors. Install "
                  f"triton >= {_TRITON_MIN} (with torch >= 2.8), or pass backend='torch' to silence this warning",
                  RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the concrete backend for tensors on `device` of `dtype`.

    "auto": the compiled kernel of the device (cpu: the C++ core; cuda: Triton >= 3.4) where it exists and supports
    the dtype, otherwise the blocked `torch` backend (any device, any floating dtype, float64 included), which is
    exact and never N x M. "reference" (dense, N x M) is never picked automatically.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if dtype in _KERNEL_DTYPES:
            if device.type == "cpu" and _cpu_kernel_available():
                return "cpu"
            if device.type == "cpu":
                _warn_cpu_kernel_missing()
            if device.type == "cuda" and _triton_available():
                return "triton"
            if device.type == "cuda" and _TRITON_UNUSABLE is not None:
                _warn_triton_unusable()
        return "torch"
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
        if _TRITON_UNUSABLE is not None:
            raise ImportError(_TRITON_UNUSABLE)
    return backend


def _backend_module(backend: str):
    if backend == "reference":
        from .backends import reference
        return reference
    if backend == "torch":
        from .backends import blocked
        return blocked
    if backend == "cpu":
        from .backends import cpu
        return cpu
    if backend == "triton":
        from .backends import triton as triton_backend
        return triton_backend
    raise ValueError(f"unknown concrete backend {backend!r}")


# ---------------------------------------------------------------------------------------------
# autocast: the losses are exact in the features' own dtype, whatever the caller's AMP context
# ---------------------------------------------------------------------------------------------

def _no_autocast(device: torch.device):
    """A context that turns autocast off on `device` (a no-op where torch has no autocast for it)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device of the first tensor among the positional, then the keyword arguments (None if there is none).

    Plain loops, no `next(generator, default)`: torch.compile(fullgraph=True) of torch < 2.9 cannot trace a
    generator expression passed to `next` (a graph break)."""
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    for a in kwargs.values():
        if isinstance(a, Tensor):
            return a.device
    return None


def autocast_off(fn):
    """Run a loss with autocast disabled on its features' device.

    Under `torch.autocast` a matmul of fp32 features would run in bf16/fp16 and the "fp32" loss would be off by
    ~1e-3; the losses instead compute in the dtype of the features they are given (fp32 features: the fp32 result;
    bf16 features, e.g. from an encoder under autocast: the bf16 result, accumulated in fp32).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = _first_tensor_device(args, kwargs)
        if device is None:
            return fn(*args, **kwargs)
        with _no_autocast(device):
            return fn(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------
# Besides the two LSEs, the forward returns the linear statistics a cross-entropy needs: the positives' logits
# L[i, row_target_i] and L[col_target_j, j], and the row / column sums of L (label smoothing). They cost
# O((N + M) D) and are computed here with plain torch; their gradients are folded into the kernels' gradient
# weights G (so bf16 / fp16 feature gradients are rounded once, from one fp32 accumulator).

def _empty_like_vector(x: Tensor, acc: torch.dtype) -> Tensor:
    return x.new_empty((0,), dtype=acc)


_STATS_BLOCK_ROWS = 1 << 16  # rows per block of the O(N*D) statistics: bounds their fp32 temporaries


class _RowDot(torch.autograd.Function):
    """sum_d a[i, d] * b[i, d] in `acc`: a batched dot in the forward, elementwise products in the backward, so that
    no matmul runs in the backward (a backward called inside torch.autocast would run a matmul in bf16)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
        ctx.save_for_backward(a, b)
        return batched_dot(a, b, acc)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        column = grad[:, None]
        grad_a = (column * b).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = (column * a).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def _rowdot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """sum_d a[i, d] * b[i, d] in `acc` precision, without an (N, D) product temporary (differentiable)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _RowDot.apply(a, b, acc)
    return batched_dot(a, b, acc)


def _blocked_rowdot(a: Tensor, b: Tensor, b_rows: Tensor | None, acc: torch.dtype) -> Tensor:
    """_rowdot(a, b[b_rows]) over blocks of rows: fp32 copies and the gather never exceed one block."""
    out = torch.empty(a.shape[0], dtype=acc, device=a.device)
    for start in range(0, a.shape[0], _STATS_BLOCK_ROWS):
        stop = min(start + _STATS_BLOCK_ROWS, a.shape[0])
        rows = b[start:stop] if b_rows is None else b[b_rows[start:stop]]
        out[start:stop] = _rowdot(a[start:stop], rows, acc)
    return out


def _blocked_weighted_sum(a: Tensor, weights: Tensor | None, acc: torch.dtype) -> Tensor:
    """sum_i weights_i a_i (weights None = 1) in `acc`, one block of rows at a time."""
    total = torch.zeros(a.shape[1], dtype=acc, device=a.device)
    for start in range(0, a.shape[0], _STATS_BLOCK_ROWS):
        block = a[start:start + _STATS_BLOCK_ROWS].to(acc)
        if weights is not None:
            block = weights[start:start + _STATS_BLOCK_ROWS, None] * block
        total += block.sum(0)
    return total


def _blocked_matvec(a: Tensor, v: Tensor, acc: torch.dtype) -> Tensor:
    """a @ v in `acc`, one block of rows at a time."""
    return torch.cat([a[start:start + _STATS_BLOCK_ROWS].to(acc) @ v
                      for start in range(0, a.shape[0], _STATS_BLOCK_ROWS)])


def _linear_stats(x, y, scale, row_bias, col_bias, row_target, col_target, need_sums):
    """Positives' logits and row / column sums of L, O((N + M) D) work, bounded temporaries (no autograd)."""
    acc = scale.dtype
    # outputs of a custom op must not alias each other: a fresh empty tensor for each absent one
    row_pos, col_pos, row_sum, col_sum = (_empty_like_vector(x, acc) for _ in range(4))
    if row_target.numel():
        row_pos = scale * _blocked_rowdot(x, y, row_target, acc) + row_bias + col_bias[row_target]
    if col_target.numel():
        col_pos = (scale[col_target] * _blocked_rowdot(y, x, col_target, acc) + row_bias[col_target]
                   + col_bias)
    if need_sums:
        n, m = x.shape[0], y.shape[0]
        row_sum = scale * _blocked_matvec(x, _blocked_weighted_sum(y, None, acc), acc) + m * row_bias + col_bias.sum()
        col_sum = (_blocked_matvec(y, _blocked_weighted_sum(x, scale, acc), acc) + row_bias.sum()
                   + n * col_bias)
    return row_pos, col_pos, row_sum, col_sum


@torch.library.custom_op("mmcl_fast::lse_fwd", mutates_args=())
def lse_fwd(x: Tensor, y: Tensor, scale: Tensor, row_bias: Tensor, col_bias: Tensor, row_target: Tensor,
            col_target: Tensor, need_row: bool, need_col: bool, need_sums: bool,
            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(row_lse, col_lse, row_pos, col_pos, row_sum, col_sum) of L = scale*X@Y^T + row_bias + col_bias.

    An output that was not asked for (need_* False, empty target) comes back as an empty tensor.
    """
    with torch.no_grad(), _no_autocast(x.device):
        row_lse, col_lse = _backend_module(backend).lse_fwd(Affine(x, y, scale, row_bias, col_bias), need_row,
                                                             need_col)
        stats = _linear_stats(x, y, scale, row_bias, col_bias, row_target, col_target, need_sums)
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
    with _no_autocast(x.device):
        return _backend_module(backend).lse_bwd(Affine(x, y, scale, row_bias, col_bias), row_lse, col_lse,
                                                grad_row, grad_col, extras)


@lse_bwd.register_fake
def _lse_bwd_fake(x, y, scale, row_bias, col_bias, row_target, col_target, row_lse, col_lse, grad_row,
                  grad_col, grad_row_pos, grad_col_pos, grad_row_sum, grad_col_sum, backend):
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale),
            torch.empty_like(row_bias), torch.empty_like(col_bias))


class Extras:
    """The linear terms folded into the gradient weights: G_ij += row_const_i + col_const_j
    + row_target_grad_i [j == row_target_i] + col_target_grad_j [i == col_target_j]. Empty tensors = absent."""

    def __init__(self, row_const, col_const, row_target, row_target_grad, col_target, col_target_grad):
        self.row_const, self.col_const = row_const, col_const
        self.row_target, self.row_target_grad = row_target, row_target_grad
        self.col_target, self.col_target_grad = col_target, col_target_grad


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
    with torch.no_grad(), _no_autocast(x.device):
        row_loss, grads = _backend_module(backend).sigmoid_loss(Affine(x, y, scale, row_bias, col_bias), pos_cols,
                                                                need_grad)
        total = row_loss.to(torch.float64).sum().to(acc)
    if grads is None:
        return (total,) + tuple(_empty_like_vector(x, acc) for _ in range(5))
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
    out = sigmoid_fwd(_unit_stride(x), _unit_stride(y), scale.to(acc).contiguous(), row_bias.to(acc).contiguous(),
                      col_bias.to(acc).contiguous(), pos_cols.contiguous(), need_grad, resolved)
    return out[0]


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


@autocast_off
def affine_lse(x: Tensor, y: Tensor, scale=1.0, row_bias=None, col_bias=None, *,
               need_row: bool = True, need_col: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of ``L = scale_i * <x_i, y_j> + row_bias_i + col_bias_j``, exact, never N x M.

    Args:
        x: (N, D) features; y: (M, D) features of the same dtype and device.
        scale: float, 0-d tensor or (N,) tensor (per-row scale). row_bias: (N,) or scalar; col_bias: (M,) or scalar.
        need_row / need_col: which LSE to compute (the other comes back as an empty tensor).
        backend: "auto" | "reference" | "torch" | "cpu" | "triton".

    Returns:
        (row_lse (N,), col_lse (M,)) in float32 (float64 for float64 inputs), differentiable w.r.t. x, y, scale,
        row_bias and col_bias.
    """
    from ._validate import check_features
    check_features(x, "x", y, "y")
    if not (need_row or need_col):
        raise ValueError("at least one of need_row / need_col must be True")
    resolved = resolve_backend(backend, x.device, x.dtype)
    acc = accumulation_dtype(x.dtype)
    n, m = x.shape[0], y.shape[0]
    scale_v = _as_vector(scale, n, "scale", x, acc)
    row_v = _as_vector(row_bias, n, "row_bias", x, acc)
    col_v = _as_vector(col_bias, m, "col_bias", x, acc)
    x, y = _unit_stride(x), _unit_stride(y)
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
    return lse_fwd(_unit_stride(x), _unit_stride(y), scale.to(acc).contiguous(), row_bias.to(acc).contiguous(),
                   col_bias.to(acc).contiguous(), row_target, col_target, need_row, need_col, need_sums, resolved)


def _unit_stride(t: Tensor) -> Tensor:
    """Kernels take a row stride but need unit stride along features; other layouts are copied once."""
    if t.stride(1) == 1 and (t.stride(0) >= t.shape[1] or t.shape[0] == 1):
        return t
    return t.contiguous()
