"""CLIP: symmetric InfoNCE with a learnable (already exponentiated) logit scale, open_clip `ClipLoss` semantics.

    L = ½ [mean_i (row_lse_i - L_ii) + mean_j (col_lse_j - L_jj)],   L_ij = s <x_i, y_j>

Impls: mmcl_fast.clip_loss (fused streamed LSE), open_clip ClipLoss (the anchor, dense N x N logits), a naive
dense loss written with `cross_entropy`, and Inf-CL on CUDA. Distributed form (world size > 1):
``ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)`` on both sides, ``(loss / W).backward()``;
mmcl_fast with its default ring and, as `mmcl_fast_gather`, with dist_impl="gather".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import (Impl, LossBench, always, grad_stepper, itemsize, mmcl_fast_unavailable, needs_module,
                        paired_features, register_loss, streamed_lse64)

LEARNABLE = ("logit_scale",)


def _inputs(n: int, d: int, dtype: torch.dtype, seed: int) -> dict:
    image, text = paired_features(n, d, dtype, seed)
    return {"image": image, "text": text}


def _reference(inputs: dict, params: dict) -> float:
    """½ [mean_i (row_lse_i - L_ii) + mean_j (col_lse_j - L_jj)] in float64 on the (rounded) inputs."""
    image, text, scale = inputs["image"], inputs["text"], float(params["logit_scale"])
    row_lse, col_lse = streamed_lse64(image, text, scale)
    positives = scale * (image.double() * text.double()).sum(1)
    return float(0.5 * ((row_lse - positives).mean() + (col_lse - positives).mean()))


def _flops(n: int, m: int, d: int) -> int:
    """8 N M D: the 4 GEMM-equivalents of a fused forward (1) + backward (3) of the symmetric loss."""
    return 8 * n * m * d


def _stepper(loss_fn, inputs: dict, params: dict):
    return grad_stepper(lambda t, s: loss_fn(t["image"], t["text"], s["logit_scale"]), inputs, params, LEARNABLE)


def _dist_stepper(loss_module, inputs: dict, params: dict, world_size: int):
    # DDP averages gradients over ranks: each rank backpropagates its loss / W
    return grad_stepper(lambda t, s: loss_module(t["image"], t["text"], s["logit_scale"]), inputs, params, LEARNABLE,
                        grad_divisor=world_size)


def _mmcl_fast_step(inputs: dict, params: dict, options: dict):
    from ...losses.clip import clip_loss
    backend = options.get("backend", "auto")
    return _stepper(lambda image, text, scale: clip_loss(image, text, scale, backend=backend), inputs, params)


def _mmcl_fast_dist_step(inputs: dict, params: dict, options: dict, dist_impl: str = "ring"):
    from ...losses.clip import ClipLoss
    module = ClipLoss(local_loss=True, gather_with_grad=True, rank=options["rank"], world_size=options["world_size"],
                      dist_impl=dist_impl)
    return _dist_stepper(module, inputs, params, options["world_size"])


def _mmcl_fast_gather_dist_step(inputs: dict, params: dict, options: dict):
    return _mmcl_fast_dist_step(inputs, params, options, dist_impl="gather")


def _mmcl_fast_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
    # feature gradients in the input dtype + fp32 gradient accumulators and fp32 row-dot temporaries
    return (n + m) * d * (itemsize(dtype) + 12)


def _open_clip_step(inputs: dict, params: dict, options: dict):
    from open_clip.loss import ClipLoss
    loss_module = ClipLoss()
    return _stepper(lambda image, text, scale: loss_module(image, text, scale), inputs, params)


def _open_clip_dist_step(inputs: dict, params: dict, options: dict):
    from open_clip.loss import ClipLoss
    module = ClipLoss(local_loss=True, gather_with_grad=True, rank=options["rank"], world_size=options["world_size"])
    return _dist_stepper(module, inputs, params, options["world_size"])


def _naive_step(inputs: dict, params: dict, options: dict):
    def naive(image, text, scale):
        logits = scale * image @ text.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return _stepper(naive, inputs, params)


def _dense_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
    # measured on CPU and CUDA for open_clip and the naive loss: ~4 live N x M buffers in the input dtype at
    # the peak (logits, their transpose or softmax, and the backward's gradient of each), + feature gradients
    return 4 * n * m * itemsize(dtype) + (n + m) * d * itemsize(dtype)


def _inf_cl_head_dim(d: int) -> int | None:
    for head_dim in (256, 128, 64, 32, 16):
        if d % head_dim == 0:
            return head_dim
    return None


def _inf_cl_step(inputs: dict, params: dict, options: dict):
    from inf_cl import cal_inf_loss
    head_dim = _inf_cl_head_dim(inputs["image"].shape[1])

    def inf_cl(image, text, scale):
        # Inf-CL computes one direction per call (row LSE only): the symmetric loss is two calls
        image_to_text = cal_inf_loss(image, text, scale=scale, head_dim=head_dim)
        text_to_image = cal_inf_loss(text, image, scale=scale, head_dim=head_dim)
        return 0.5 * (image_to_text + text_to_image)
    return _stepper(inf_cl, inputs, params)


def _inf_cl_unavailable(device: torch.device, d: int) -> str | None:
    reason = needs_module("inf_cl", "cuda")(device, d)
    if reason is None and _inf_cl_head_dim(d) is None:
        reason = f"inf_cl needs the feature size to be a multiple of 16, got {d}"
    return reason


def _inf_cl_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
    # fp32 copies of both feature sets, the scaled query and fp32 dq/dk for each of the two directions
    return (n + m) * d * 4 * 8


CLIP = register_loss(LossBench(
    name="clip",
    description="symmetric CLIP / InfoNCE loss, learnable logit scale (open_clip ClipLoss semantics)",
    make_inputs=_inputs,
    params={"logit_scale": 100.0},
    reference=_reference,
    flops=_flops,
    impls={
        "mmcl_fast": Impl("mmcl_fast", "mmcl_fast.clip_loss (fused streamed LSE, never N x N; ring across ranks)",
                          _mmcl_fast_step, _mmcl_fast_bytes, mmcl_fast_unavailable, dense=False,
                          make_dist_step=_mmcl_fast_dist_step),
        "mmcl_fast_gather": Impl("mmcl_fast_gather", "mmcl_fast ClipLoss(dist_impl='gather'): all-gathered captions",
                                 _mmcl_fast_step, _mmcl_fast_bytes, mmcl_fast_unavailable, dense=False,
                                 make_dist_step=_mmcl_fast_gather_dist_step, dist_only=True),
        "open_clip": Impl("open_clip", "open_clip.loss.ClipLoss (dense N x N logits)",
                          _open_clip_step, _dense_bytes, needs_module("open_clip"), dense=True,
                          make_dist_step=_open_clip_dist_step),
        "naive": Impl("naive", "dense logits + torch.nn.functional.cross_entropy both ways",
                      _naive_step, _dense_bytes, always, dense=True),
        "inf_cl": Impl("inf_cl", "inf_cl.cal_inf_loss, one call per direction (CUDA only)",
                       _inf_cl_step, _inf_cl_bytes, _inf_cl_unavailable, dense=False),
    },
    anchor="open_clip",
))
