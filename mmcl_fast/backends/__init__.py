"""The backends of the fused primitive: the contract each one implements, and the table they are registered in.

A backend is a module with the three entry points of `Backend` (below). Four are registered in `REGISTRY`:

    reference  dense torch: materialises the N x M logits; the ground truth of the tests, never picked by "auto"
    torch      blocked plain torch (backends/blocked.py): any device, any floating dtype, never N x M
    cpu        the compiled C++ core (backends/cpu.py, csrc/): CPU tensors, fp32 / bf16 / fp16
    triton     fused Triton kernels (backends/triton/): CUDA tensors (CPU tensors under TRITON_INTERPRET=1)

`resolve_backend(name, device, dtype)` turns a user's `backend=` argument into one of them; "auto" takes the first
registered backend that lists the device in `auto_on`, supports the dtype and is usable here, else "torch".
Adding a backend: write a module with the three functions, add one `Registration` line.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .._problem import Gradients, Problem


class Backend(Protocol):
    """The contract of a backend module. N, M: rows of x and y; D: features; acc: the accumulation dtype (float32,
    float64 for float64 features). Every entry point gets a `Problem` whose tensors are on the backend's device,
    features with unit feature stride, vectors contiguous in acc; none may allocate an N x M buffer (but
    `reference`).

    lse_fwd(problem, need_row, need_col) -> (row_lse (N,), col_lse (M,)) in acc: the log-sum-exp of each row and
        column of L = scale_i <x_i, y_j> + row_bias_i + col_bias_j; one not asked for is an empty tensor.
    lse_bwd(problem, row_lse, col_lse, grad_row, grad_col, *, grad_dtype=None, out=None, in_place=False)
        -> (dx (N, D), dy (M, D), dscale (N,), drow_bias (N,), dcol_bias (M,)): the gradients of
        sum_i grad_row_i row_lse_i + sum_j grad_col_j col_lse_j plus the linear terms of `problem.extras`, i.e.
        G_ij = grad_row_i e^(L_ij - row_lse_i) + grad_col_j e^(L_ij - col_lse_j) + extras; an empty grad_row /
        grad_col (or LSE) is zero. dx / dy come in grad_dtype (default: the features' dtype). out=(dx_acc, dy_acc):
        fp32 tensors the feature gradients are added to and returned (a cross-rank running sum); in_place=True:
        they come from `_problem.accumulator` and a backend that can adds into them without temporaries.
    sigmoid_loss(problem, need_grad, *, out=None, in_place=False) -> (row_loss (N,) in acc, Gradients in acc or
        None): row sums of softplus(-z_ij L_ij), z = +1 on the positive pairs `problem.pos_cols` and -1 elsewhere,
        and with need_grad the gradients of their total from the same sweep; out / in_place as in lse_bwd.
    """

    def lse_fwd(self, problem: Problem, need_row: bool, need_col: bool) -> tuple[Tensor, Tensor]: ...

    def lse_bwd(self, problem: Problem, row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor, *,
                grad_dtype: torch.dtype | None = None, out: tuple[Tensor, Tensor] | None = None,
                in_place: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...

    def sigmoid_loss(self, problem: Problem, need_grad: bool, *, out: tuple[Tensor, Tensor] | None = None,
                     in_place: bool = False) -> tuple[Tensor, Gradients | None]: ...


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# whether the compiled backends can run here (each returns None, or the reason it cannot)
# ---------------------------------------------------------------------------------------------

def _cpu_unusable() -> str | None:
    from . import cpu
    if cpu.available():
        return None
    return (f"mmcl_fast: the compiled CPU core mmcl_fast._C does not import ({cpu._IMPORT_ERROR}); reinstall "
            "mmcl_fast (pip install .) to build it")


# The Triton backend reads `triton.knobs`, new in triton 3.4 (the release torch 2.8 pins); the triton that torch
# 2.4-2.7 pin (3.0-3.3) lacks it, and importing the backend would fail with an AttributeError.
TRITON_MIN = "3.4"


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
        return True, (f"mmcl_fast's Triton backend needs triton >= {TRITON_MIN} (triton.knobs), found {found} "
                      f"(torch < 2.8 pins an older triton)")
    return True, None


_TRITON_INSTALLED, _TRITON_TOO_OLD = _probe_triton()


def _triton_unusable() -> str | None:
    if not _TRITON_INSTALLED:
        return "mmcl_fast's Triton backend needs triton, which is not installed (pip install 'mmcl_fast[triton]')"
    return _TRITON_TOO_OLD


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Registration:
    """One backend. module: the import path of its `Backend` module; runs_on(device) and `needs` (for the error
    message) say which tensors it takes; dtypes: the feature dtypes it supports (None: any floating dtype); auto_on:
    the device types for which "auto" picks it; unusable(): None, or why it cannot run in this process (a missing
    compiled core, an old triton); fallback_note: what "auto" then says once, in a RuntimeWarning, unless
    quiet_fallback() (the backend is not expected here: no triton installed at all)."""

    name: str
    module: str
    summary: str
    runs_on: Callable[[torch.device], bool] = lambda device: True
    needs: str = ""
    dtypes: tuple[torch.dtype, ...] | None = None
    auto_on: tuple[str, ...] = ()
    unusable: Callable[[], str | None] = lambda: None
    fallback_note: str = ""
    quiet_fallback: Callable[[], bool] = lambda: False


REGISTRY: dict[str, Registration] = {r.name: r for r in (
    Registration("reference", "mmcl_fast.backends.reference", "dense torch (N x M), the ground truth"),
    Registration("torch", "mmcl_fast.backends.blocked", "blocked plain torch, any device and floating dtype"),
    Registration("cpu", "mmcl_fast.backends.cpu", "the compiled C++ core (AMX / AVX-512 / AVX2 / NEON / portable)",
                 runs_on=lambda device: device.type == "cpu", needs="CPU tensors", dtypes=KERNEL_DTYPES,
                 auto_on=("cpu",), unusable=_cpu_unusable,
                 fallback_note="backend='auto' uses the slower 'torch' backend on CPU tensors. Reinstall mmcl_fast "
                               "(pip install .) to build the core, or pass backend='torch' to silence this warning"),
    Registration("triton", "mmcl_fast.backends.triton", "fused Triton kernels for NVIDIA GPUs",
                 runs_on=lambda device: device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on()),
                 needs="CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)", dtypes=KERNEL_DTYPES,
                 auto_on=("cuda",), unusable=_triton_unusable, quiet_fallback=lambda: not _TRITON_INSTALLED,
                 fallback_note=f"backend='auto' uses the slower 'torch' backend on CUDA tensors. Install triton >= "
                               f"{TRITON_MIN} (with torch >= 2.8), or pass backend='torch' to silence this warning"),
)}

BACKENDS = ("auto",) + tuple(REGISTRY)
_FALLBACK = "torch"
_warned: set[str] = set()


def _warn_fallback(registration: Registration, reason: str) -> None:
    """Once per backend and process (never while torch.compile traces: a warning is a graph break, an error under
    fullgraph=True): "auto" could not use `registration` and runs the fallback."""
    if registration.name in _warned or torch.compiler.is_compiling():
        return
    _warned.add(registration.name)
    warnings.warn(f"{reason}; {registration.fallback_note}", RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The registered backend that runs features on `device` of `dtype` for a `backend=` argument.

    "auto": the first registration whose `auto_on` lists the device type, that supports the dtype and is usable here
    (cpu: the C++ core; cuda: Triton >= 3.4), otherwise the blocked "torch" backend (any device, any floating dtype,
    float64 included), which is exact and never N x M; a usable-elsewhere backend that is missing here warns once.
    "reference" (dense, N x M) is never picked automatically. A named backend is checked: ValueError for another
    device or an unknown name, TypeError for an unsupported dtype, ImportError when it cannot run here.
    """
    if backend == "auto":
        for registration in REGISTRY.values():
            if device.type not in registration.auto_on or dtype not in (registration.dtypes or (dtype,)):
                continue
            reason = registration.unusable()
            if reason is None:
                return registration.name
            if not registration.quiet_fallback():
                _warn_fallback(registration, reason)
        return _FALLBACK
    registration = REGISTRY.get(backend) if isinstance(backend, str) else None
    if registration is None:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not registration.runs_on(device):
        raise ValueError(f"backend={backend!r} needs {registration.needs}, got device {device}")
    if registration.dtypes is not None and dtype not in registration.dtypes:
        raise TypeError(f"backend={backend!r} supports float32/bfloat16/float16 features, got {dtype}")
    reason = registration.unusable()
    if reason is not None:
        raise ImportError(reason)
    return backend


def get_backend(name: str) -> Backend:
    """The module of a registered backend (a concrete name, as `resolve_backend` returns)."""
    registration = REGISTRY.get(name)
    if registration is None:
        raise ValueError(f"unknown concrete backend {name!r}: registered are {tuple(REGISTRY)}")
    return importlib.import_module(registration.module)


__all__ = ["BACKENDS", "Backend", "KERNEL_DTYPES", "REGISTRY", "Registration", "get_backend", "resolve_backend"]
