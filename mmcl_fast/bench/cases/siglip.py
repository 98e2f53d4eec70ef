"""SigLIP: the pairwise sigmoid loss (Zhai et al. 2023) with learnable logit scale and bias, open_clip semantics.

    l_ij = s <x_i, y_j> + b,   z_ij = +1 on the diagonal, -1 elsewhere,   L = -(1/N) sum_ij log sigmoid(z_ij l_ij)

(s already exponentiated, as open_clip passes it; divided by the image batch size N.) Impls: mmcl_fast.siglip_loss
(one fused sweep), open_clip SigLipLoss (the anchor: dense N x M logits), its chunked mode where the installed
open_clip has one (``SigLipLoss(chunk_size=...)``: smaller logit blocks, but autograd keeps every block's
activations, so its memory stays N x M), and a dense PyTorch loss written from the formula with
`binary_cross_entropy_with_logits`. Distributed form: ``SigLipLoss(rank, world_size, dist_impl)`` on both sides
(the mean over ranks of the per-rank losses is the loss of the concatenated batch).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import (Impl, LossBench, always, block_rows, grad_stepper, itemsize, mmcl_fast_api_unavailable,
                        paired_features, register_loss)

LEARNABLE = ("logit_scale", "logit_bias")
# image rows per logit block of open_clip's chunked mode (the value its pull request #1145 shows)
OPEN_CLIP_CHUNK_ROWS = 512


def _inputs(n: int, d: int, dtype: torch.dtype, seed: int) -> dict:
    image, text = paired_features(n, d, dtype, seed)
    return {"image": image, "text": text}


def _softplus64(x: Tensor) -> Tensor:
    """log(1 + exp(x)) without a cut-off (torch's softplus returns x above 20, 2e-9 off)."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def _reference(inputs: dict, params: dict) -> float:
    """(1/N) sum_ij softplus(-z_ij l_ij) in float64 on the (rounded) inputs, one block of rows at a time."""
    image, text = inputs["image"].double(), inputs["text"].double()
    scale, bias = float(params["logit_scale"]), float(params["logit_bias"])
    n, m = image.shape[0], text.shape[0]
    rows = block_rows(m)
    total = torch.zeros((), dtype=torch.float64, device=image.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        logits = (image[start:stop] @ text.T).mul_(scale).add_(bias)
        terms = _softplus64(logits)  # every pair as a negative: -log sigmoid(-l) = softplus(l)
        diag = torch.arange(start, min(stop, m), device=image.device)
        terms[diag - start, diag] = _softplus64(-logits[diag - start, diag])  # positives: softplus(-l)
        total += terms.sum()
    return float(total / n)


def _flops(n: int, m: int, d: int) -> int:
    """6 N M D: the 3 GEMM-equivalents of one fused sweep (similarities, then dX and dY from the same tile)."""
    return 6 * n * m * d


def _stepper(loss_fn, inputs: dict, params: dict, grad_divisor: int = 1):
    return grad_stepper(lambda t, s: loss_fn(t["image"], t["text"], s["logit_scale"], s["logit_bias"]),
                        inputs, params, LEARNABLE, grad_divisor=grad_divisor)


def _mmcl_fast_step(inputs: dict, params: dict, options: dict):
    import mmcl_fast
    backend = options.get("backend", "auto")
    return _stepper(lambda image, text, scale, bias: mmcl_fast.siglip_loss(image, text, scale, bias, backend=backend),
                    inputs, params)


def _mmcl_fast_dist_step(inputs: dict, params: dict, options: dict, dist_impl: str | None = None):
    import mmcl_fast
    world = options["world_size"]
    module = mmcl_fast.SigLipLoss(rank=options["rank"], world_size=world,
                                  dist_impl=dist_impl or options.get("dist_impl"))
    return _stepper(module, inputs, params, grad_divisor=world)


def _mmcl_fast_gather_dist_step(inputs: dict, params: dict, options: dict):
    return _mmcl_fast_dist_step(inputs, params, options, dist_impl="gather")


def _mmcl_fast_dist_unavailable() -> str | None:
    import mmcl_fast
    if not hasattr(mmcl_fast, "SigLipLoss"):
        return "this mmcl_fast build has no SigLipLoss"
    try:  # the distributed form is built in the constructor's checks (rank, world size, dist_impl)
        mmcl_fast.SigLipLoss(rank=0, world_size=2)
    except Exception as exc:  # noqa: BLE001 - any failure means: not in this build
        return f"mmcl_fast.SigLipLoss(world_size=2) fails in this build: {type(exc).__name__}: {exc}"
    return None


def _mmcl_fast_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
    # feature gradients in the input dtype + fp32 gradient accumulators and temporaries, O((N + M) D)
    return (n + m) * d * (itemsize(dtype) + 12)


def _open_clip_module(options: dict, **chunking):
    from open_clip.loss import SigLipLoss
    return SigLipLoss(rank=options.get("rank", 0), world_size=options.get("world_size", 1),
                      dist_impl=options.get("dist_impl"), **chunking)


def _open_clip_step(inputs: dict, params: dict, options: dict):
    return _stepper(_open_clip_module(options), inputs, params)


def _open_clip_dist_step(inputs: dict, params: dict, options: dict):
    return _stepper(_open_clip_module(options), inputs, params, grad_divisor=options["world_size"])


def _open_clip_chunked_step(inputs: dict, params: dict, options: dict):
    return _stepper(_open_clip_module(options, chunk_size=OPEN_CLIP_CHUNK_ROWS), inputs, params)


def _open_clip_chunked_dist_step(inputs: dict, params: dict, options: dict):
    return _stepper(_open_clip_module(options, chunk_size=OPEN_CLIP_CHUNK_ROWS), inputs, params,
                    grad_divisor=options["world_size"])


def _open_clip_unavailable(device: torch.device, d: int) -> str | None:
    try:
        from open_clip.loss import SigLipLoss  # noqa: F401
    except ImportError as exc:
        return f"open_clip's SigLipLoss does not import ({exc})"
    return None


def _open_clip_chunked_unavailable(device: torch.device, d: int) -> str | None:
    reason = _open_clip_unavailable(device, d)
    if reason is None:
        from open_clip.loss import SigLipLoss
        if "chunk_size" not in inspect.signature(SigLipLoss.__init__).parameters:
            from ..machine import package_version
            reason = (f"open_clip {package_version('open_clip_torch')} has no chunked SigLipLoss "
                      "(SigLipLoss(chunk_size=...), open_clip pull request #1145)")
    return reason


def _dense_step(inputs: dict, params: dict, options: dict):
    def dense(image, text, scale, bias):
        logits = scale * image @ text.T + bias
        # -log sigmoid(z l) = binary cross-entropy of l against the target (z + 1) / 2: 1 on the diagonal
        targets = torch.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / image.shape[0]
    return _stepper(dense, inputs, params)


def _dense_bytes_model(buffers: int):
    def estimate_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
        # `buffers` live N x M matrices in the input dtype at the peak, + the feature gradients
        return buffers * n * m * itemsize(dtype) + (n + m) * d * itemsize(dtype)
    return estimate_bytes


# measured peaks on CPU (N = 2048, fp32 and bf16): open_clip SigLipLoss holds 7 N x M buffers (logits, the +-1
# labels and their product, logsigmoid, and the backward's gradients of each), the BCE formula 5. The chunked
# mode is budgeted as the dense one: autograd keeps every block.
_open_clip_bytes = _dense_bytes_model(7)
_dense_bytes = _dense_bytes_model(5)


SIGLIP = register_loss(LossBench(
    name="siglip",
    description="SigLIP pairwise sigmoid loss, learnable logit scale and bias (open_clip SigLipLoss semantics)",
    make_inputs=_inputs,
    params={"logit_scale": 10.0, "logit_bias": -10.0},  # SigLIP's initialisation
    reference=_reference,
    flops=_flops,
    impls={
        "mmcl_fast": Impl("mmcl_fast", "mmcl_fast.siglip_loss (fused forward+backward sweep, never N x N)",
                          _mmcl_fast_step, _mmcl_fast_bytes, mmcl_fast_api_unavailable("siglip_loss"), dense=False,
                          make_dist_step=_mmcl_fast_dist_step, dist_unavailable=_mmcl_fast_dist_unavailable),
        "mmcl_fast_gather": Impl("mmcl_fast_gather", "mmcl_fast SigLipLoss(dist_impl='gather'): all-gathered texts",
                                 _mmcl_fast_step, _mmcl_fast_bytes, mmcl_fast_api_unavailable("siglip_loss"),
                                 dense=False, make_dist_step=_mmcl_fast_gather_dist_step,
                                 dist_unavailable=_mmcl_fast_dist_unavailable, dist_only=True),
        "open_clip": Impl("open_clip", "open_clip.loss.SigLipLoss (dense N x N logits)",
                          _open_clip_step, _open_clip_bytes, _open_clip_unavailable, dense=True,
                          make_dist_step=_open_clip_dist_step),
        "open_clip_chunked": Impl("open_clip_chunked",
                                  f"open_clip.loss.SigLipLoss(chunk_size={OPEN_CLIP_CHUNK_ROWS}) "
                                  "(N x N under autograd)",
                                  _open_clip_chunked_step, _open_clip_bytes, _open_clip_chunked_unavailable,
                                  dense=True,
                                  make_dist_step=_open_clip_chunked_dist_step),
        "dense": Impl("dense", "dense logits + torch.nn.functional.binary_cross_entropy_with_logits",
                      _dense_step, _dense_bytes, always, dense=True),
    },
    anchor="open_clip",
))
