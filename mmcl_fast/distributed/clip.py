"""CLIP / InfoNCE across ranks: the exact loss of the concatenated batch, with labels and label smoothing.

Rank r holds n_r images X_r and m_r captions Y_r (paired, or with global labels). Over the concatenated batch
(N images, M captions), with L_ij = s <x_i, y_j> + b, label smoothing e, image i's caption t_i and caption j's
image l_j:

    row_i = lse_j L_ij - (1 - e) L_{i t_i} - (e / M) sum_j L_ij
    col_j = lse_i L_ij - (1 - e) L_{l_j j} - (e / N) sum_i L_ij
    L = 1/2 [ (1/N) sum_i row_i + (1/M) sum_j col_j ]

Rank r owns the row terms of its images and the column terms of its captions, and returns
loss_r = (W / 2) [ (1/N) sum_{i in r} row_i + (1/M) sum_{j in r} col_j ], so that sum_r loss_r / W = L.

Forward: for every caption block k, rank r computes the tile (X_r, Y_k) once with the fused primitive (row and
column LSE in one pass), merges its rows' LSE locally and adds the tile's column LSE partial, and the positives it
finds, to block k's accumulator, which ends at owner k. Backward: the blocks go round again carrying their column
LSE and column gradient weights; each tile's recompute gives dX_r (kept locally, fp32) and block k's dY partial,
added in fp32 to the accumulator that ends at owner k and is rounded once to the features' dtype there. The sum
terms of label smoothing are mat-vecs against sum_j y_j and sum_i x_i (two all-reduces of D numbers).

Transports (`dist_impl`, see `_transport.py`):
- "ring" (the default): caption blocks travel around the ring, the next block in flight while the current tile is
  computed. Per rank: O((n_r + max_k m_k) * D), independent of W: the own block, two travelling blocks and one or
  two fp32 accumulators. Traffic per step: one block (features' dtype) forward; one block plus its fp32 dY backward.
- "gather": one all-gather of all captions (O(M * D) per rank, kept for the backward), all-reduces of the column
  statistics (O(M) numbers), one fp32 reduce-scatter of dY. Fewer, larger messages: faster at small W, but per-rank
  memory grows with W.
GEMM count: 4 N_r * M * D GEMM-equivalents per rank (forward 1, backward 3); the ranks together do the work of one
process, nothing is recomputed for the transport.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._autocast import autocast_off
from .._numerics import accumulation_dtype
from .._problem import Extras, Problem, accumulator
from .._stats import blocked_rowdot
from .._validate import unit_stride
from ..backends import get_backend
from . import _transport
from ._checks import Layout, as_scalar_tensor, exchange_and_check

CLIP_DIST_IMPLS = ("ring", "gather")
# Measured (CPU, gloo, W = 4, N_local = 2048, D = 1024 fp32; docs/benchmarks.md#distributed): the ring's step time
# is within a few percent of gather's while its per-rank memory stays flat in W, so it is the default.
DEFAULT_CLIP_DIST_IMPL = "ring"


@dataclass
class _Call:
    """Everything one call needs besides the tensors autograd tracks."""

    layout: Layout
    group: object
    backend: object  # the backend module
    impl: str
    acc: torch.dtype
    smoothing: float
    row_target: Tensor         # (n_r,) global caption index of each own image
    own_col_labels: Tensor     # (m_r,) global image index of each own caption
    labels_travel: bool        # captions' labels travel with their block (given text_labels) or follow the layout
    labels_given: bool         # any labels given: a positive pair may sit in any block (else only in the own one)
    overlap: bool

    def col_labels(self, origin: int, payload: list) -> Tensor:
        if self.labels_travel:
            return payload[-1]
        start = self.layout.image_offset(origin)
        return torch.arange(start, start + self.layout.text_sizes[origin], device=self.row_target.device)


_DOT_ROWS = 256  # rows per chunk of the positives' gathered dot products: an O(256 * D) temporary, not O(n * D)


def _positive_logits(x: Tensor, y: Tensor, index: Tensor, inside: Tensor, scale: Tensor, bias: Tensor,
                     acc: torch.dtype, rows_of_x: bool) -> Tensor:
    """L at (row i, column index_i) (rows_of_x) or (row index_j, column j), 0 where not `inside` this tile."""
    rows, other = (x, y) if rows_of_x else (y, x)
    dots = torch.cat([blocked_rowdot(rows[start:start + _DOT_ROWS], other, index[start:start + _DOT_ROWS], acc)
                      for start in range(0, rows.shape[0], _DOT_ROWS)])
    return torch.where(inside, scale * dots + bias, torch.zeros((), dtype=acc, device=x.device))


def _local(index: Tensor, start: int, size: int) -> tuple[Tensor, Tensor]:
    """(index - start clamped into the block, whether it was inside [start, start + size))."""
    local = index - start
    inside = (local >= 0) & (local < size)
    return local.clamp(0, max(size - 1, 0)).contiguous(), inside


class _ClipAcrossRanks(torch.autograd.Function):
    """loss_r of the module docstring; backward: every rank's tiles again, dY partials returned to their owners."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, call: _Call) -> Tensor:
        layout, acc = call.layout, call.acc
        rank, world = layout.rank, layout.world
        # the captions travel between ranks: point-to-point and collective ops need them contiguous
        x, y = unit_stride(image.detach()), text.detach().contiguous()
        n, m, dim = x.shape[0], y.shape[0], x.shape[1]
        device = x.device
        scale_v = scale.detach().to(acc).expand(n).contiguous()
        bias_v = bias.detach().to(acc).expand(n).contiguous()
        scale_0, bias_0 = scale_v[:1], bias_v[:1]
        row_lse = torch.full((n,), float("-inf"), dtype=acc, device=device)
        row_pos = torch.zeros(n, dtype=acc, device=device)
        own_start = layout.image_offset(rank)

        def tile(y_k: Tensor, text_start: int, col_labels: Tensor, with_positives: bool) -> Tensor:
            """Row LSE / positives merged here; returns the tile's column (LSE partial, positive logit) pairs.
            with_positives=False: the block holds no positive pair of this rank (diagonal labels, another block)."""
            m_k = y_k.shape[0]
            col_lse, col_pos = (torch.full((m_k,), float("-inf"), dtype=acc, device=device),
                                torch.zeros(m_k, dtype=acc, device=device))
            if m_k:
                problem = Problem(x, y_k, scale_v, bias_v, torch.zeros(m_k, dtype=acc, device=device))
                tile_row_lse, col_lse = call.backend.lse_fwd(problem, True, True)
                torch.logaddexp(row_lse, tile_row_lse.to(acc), out=row_lse)
                col_lse = col_lse.to(acc)
                if not with_positives:
                    return torch.stack([col_lse, col_pos], 1)
                index, inside = _local(call.row_target, text_start, m_k)
                row_pos.add_(_positive_logits(x, y_k, index, inside, scale_0, bias_0, acc, rows_of_x=True))
                index, inside = _local(col_labels, own_start, n)
                col_pos = _positive_logits(x, y_k, index, inside, scale_0, bias_0, acc, rows_of_x=False)
            return torch.stack([col_lse, col_pos], 1)

        def merge_columns(stats: Tensor, partial: Tensor) -> Tensor:
            stats[:, 0] = torch.logaddexp(stats[:, 0], partial[:, 0])
            stats[:, 1] += partial[:, 1]
            return stats

        payload = [y] + ([call.own_col_labels] if call.labels_travel else [])
        gathered = None
        if call.impl == "ring":
            def visit(lane, origin, held, stats, fresh):
                partial = tile(held[0], layout.text_offset(origin), call.col_labels(origin, held),
                               call.labels_given or origin == rank)
                if fresh:
                    stats.copy_(partial)
                else:
                    merge_columns(stats, partial)

            lane = _transport.Lane(+1, payload, lambda q: _payload_like(layout, q, dim, y.dtype, call),
                                   lambda q: ((layout.text_sizes[q], 2), acc))
            (own_stats,) = _transport.ring_pass(call.group, rank, world, [lane], visit,
                                                lambda lane, stats, partial: merge_columns(stats, partial), device,
                                                overlap=True)  # the accumulator is O(m) numbers: always overlapped
        else:
            gathered = [_transport.all_gather_rows(t, layout.text_sizes, call.group) for t in payload]
            all_labels = gathered[1] if call.labels_travel else torch.arange(layout.n_images, device=device)
            stats = tile(gathered[0], 0, all_labels, True)
            own_stats = _merge_column_stats(stats, call.group)[layout.text_offset(rank):layout.text_offset(rank) + m]
        col_lse, col_pos = own_stats[:, 0].contiguous(), own_stats[:, 1].contiguous()

        e, n_all, m_all = call.smoothing, layout.n_images, layout.n_texts
        row_terms = row_lse - (1.0 - e) * row_pos
        col_terms = col_lse - (1.0 - e) * col_pos
        if e:
            # sum_j L_ij = s <x_i, sum_j y_j> + M b and sum_i L_ij = s <sum_i x_i, y_j> + N b
            sums = torch.stack([x.to(acc).sum(0), y.to(acc).sum(0)])
            dist.all_reduce(sums, group=call.group)
            row_terms -= (e / m_all) * (scale_0 * (x.to(acc) @ sums[1]) + m_all * bias_0)
            col_terms -= (e / n_all) * (scale_0 * (y.to(acc) @ sums[0]) + n_all * bias_0)
        share = 0.5 * world * (row_terms.sum() / n_all + col_terms.sum() / m_all)

        ctx.call = call
        ctx.scale_shape, ctx.bias_shape = scale.shape, bias.shape
        ctx.save_for_backward(image, text, scale, bias, row_lse, col_lse)
        ctx.gathered = gathered[0] if gathered is not None else None
        return share

    @staticmethod
    def backward(ctx, grad_share: Tensor):
        image, text, scale, bias, row_lse, col_lse = ctx.saved_tensors
        call = ctx.call
        layout, acc = call.layout, call.acc
        rank, world = layout.rank, layout.world
        # the captions travel between ranks: point-to-point and collective ops need them contiguous
        x, y = unit_stride(image.detach()), text.detach().contiguous()
        n, m, dim = x.shape[0], y.shape[0], x.shape[1]
        device = x.device
        e, n_all, m_all = call.smoothing, layout.n_images, layout.n_texts
        g = grad_share.detach().to(acc)
        scale_v = scale.detach().to(acc).expand(n).contiguous()
        bias_v = bias.detach().to(acc).expand(n).contiguous()
        grad_row = (g * (0.5 * world / n_all)).expand(n).contiguous()
        own_info = torch.stack([col_lse, (g * (0.5 * world / m_all)).expand(m)], 1)  # column LSE and weight
        d_image = accumulator(n, dim, acc, device)
        d_scale = torch.zeros((), dtype=acc, device=device)
        d_bias = torch.zeros((), dtype=acc, device=device)
        own_start = layout.image_offset(rank)
        empty = torch.empty(0, dtype=acc, device=device)
        row_const = -(e / m_all) * grad_row if e else empty

        def tile(y_k: Tensor, text_start: int, col_labels: Tensor, info: Tensor, d_text: Tensor) -> None:
            """dX_r += the tile's image gradient; d_text += its caption gradient (fp32)."""
            m_k = y_k.shape[0]
            if not m_k:
                return
            col_lse_k, grad_col = info[:, 0].contiguous(), info[:, 1].contiguous()
            row_index, row_inside = _local(call.row_target, text_start, m_k)
            col_index, col_inside = _local(col_labels, own_start, n)
            zero = torch.zeros((), dtype=acc, device=device)
            extras = Extras(row_const, -(e / n_all) * grad_col if e else empty,
                            row_index, torch.where(row_inside, -(1.0 - e) * grad_row, zero).contiguous(),
                            col_index, torch.where(col_inside, -(1.0 - e) * grad_col, zero).contiguous())
            problem = Problem(x, y_k, scale_v, bias_v, torch.zeros(m_k, dtype=acc, device=device), extras)
            _, _, tile_dscale, tile_drow, _ = call.backend.lse_bwd(
                problem, row_lse, col_lse_k, grad_row, grad_col, out=(d_image, d_text), in_place=True)
            d_scale.add_(tile_dscale.to(acc).sum())
            d_bias.add_(tile_drow.to(acc).sum())

        payload = [y, own_info] + ([call.own_col_labels] if call.labels_travel else [])
        if call.impl == "ring":
            def visit(lane, origin, held, d_text, fresh):
                if fresh:
                    d_text.zero_()
                tile(held[0], layout.text_offset(origin), call.col_labels(origin, held), held[1], d_text)

            def payload_like(q):
                like = _payload_like(layout, q, dim, y.dtype, call)
                return [like[0], ((layout.text_sizes[q], 2), acc)] + like[1:]

            lane = _transport.Lane(+1, payload, payload_like, lambda q: ((layout.text_sizes[q], dim), acc))
            (d_text,) = _transport.ring_pass(call.group, rank, world, [lane], visit,
                                             lambda lane, d_text, partial: d_text.add_(partial), device,
                                             overlap=call.overlap)
        else:
            all_info = _transport.all_gather_rows(own_info, layout.text_sizes, call.group)
            all_labels = (_transport.all_gather_rows(call.own_col_labels, layout.text_sizes, call.group)
                          if call.labels_travel else torch.arange(n_all, device=device))
            d_all = accumulator(layout.n_texts, dim, acc, device)
            tile(ctx.gathered, 0, all_labels, all_info, d_all)
            d_text = _transport.reduce_scatter_rows(d_all, layout.text_sizes, call.group)
        return (d_image.to(image.dtype), d_text.to(text.dtype), d_scale.to(scale.dtype).reshape(ctx.scale_shape),
                d_bias.to(bias.dtype).reshape(ctx.bias_shape), None)


