"""SigLIP across ranks: the exact sigmoid loss of the concatenated batch, gradients computed in the forward sweep.

Rank r holds n_r paired images X_r and texts Y_r; N = sum_r n_r. It returns

    loss_r = (W / N) sum_{i in r} sum_j softplus(-z_ij L_ij),   L_ij = s <x_i, y_j> + b,   z_ij = +1 iff i == j

so that the mean over ranks of loss_r is the single-process loss of the concatenated batch (for equal local
batches, loss_r is open_clip's per-rank SigLipLoss). The gradient weights -z_ij sigmoid(-z_ij L_ij) are
elementwise, so the one fused sweep per text block that gives the loss also gives every gradient: dX_r is summed
locally in fp32, block k's dY partial is added in fp32 to an accumulator that travels back to owner k during the
same forward pass, and the scale / bias gradients are reduced from the tiles. The backward only multiplies the
stored fp32 gradients by the upstream gradient and rounds once: no communication of features, nothing saved per
block (3 N_r * N * D GEMM-equivalents per rank in all).

Transports (`dist_impl`, open_clip's names; see `_transport.py`):
- "bidir" (default): each rank's text block is split in two halves that travel around the ring in opposite
  directions, so both directions of every link carry data; "shift": whole blocks, one direction. Per rank:
  O(n_r * D + max_k n_k * D), independent of W; the next block in flight while the current tile is computed.
- "reduce": block k is broadcast from its owner and the fp32 dY partials are summed back onto it (dist.reduce),
  the next broadcast in flight during the current tile. Also independent of W.
- "gather": one all-gather of every text block (O(N * D) per rank), one sweep, one fp32 reduce-scatter of dY.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._autocast import autocast_off
from .._numerics import accumulation_dtype
from .._problem import Problem, accumulator
from .._validate import unit_stride
from ..backends import get_backend
from . import _transport
from ._checks import Layout, as_scalar_tensor, exchange_and_check

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


@dataclass
class _Call:
    layout: Layout
    group: object
    backend: object
    impl: str
    acc: torch.dtype
    need_grad: bool
    overlap: bool


class _SiglipAcrossRanks(torch.autograd.Function):
    """loss_r of the module docstring; its gradients come out of the forward's sweep."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, call: _Call) -> Tensor:
        layout, acc, need_grad = call.layout, call.acc, call.need_grad
        rank, world = layout.rank, layout.world
        # the captions travel between ranks: point-to-point and collective ops need them contiguous
        x, y = unit_stride(image.detach()), text.detach().contiguous()
        n, dim = x.shape
        device = x.device
        scale_v = scale.detach().to(acc).expand(n).contiguous()
        bias_v = bias.detach().to(acc).expand(n).contiguous()
        own_texts = torch.arange(layout.text_offset(rank), layout.text_offset(rank) + n, device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        d_image = accumulator(n, dim, acc, device) if need_grad else None
        d_scale = torch.zeros((), dtype=acc, device=device)
        d_bias = torch.zeros((), dtype=acc, device=device)

        def tile(y_k: Tensor, text_start: int, d_text: Tensor | None) -> None:
            """Loss and gradients of (X_r, the texts [text_start, text_start + m_k)); d_text += the tile's dY."""
            m_k = y_k.shape[0]
            if not m_k:
                return
            local = own_texts - text_start
            positives = torch.where((local >= 0) & (local < m_k), local, -1)[:, None].contiguous()
            problem = Problem(x, y_k, scale_v, bias_v, torch.zeros(m_k, dtype=acc, device=device),
                              pos_cols=positives)
            row_loss, grads = call.backend.sigmoid_loss(problem, need_grad,
                                                        out=(d_image, d_text) if need_grad else None,
                                                        in_place=True)
            total.add_(row_loss.to(torch.float64).sum())
            if need_grad:
                d_scale.add_(grads.dscale.to(acc).sum())
                d_bias.add_(grads.drow_bias.to(acc).sum())

        def add(lane, d_text, partial):
            d_text.add_(partial)

        sizes = layout.text_sizes
        if call.impl in ("bidir", "shift"):
            # bidir: the first half of each block travels to rank + 1, the second half to rank - 1
            halves = [((size + 1) // 2 if call.impl == "bidir" else size) for size in sizes]
            spans = [(lambda q: (0, halves[q]))]
            if call.impl == "bidir":
                spans.append(lambda q: (halves[q], sizes[q]))
            lanes = []
            for index, span in enumerate(spans):
                lo, hi = span(rank)
                lanes.append(_transport.Lane(
                    +1 if index == 0 else -1, [y[lo:hi]],
                    lambda q, span=span: [((span(q)[1] - span(q)[0], dim), y.dtype)],
                    lambda q, span=span: ((span(q)[1] - span(q)[0], dim), acc) if need_grad else None))

            def visit(lane, origin, held, d_text, fresh):
                if fresh and d_text is not None:
                    d_text.zero_()
                tile(held[0], layout.text_offset(origin) + spans[lane](origin)[0], d_text)

            # the own block's halves come home into one (n, D) accumulator
            d_text = accumulator(n, dim, acc, device) if need_grad else None
            final = [d_text[slice(*span(rank))] for span in spans] if need_grad else None
            _transport.ring_pass(call.group, rank, world, lanes, visit, add, device, call.overlap, final)
        elif call.impl == "reduce":
            d_text = _transport.broadcast_pass(
                call.group, rank, world, y, lambda q: ((sizes[q], dim), y.dtype),
                lambda origin, block, d_block: tile(block, layout.text_offset(origin), d_block),
                (lambda q: ((sizes[q], dim), acc)) if need_grad else None, call.overlap)
        else:
            all_text = _transport.all_gather_rows(y, sizes, call.group)
            d_all = accumulator(layout.n_texts, dim, acc, device) if need_grad else None
            tile(all_text, 0, d_all)
            del all_text
            d_text = _transport.reduce_scatter_rows(d_all, sizes, call.group) if need_grad else None

        weight = world / layout.n_texts
        ctx.scale_shape, ctx.bias_shape = scale.shape, bias.shape
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype, bias.dtype)
        ctx.group = call.group
        # Kept on ctx, not saved for backward: the backward scales them in place (fp32 features: no copy at all) and
        # drops them, so the step never holds a second (n, D) pair.
        ctx.grads = ((d_image.mul_(weight), d_text.mul_(weight), d_scale.mul_(weight), d_bias.mul_(weight))
                     if need_grad else None)
        return (total * weight).to(acc)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.grads is None:
            raise RuntimeError("mmcl_fast.distributed.siglip_loss: its backward runs once per forward (the gradients "
                               "computed in the forward were handed out by the first backward)")
        d_image, d_text, d_scale, d_bias = ctx.grads
        ctx.grads = None
        g = grad_loss.detach().to(d_image.dtype)
        _check_same_upstream(g, ctx.group)
        image_dtype, text_dtype, scale_dtype, bias_dtype = ctx.dtypes
        return (d_image.mul_(g).to(image_dtype), d_text.mul_(g).to(text_dtype),
                d_scale.mul_(g).to(scale_dtype).reshape(ctx.scale_shape),
                d_bias.mul_(g).to(bias_dtype).reshape(ctx.bias_shape), None)


def _check_same_upstream(grad: Tensor, group) -> None:
    """The texts' gradients were summed over ranks in the forward, before the upstream gradients were known: that is
    exact when every rank back-propagates the same upstream gradient into its loss_r (``loss_r.backward()`` or
    ``(loss_r / W).backward()`` on every rank, as DDP training does). One all-gather of W numbers checks it."""
    world = dist.get_world_size(group)
    everyone = grad.reshape(1).new_empty(world)
    _transport.all_gather_into(everyone, grad.reshape(1).contiguous(), group)
    if everyone.device.type == "cpu":
        if not bool((everyone == everyone[0]).all()):
            raise RuntimeError(f"mmcl_fast.distributed.siglip_loss: the ranks back-propagated different upstream "
                               f"gradients into their losses ({everyone.tolist()}); the cross-rank text gradients "
                               "assume the same one on every rank (loss.backward() or (loss / W).backward() "
                               "everywhere). Scale the loss after a global reduction instead")
    elif not torch.compiler.is_compiling():
        torch._assert_async((everyone == everyone[0]).all(),
                             "mmcl_fast.distributed.siglip_loss: the ranks back-propagated different upstream "
                             "gradients into their losses")


@autocast_off
def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
                dist_impl: str = "bidir", equal_batches: bool = False, group=None, rank: int | None = None,
                world_size: int | None = None, backend: str = "auto") -> Tensor:
    """Exact SigLIP loss over the batch concatenated across the ranks of `group`, O(N_local * D) memory per rank
    (O(N * D) with dist_impl="gather").

    Every rank calls it with its own paired local batch (image i <-> text i). Rank r computes the sigmoid terms of its
    images against every rank's texts, one fused sweep per text block (positives only in its own block), and returns

        loss_r = (W / N) sum_{i in rank r} sum_j softplus(-z_ij L_ij),   N = sum of the local batch sizes,

    so that the mean over ranks of loss_r is the single-process loss of the concatenated batch (for equal local
    batches loss_r is exactly open_clip's per-rank SigLipLoss). How the text blocks travel (`dist_impl`, open_clip's
    names): "bidir" (default; halves of each block around the ring in both directions) and "shift" (whole blocks, one
    direction) are rings, "reduce" broadcasts each rank's block in turn, "gather" all-gathers every block. Every
    mode computes all gradients in the forward and sends the text gradients back to their owners in fp32.

    Args:
        equal_batches: promise the same local batch size on every rank and call (checked once per (group, shapes,
            configuration); no host synchronisation before the loss's collectives afterwards).
        group: as in `mmcl_fast.distributed.clip_loss`.
        rank: as in `mmcl_fast.distributed.clip_loss`.
        world_size: as in `mmcl_fast.distributed.clip_loss`.
        backend: as in `mmcl_fast.distributed.clip_loss`.

    Gradient semantics (DDP): as `clip_loss`: after every rank runs ``(loss_r / W).backward()`` (what DDP's gradient
    averaging amounts to), each rank's feature gradients equal the single-process gradients dL/d(its rows), and the
    logit_scale / logit_bias gradients summed over ranks equal dL/ds, dL/db. Every rank must call the backward with
    the same upstream gradient (checked: one all-gather of W numbers).

    Returns:
        0-d tensor, float32 for float32/bf16/fp16 features (float64 for float64).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                         "first (or use mmcl_fast.siglip_loss in a single process)")
    if dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
    checked = exchange_and_check(image_features, text_features, logit_scale, logit_bias, loss="siglip",
                                 dist_impl=dist_impl, backend=backend, equal_batches=equal_batches, rank_arg=rank,
                                 world_arg=world_size, group=group)
    acc = accumulation_dtype(image_features.dtype)
    scale = as_scalar_tensor(checked.logit_scale, image_features)
    bias = as_scalar_tensor(0.0 if checked.logit_bias is None else checked.logit_bias, image_features)
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_features, text_features, scale, bias))
    call = _Call(checked.layout, group, get_backend(checked.backend), dist_impl, acc, need_grad,
                 _transport.overlap_accumulator(image_features.device))
    return _SiglipAcrossRanks.apply(image_features, text_features, scale, bias, call)
