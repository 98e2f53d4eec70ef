"""What the benchmark compares: a registry of losses, each with its implementations and exact reference.

A `LossBench` says how to make one problem's inputs, how to compute its loss exactly (float64, streamed so
that the reference itself never holds N x M), how many FLOPs a fused forward+backward does, and which
implementations compute it. Each `Impl` turns the inputs into a `step()` that runs one forward+backward and
returns the loss, and says how much memory it is expected to need (the budget check that keeps a dense
baseline from running into swap).

Adding a loss (SigLIP, the Brownian bridge, uniformity, ...) is one more `LossBench` passed to `register_loss`.
"""
from __future__ import annotations

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
        step() runs forward + backward (gradients w.r.t. the features and every learnable scalar) and
        returns the detached loss.
    estimate_bytes(n, m, d, dtype): expected peak memory of one step (a model, see each impl).
    unavailable(device, d) -> None, or the reason this impl cannot run there.
    dense: True when the impl materialises N x M buffers (a baseline, subject to the memory budget).
    """

    name: str
    description: str
    make_step: Callable[[dict, dict, dict], Step]
    estimate_bytes: Callable[[int, int, int, torch.dtype], int]
    unavailable: Callable[[torch.device, int], str | None]
    dense: bool


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


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------

def paired_features(n: int, d: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """Unit-norm image features and text features correlated with them (positives on the diagonal), on CPU.

    Generated in float32 from a generator seeded by (seed, n, d), then rounded once to `dtype`.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + d)
    image = F.normalize(torch.randn(n, d, generator=generator), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(n, d, generator=generator), dim=1)
    return image.to(dtype), text.to(dtype)


