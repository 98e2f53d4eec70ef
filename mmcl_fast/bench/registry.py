"""The benchmark registry: what a benchmarked loss is, and the pieces every loss module shares.

A `LossBench` says how to make one problem's inputs, how to compute its loss exactly (float64, streamed so
that the reference itself never holds N x M), how many FLOPs a fused forward+backward does, and which
implementations compute it. Each `Impl` turns the inputs into a `step()` that runs one forward+backward and
returns the loss, says how much memory it is expected to need (the budget check that keeps a dense baseline
from running into swap) and, where the implementation has a distributed form, how to build the step of one
rank of a process group.

The losses themselves live in `mmcl_fast/bench/cases/` (one module per family) and register here with
`register_loss`; `impls.py` imports them all.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Step = Callable[[], Tensor]


@dataclass(frozen=True)
class Impl:
    """One implementation of a loss.

    make_step(inputs, params, options) -> step: inputs are the loss's tensors already on the bench device;
        step() runs forward + backward (gradients w.r.t. every floating input and every learnable scalar) and
        returns the detached loss.
    estimate_bytes(n, m, d, dtype): expected peak memory of one step (a model, see each impl).
    unavailable(device, d) -> None, or the reason this impl cannot run there.
    dense: True when the impl materialises N x M buffers (a baseline, subject to the memory budget).
    make_dist_step(local_inputs, params, options) -> step: one rank's step inside an initialised process group
        (options carry "rank", "world_size" and the loss's own options); step() returns this rank's loss, whose
        mean over ranks is the global loss. None: the impl has no distributed form.
    dist_unavailable() -> None, or the reason this build cannot run the distributed form (checked with
        world size > 1 only).
    dist_only: a variant that differs from another impl only across ranks (e.g. how blocks are exchanged): run with
        world size > 1 only.
    """

    name: str
    description: str
    make_step: Callable[[dict, dict, dict], Step]
    estimate_bytes: Callable[[int, int, int, torch.dtype], int]
    unavailable: Callable[[torch.device, int], str | None]
    dense: bool
    make_dist_step: Callable[[dict, dict, dict], Step] | None = None
    dist_unavailable: Callable[[], str | None] | None = None
    dist_only: bool = False


@dataclass(frozen=True)
class LossBench:
    """One loss: inputs, exact float64 reference, FLOP count of a fused fwd+bwd, and its implementations."""

    name: str
    description: str
    make_inputs: Callable[[int, int, torch.dtype, int], dict]
    params: dict
    reference: Callable[[dict, dict], float]
    flops: Callable[[int, int, int], int]
    impls: dict = field(default_factory=dict)
    anchor: str = "open_clip"  # speed and memory ratios are reported against this impl


LOSSES: dict[str, LossBench] = {}


def register_loss(loss: LossBench) -> LossBench:
    if loss.anchor not in loss.impls:
        raise ValueError(f"loss {loss.name!r}: anchor {loss.anchor!r} is not one of its impls {list(loss.impls)}")
    LOSSES[loss.name] = loss
    return loss


def get_loss(name: str) -> LossBench:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from: {', '.join(LOSSES)}")
    return LOSSES[name]


def split_rows(inputs: dict, rank: int, world_size: int) -> dict:
    """Rank `rank`'s share of a global batch: the same contiguous block of rows of every input tensor."""
    local = {}
    for name, tensor in inputs.items():
        n = tensor.shape[0]
        local[name] = tensor[rank * n // world_size:(rank + 1) * n // world_size].clone()
    return local


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def feature_generator(n: int, d: int, seed: int) -> torch.Generator:
    """A CPU generator seeded by (seed, n, d): every problem size gets its own reproducible features."""
    return torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + d)


def unit_features(n: int, d: int, generator: torch.Generator, near: Tensor | None = None,
                  noise: float = 0.5) -> Tensor:
    """(n, d) float32 unit-norm rows: random, or `near` plus `noise` times Gaussian noise, re-normalised."""
    base = torch.randn(n, d, generator=generator)
    if near is not None:
        base = near + noise * base
    return F.normalize(base, dim=1)


def paired_features(n: int, d: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """Unit-norm image features and text features correlated with them (positives on the diagonal), on CPU.

    Generated in float32 from a generator seeded by (seed, n, d), then rounded once to `dtype`.
    """
    generator = feature_generator(n, d, seed)
    image = unit_features(n, d, generator)
    text = unit_features(n, d, generator, near=image, noise=0.5)
    return image.to(dtype), text.to(dtype)


def late_training_features(n: int, d: int, seed: int = 3) -> tuple[Tensor, Tensor]:
    """Image / text features like a trained CLIP's on a batch with near-duplicates: images come in pairs around a
    shared direction (cosine ~0.99), each caption sits next to its image. At logit scale 100 a row's positive leads
    its near-duplicate by ~5 and the other ~4000 pairs by ~75-120."""
    generator = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    centre = unit(torch.randn(n // 2 + 1, d, generator=generator), dim=1).repeat_interleave(2, 0)[:n]
    image = unit(centre + 0.01 * torch.randn(n, d, generator=generator), dim=1)
    text = unit(image + 0.01 * torch.randn(n, d, generator=generator), dim=1)
    return image, text


# ---------------------------------------------------------------------------------------------
# float64 references, streamed over row blocks
# ---------------------------------------------------------------------------------------------

REFERENCE_BLOCK_BYTES = 1 << 28  # float64 logits per row block of a reference: 256 MiB


def block_rows(m: int, block_bytes: int | None = None) -> int:
    """Rows of an (rows, m) float64 block that fit in `block_bytes` (default: REFERENCE_BLOCK_BYTES)."""
    return max(1, (block_bytes or REFERENCE_BLOCK_BYTES) // (8 * max(m, 1)))


def streamed_lse64(x: Tensor, y: Tensor, scale: float, block_bytes: int | None = None, *,
                   row_bias: Tensor | None = None, col_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of scale * x @ y.T (+ row_bias[:, None] + col_bias[None, :]) in float64, one
    block of rows at a time (never N x M).

    A block holds at most `block_bytes` (default REFERENCE_BLOCK_BYTES) of float64 logits; column LSEs are
    merged across blocks.
    """
    x64, y64 = x.double(), y.double()
    n, m = x64.shape[0], y64.shape[0]
    rows = block_rows(m, block_bytes)
    row_bias = None if row_bias is None else row_bias.double()
    col_bias = None if col_bias is None else col_bias.double()

    def block_logits(start: int) -> Tensor:
        block = (x64[start:start + rows] @ y64.T).mul_(scale)
        if row_bias is not None:
            block += row_bias[start:start + rows, None]
        if col_bias is not None:
            block += col_bias[None, :]
        return block

    # Cauchy-Schwarz bounds every logit: |L_ij| <= bound. When exp(-2 bound) is still a normal float64, one
    # fixed shift is exact for every row and column alike, and each logit is exponentiated once, not twice.
    bound = abs(scale) * float(x64.norm(dim=1).max()) * float(y64.norm(dim=1).max())
    bound += sum(float(b.abs().max()) for b in (row_bias, col_bias) if b is not None and b.numel())
    if 2 * bound < 600:
        row_sum = torch.empty(n, dtype=torch.float64, device=x.device)
        col_sum = torch.zeros(m, dtype=torch.float64, device=x.device)
        for start in range(0, n, rows):
            block = block_logits(start).sub_(bound).exp_()
            row_sum[start:start + rows] = block.sum(1)
            col_sum += block.sum(0)
        return bound + row_sum.log(), bound + col_sum.log()
    row_lse = torch.empty(n, dtype=torch.float64, device=x.device)
    col_lse = torch.full((m,), -math.inf, dtype=torch.float64, device=x.device)
    for start in range(0, n, rows):
        block = block_logits(start)
        row_lse[start:start + rows] = torch.logsumexp(block, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(block, dim=0))
    return row_lse, col_lse


def rowdot64(first: Tensor, second: Tensor) -> Tensor:
    """<first_i, second_i> per row, in float64."""
    return (first.double() * second.double()).sum(1)


# ---------------------------------------------------------------------------------------------
# steps and availability
# ---------------------------------------------------------------------------------------------

def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def grad_stepper(loss_fn: Callable[[dict, dict], Tensor], inputs: dict, params: dict,
                 learnable: tuple[str, ...] = (), grad_divisor: int = 1) -> Step:
    """A step that runs loss_fn(tensors, scalars) forward and backward, w.r.t. every floating input tensor (made a
    leaf that requires grad) and every parameter named in `learnable` (a 0-d float32 leaf); the other parameters
    are passed as plain Python numbers. The step returns the loss; its backward is that of loss / grad_divisor
    (a rank of a process group of W: DDP averages the gradients over ranks)."""
    tensors = {name: tensor.requires_grad_(True) if tensor.is_floating_point() else tensor
               for name, tensor in inputs.items()}
    device = next(iter(inputs.values())).device
    scalars = {name: (torch.tensor(float(value), dtype=torch.float32, device=device, requires_grad=True)
                      if name in learnable else value) for name, value in params.items()}
    leaves = [t for t in tensors.values() if t.requires_grad] + [scalars[name] for name in learnable]

    def step() -> Tensor:
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn(tensors, scalars)
        (loss / grad_divisor if grad_divisor != 1 else loss).backward()
        return loss.detach()
    return step


def needs_module(module: str, device_type: str | None = None):
    """unavailable(): the package `module` must be installed (and the device of type `device_type`)."""
    def unavailable(device: torch.device, d: int) -> str | None:
        if device_type is not None and device.type != device_type:
            return f"needs a {device_type.upper()} device"
        if importlib.util.find_spec(module) is None:
            return f"package {module!r} is not installed"
        return None
    return unavailable


def always(device: torch.device, d: int) -> str | None:
    return None


def mmcl_fast_unavailable(device: torch.device, d: int) -> str | None:
    """Whether mmcl_fast has a kernel for `device` (the compiled CPU kernel, or the Triton backend on CUDA)."""
    if device.type == "cpu":
        from ..backends import cpu
        return None if cpu.available() else "the compiled CPU kernel mmcl_fast._C does not import"
    if device.type == "cuda":
        try:
            importlib.import_module("mmcl_fast.backends.triton")
        except ImportError as exc:
            return f"the Triton backend does not import ({exc})"
        return None
    return f"no kernel for device {device.type}"


def mmcl_fast_api_unavailable(*names: str):
    """unavailable() of an mmcl_fast loss that is only benchmarked where this build exports `names`."""
    def unavailable(device: torch.device, d: int) -> str | None:
        import mmcl_fast
        missing = [name for name in names if not hasattr(mmcl_fast, name)]
        if missing:
            return f"this mmcl_fast build has no {', '.join(missing)}"
        return mmcl_fast_unavailable(device, d)
    return unavailable