def _payload_like(layout: Layout, origin: int, dim: int, dtype: torch.dtype, call: _Call) -> list:
    """(shape, dtype) of each tensor of the caption block `origin` owns, as the forward ring carries it."""
    like = [((layout.text_sizes[origin], dim), dtype)]
    if call.labels_travel:
        like.append(((layout.text_sizes[origin],), torch.int64))
    return like


def _merge_column_stats(stats: Tensor, group) -> Tensor:
    """Column (LSE partial, positive logit) pairs summed over ranks: the LSEs merged with a safe shift (all-reduce of
    the max, then of the shifted exp sums), the positives (found on one rank each) summed."""
    peak = stats[:, 0].clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    # a column with no finite logit anywhere keeps lse = -inf instead of turning into nan
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    packed = torch.stack([torch.exp(stats[:, 0] - peak), stats[:, 1]], 1)
    dist.all_reduce(packed, group=group)
    return torch.stack([peak + torch.log(packed[:, 0]), packed[:, 1]], 1)


@autocast_off
def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
              image_labels: Tensor | None = None, text_labels: Tensor | None = None, label_smoothing: float = 0.0,
              local_loss: bool = False, dist_impl: str | None = None, equal_batches: bool = False, group=None,
              rank: int | None = None, world_size: int | None = None, backend: str = "auto") -> Tensor:
    """Exact CLIP loss over the batch concatenated across the ranks of `group`, O(N_local * D) memory per rank.

    Every rank calls it with its own local batch. logits = logit_scale * image @ text.T (+ logit_bias) over the
    global batch (N = sum of the local batch sizes, which may differ across ranks), loss = 1/2 [CE(logits,
    image_labels) + CE(logits.T, text_labels)] with `torch.nn.functional.cross_entropy`'s semantics (mean,
    label_smoothing), never materialising N x M or N_local x M.

    Args:
        image_features: this rank's (n_r, D) image features. D, dtype and device type must match across ranks
            (a mismatch raises the same error on every rank instead of hanging).
        text_features: this rank's (m_r, D) text features, under the same rule.
        logit_scale: already-exponentiated scale, float or 0-d tensor (the same value on every rank, e.g. a
            DDP-replicated parameter; checked).
        logit_bias: optional float or 0-d tensor (the same on every rank).
        image_labels: (n_r,) global index, into the concatenated captions, of each local image's caption; default:
            the diagonal (global image i <-> global caption i, which needs n_r == m_r on every rank).
        text_labels: (m_r,) global index, into the concatenated images, of each local caption's image; default: the
            diagonal. With labels the image and caption counts may differ (e.g. five captions per image).
        label_smoothing: as in `torch.nn.functional.cross_entropy`, in both directions.
        local_loss: only changes the returned value (open_clip's meaning). False: every rank returns the global
            loss L. True: rank r returns its share loss_r (the module docstring), which for equal batches and no
            labels is open_clip's local loss. The gradients are the same in both cases.
        dist_impl: "ring" (default; per-rank memory independent of the world size) or "gather" (all-gather the
            captions: fewer messages, O(M * D) per rank). See `mmcl_fast.distributed.clip` for the trade-off.
        equal_batches: promise that every rank passes the same local batch sizes on every call: sizes and
            configuration are then checked once per (group, shapes, configuration) instead of on every call, so
            that the steady state has no host synchronisation before the loss's collectives.
        group: the process group (default: the global group). rank / world_size: optional, checked against it.
        backend: the primitive's backend ("auto", "reference", "torch", "cpu", "triton"); the same on every rank.

    Gradient semantics (DDP): the returned loss_r carries the gradient of rank r's share, so
    sum_r loss_r / W = L and, after every rank runs ``(loss_r / W).backward()`` (what DDP's gradient averaging
    amounts to), each rank's image/text feature gradients equal the single-process gradients dL/d(its rows) (the
    other ranks' terms reach this rank's captions in fp32, rounded once here), and the logit_scale / logit_bias
    gradients summed over ranks (what DDP's all-reduce averages) equal dL/ds, dL/db. Every rank must call the
    backward (it communicates), with the same inputs requiring grad.

    Returns:
        0-d tensor, float32 for float32/bf16/fp16 features (float64 for float64).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                         "first (or use mmcl_fast.clip_loss in a single process)")
    impl = DEFAULT_CLIP_DIST_IMPL if dist_impl is None else dist_impl
    if impl not in CLIP_DIST_IMPLS:
        # every rank runs the same check on its own argument; a rank-dependent value is caught by the exchange
        raise ValueError(f"dist_impl must be one of {CLIP_DIST_IMPLS} (or None for {DEFAULT_CLIP_DIST_IMPL!r}), "
                         f"got {dist_impl!r}")
    checked = exchange_and_check(image_features, text_features, logit_scale, logit_bias, loss="clip",
                                 dist_impl=impl, local_loss=local_loss, backend=backend, image_labels=image_labels,
                                 text_labels=text_labels, label_smoothing=label_smoothing,
                                 equal_batches=equal_batches, rank_arg=rank, world_arg=world_size, group=group)
    layout = checked.layout
    this = layout.rank
    device = image_features.device
    n, m = image_features.shape[0], text_features.shape[0]
    acc = accumulation_dtype(image_features.dtype)
    row_target = (checked.image_labels if checked.image_labels is not None else
                  torch.arange(layout.text_offset(this), layout.text_offset(this) + n, device=device))
    own_col_labels = (checked.text_labels if checked.text_labels is not None else
                      torch.arange(layout.image_offset(this), layout.image_offset(this) + m, device=device))
    call = _Call(layout, group, get_backend(checked.backend), impl, acc, float(label_smoothing),
                 row_target.contiguous(), own_col_labels.contiguous(), checked.text_labels is not None,
                 checked.image_labels is not None or checked.text_labels is not None,
                 _transport.overlap_accumulator(device))
    scale = as_scalar_tensor(checked.logit_scale, image_features)
    bias = as_scalar_tensor(0.0 if checked.logit_bias is None else checked.logit_bias, image_features)
    share = _ClipAcrossRanks.apply(image_features, text_features, scale, bias, call)
    if local_loss:
        return share
    # Report the global loss on every rank while keeping the gradient of this rank's share.
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total / layout.world - share.detach())