def streamed_lse64(x: Tensor, y: Tensor, scale: float, block_bytes: int = 1 << 28) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of scale * x @ y.T in float64, one block of rows at a time (never N x M).

    A block holds at most `block_bytes` of float64 logits; column LSEs are merged across blocks.
    """
    x64, y64 = x.double(), y.double()
    n, m = x64.shape[0], y64.shape[0]
    rows = max(1, block_bytes // (8 * m))
    # Cauchy-Schwarz bounds every logit: |L_ij| <= bound. When exp(-2 bound) is still a normal float64, one
    # fixed shift is exact for every row and column alike, and each logit is exponentiated once, not twice.
    bound = abs(scale) * float(x64.norm(dim=1).max()) * float(y64.norm(dim=1).max())
    if 2 * bound < 600:
        row_sum = torch.empty(n, dtype=torch.float64, device=x.device)
        col_sum = torch.zeros(m, dtype=torch.float64, device=x.device)
        for start in range(0, n, rows):
            block = (x64[start:start + rows] @ y64.T).mul_(scale).sub_(bound).exp_()
            row_sum[start:start + rows] = block.sum(1)
            col_sum += block.sum(0)
        return bound + row_sum.log(), bound + col_sum.log()
    row_lse = torch.empty(n, dtype=torch.float64, device=x.device)
    col_lse = torch.full((m,), -math.inf, dtype=torch.float64, device=x.device)
    for start in range(0, n, rows):
        block = scale * (x64[start:start + rows] @ y64.T)
        row_lse[start:start + rows] = torch.logsumexp(block, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(block, dim=0))
    return row_lse, col_lse


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _needs_module(module: str, device_type: str | None = None):
    def unavailable(device: torch.device, d: int) -> str | None:
        if device_type is not None and device.type != device_type:
            return f"needs a {device_type.upper()} device"
        if importlib.util.find_spec(module) is None:
            return f"package {module!r} is not installed"
        return None
    return unavailable


def _always(device: torch.device, d: int) -> str | None:
    return None


# ---------------------------------------------------------------------------------------------
# CLIP: symmetric InfoNCE with a learnable (already exponentiated) logit scale
# ---------------------------------------------------------------------------------------------

def _clip_inputs(n: int, d: int, dtype: torch.dtype, seed: int) -> dict:
    image, text = paired_features(n, d, dtype, seed)
    return {"image": image, "text": text}


def _clip_reference(inputs: dict, params: dict) -> float:
    """½ [mean_i (row_lse_i - L_ii) + mean_j (col_lse_j - L_jj)] in float64 on the (rounded) inputs."""
    image, text, scale = inputs["image"], inputs["text"], float(params["logit_scale"])
    row_lse, col_lse = streamed_lse64(image, text, scale)
    positives = scale * (image.double() * text.double()).sum(1)
    return float(0.5 * ((row_lse - positives).mean() + (col_lse - positives).mean()))


def _clip_flops(n: int, m: int, d: int) -> int:
    """8 N M D: the 4 GEMM-equivalents of a fused forward (1) + backward (3) of the symmetric loss."""
    return 8 * n * m * d


def _leaves(inputs: dict, params: dict) -> tuple[Tensor, Tensor, Tensor]:
    image = inputs["image"].requires_grad_(True)
    text = inputs["text"].requires_grad_(True)
    scale = torch.tensor(float(params["logit_scale"]), dtype=torch.float32, device=image.device,
                         requires_grad=True)
    return image, text, scale


def _stepper(loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor], inputs: dict, params: dict) -> Step:
    image, text, scale = _leaves(inputs, params)

    def step() -> Tensor:
        image.grad = text.grad = scale.grad = None
        loss = loss_fn(image, text, scale)
        loss.backward()
        return loss.detach()
    return step


def _mmcl_fast_step(inputs: dict, params: dict, options: dict) -> Step:
    from ..losses.clip import clip_loss
    backend = options.get("backend", "auto")
    return _stepper(lambda image, text, scale: clip_loss(image, text, scale, backend=backend), inputs, params)


def _mmcl_fast_unavailable(device: torch.device, d: int) -> str | None:
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


def _mmcl_fast_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
    # feature gradients in the input dtype + fp32 gradient accumulators and fp32 row-dot temporaries
    return (n + m) * d * (_itemsize(dtype) + 12)


def _open_clip_step(inputs: dict, params: dict, options: dict) -> Step:
    from open_clip.loss import ClipLoss
    loss_module = ClipLoss()
    return _stepper(lambda image, text, scale: loss_module(image, text, scale), inputs, params)


def _naive_step(inputs: dict, params: dict, options: dict) -> Step:
    def naive(image, text, scale):
        logits = scale * image @ text.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return _stepper(naive, inputs, params)


def _dense_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
    # measured on CPU and CUDA for open_clip and the naive loss: ~4 live N x M buffers in the input dtype at
    # the peak (logits, their transpose or softmax, and the backward's gradient of each), + feature gradients
    return 4 * n * m * _itemsize(dtype) + (n + m) * d * _itemsize(dtype)


def _inf_cl_head_dim(d: int) -> int | None:
    for head_dim in (256, 128, 64, 32, 16):
        if d % head_dim == 0:
            return head_dim
    return None


def _inf_cl_step(inputs: dict, params: dict, options: dict) -> Step:
    from inf_cl import cal_inf_loss
    head_dim = _inf_cl_head_dim(inputs["image"].shape[1])

    def inf_cl(image, text, scale):
        # Inf-CL computes one direction per call (row LSE only): the symmetric loss is two calls
        image_to_text = cal_inf_loss(image, text, scale=scale, head_dim=head_dim)
        text_to_image = cal_inf_loss(text, image, scale=scale, head_dim=head_dim)
        return 0.5 * (image_to_text + text_to_image)
    return _stepper(inf_cl, inputs, params)


def _inf_cl_unavailable(device: torch.device, d: int) -> str | None:
    reason = _needs_module("inf_cl", "cuda")(device, d)
    if reason is None and _inf_cl_head_dim(d) is None:
        reason = f"inf_cl needs the feature size to be a multiple of 16, got {d}"
    return reason


def _inf_cl_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
    # fp32 copies of both feature sets, the scaled query and fp32 dq/dk for each of the two directions
    return (n + m) * d * 4 * 8


CLIP = register_loss(LossBench(
    name="clip",
    description="symmetric CLIP / InfoNCE loss, learnable logit scale (open_clip ClipLoss semantics)",
    make_inputs=_clip_inputs,
    params={"logit_scale": 100.0},
    reference=_clip_reference,
    flops=_clip_flops,
    impls={
        "mmcl_fast": Impl("mmcl_fast", "mmcl_fast.clip_loss (fused streamed LSE, never N x N)",
                          _mmcl_fast_step, _mmcl_fast_bytes, _mmcl_fast_unavailable, dense=False),
        "open_clip": Impl("open_clip", "open_clip.loss.ClipLoss (dense N x N logits)",
                          _open_clip_step, _dense_bytes, _needs_module("open_clip"), dense=True),
        "naive": Impl("naive", "dense logits + torch.nn.functional.cross_entropy both ways",
                      _naive_step, _dense_bytes, _always, dense=True),
        "inf_cl": Impl("inf_cl", "inf_cl.cal_inf_loss, one call per direction (CUDA only)",
                       _inf_cl_step, _inf_cl_bytes, _inf_cl_unavailable, dense=False),
    },
    anchor="open_clip",
))
