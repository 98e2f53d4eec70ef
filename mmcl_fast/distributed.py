"""The cross-rank layer (SPEC §6): the exact CLIP loss over `torch.distributed`, O(N_global * D) memory per rank.

Rank r holds N_r image rows X_r and their N_r captions Y_r (N_r may differ across ranks, N = sum_r N_r). The
global loss on the concatenated batch is

    L = 1/(2N) sum_i [lse_j(L_ij) - L_ii] + 1/(2N) sum_j [lse_i(L_ij) - L_jj],    L_ij = s <x_i, y_j> + b

Rank r owns the row terms of its images and the column terms of its captions. Per rank and step:

    1. one all-gather of a few int64s checks batch/feature sizes, dtypes and grad flags on every rank, so that a
       mismatch raises the same error everywhere instead of hanging in a later collective;
    2. Y = all_gather(Y_r), autograd-aware: (N, D); its backward reduce-scatters the dY partials to their owners;
    3. (row_lse_r, col_part_r, L_ii) = the primitive on (X_r, Y): one fused N_r x N pass gives the full row LSE
       of the own images and every column's LSE over the own images only (the positives' gradient is folded
       into the same backward pass);
    4. col_lse = log sum_r exp(col_part_r): all-reduce of the max, then of the sum of exp (2N numbers, safe at any
       logit scale); its backward all-reduces the owners' column gradients (N numbers) and weights them by
       exp(col_part_r - col_lse);
    5. loss_r = (W/N) * 1/2 [sum_{i in r} (row_lse_i - L_ii) + sum_{j in r} (col_lse_j - L_jj)], so that
       sum_r loss_r / W = L.

Image features are never gathered: the column direction comes from merging LSE partials. Memory per rank is
O(N * D) (the gathered captions and their gradient; W * max_r N_r * D with the padding of uneven batches) plus
O(N) vectors; nothing of size N_r x N exists outside the `reference` backend. Compute: each rank streams its
N_r x N block once forward and once backward (the primitive's 4 GEMM-equivalents), so the ranks together do the
single-process work. Communication per step: N*D (gather) + 2N (merge) forward, N (column grads) + N*D
(reduce-scatter) backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._ops import _as_vector, autocast_off, sigmoid_stats, softmax_stats
from ._validate import check_features, check_scalar

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")

# metadata fields exchanged before any other collective (one int64 each)
_OK, _N_IMAGE, _N_TEXT, _DIM, _DTYPE, _DEVICE, _GRAD_FLAGS, _WORLD_ARG = range(8)
_GRAD_FLAG_NAMES = ("grad mode (torch.is_grad_enabled())", "image_features.requires_grad",
                    "text_features.requires_grad", "logit_scale.requires_grad", "logit_bias is not None",
                    "logit_bias.requires_grad")


# ---------------------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------------------

def _all_gather_into(output: Tensor, local: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)


def _reduce_scatter_into(output: Tensor, stacked: Tensor, group) -> None:
    """output = sum over ranks of this rank's slice of `stacked`; an all-reduce where reduce-scatter is missing."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        scatter(output, stacked, group=group)
        return
    except (RuntimeError, NotImplementedError) as err:
        if "support" not in str(err).lower():
            raise
    # Older process-group backends without reduce-scatter: the same result for O(N * D) memory (on a copy:
    # `stacked` may be autograd's own gradient buffer).
    reduced = stacked.clone()
    dist.all_reduce(reduced, group=group)
    rank, rows = dist.get_rank(group), output.shape[0]
    output.copy_(reduced[rank * rows:(rank + 1) * rows])


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's (N_q, D) rows into (sum_q N_q, D); backward: reduce-scatter to the owners."""

    @staticmethod
    def forward(ctx, local: Tensor, sizes: list[int], group) -> Tensor:
        world, rank, max_rows = len(sizes), dist.get_rank(group), max(sizes)
        ctx.sizes, ctx.group, ctx.rank = sizes, group, rank
        local = local.contiguous()
        if local.shape[0] < max_rows:  # uneven batches: equal-size blocks on the wire, padding dropped after
            local = torch.cat([local, local.new_zeros((max_rows - local.shape[0], local.shape[1]))])
        stacked = local.new_empty((world * max_rows, local.shape[1]))
        _all_gather_into(stacked, local, group)
        if all(size == max_rows for size in sizes):
            return stacked
        return torch.cat([stacked[q * max_rows:q * max_rows + size] for q, size in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad_gathered: Tensor):
        sizes, world, max_rows = ctx.sizes, len(ctx.sizes), max(ctx.sizes)
        out_dtype = grad_gathered.dtype
        # Half-precision partials are summed across ranks in fp32, rounded once at the owner (not per hop).
        wire_dtype = torch.float32 if out_dtype in (torch.bfloat16, torch.float16) else out_dtype
        if all(size == max_rows for size in sizes):
            stacked = grad_gathered.to(wire_dtype).contiguous()
        else:
            stacked = grad_gathered.new_zeros((world * max_rows, grad_gathered.shape[1]), dtype=wire_dtype)
            offset = 0
            for q, size in enumerate(sizes):
                stacked[q * max_rows:q * max_rows + size] = grad_gathered[offset:offset + size]
                offset += size
        grad_local = stacked.new_empty((max_rows, grad_gathered.shape[1]))
        _reduce_scatter_into(grad_local, stacked, ctx.group)
        return grad_local[:sizes[ctx.rank]].to(out_dtype), None, None


class _MergeLse(torch.autograd.Function):
    """log sum_r exp(partial_r) elementwise over ranks: (M,) partial LSEs → (M,) full LSE, numerically safe."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        peak = partial.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        # A column with no finite logit anywhere keeps lse = -inf instead of turning into nan.
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = torch.exp(partial - peak)
        dist.all_reduce(total, group=group)
        full = peak + torch.log(total)
        ctx.save_for_backward(partial, full)
        ctx.group = group
        return full

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        partial, full = ctx.saved_tensors
        # Each rank holds the gradient of its own loss terms only: the column terms of the columns it owns.
        grad_full = grad_full.contiguous().clone()
        dist.all_reduce(grad_full, group=ctx.group)
        return grad_full * torch.exp(partial - full).nan_to_num(0.0), None


# ---------------------------------------------------------------------------------------------
# input checks that every rank agrees on
# ---------------------------------------------------------------------------------------------

def _metadata_device(group, *candidates) -> torch.device:
    for value in candidates:
        if isinstance(value, Tensor):
            return value.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_and_check(image_features, text_features, logit_scale, logit_bias, rank_arg, world_arg, group,
                        what: str = "clip_loss"):
    """Validate locally, exchange the metadata, then raise the same kind of error on every rank if any is off.

    Returns (checked logit_scale, checked logit_bias, per-rank batch sizes).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local_error = None
    meta = [1, 0, 0, 0, -1, -1, 0, world if world_arg is None else int(world_arg)]
    try:
        check_features(image_features, "image_features", text_features, "text_features")
        n, d = image_features.shape
        if text_features.shape[0] != n:
            raise ValueError(f"image_features has {n} rows and text_features has {text_features.shape[0]} on "
                             f"rank {rank}: each rank needs paired (equal-size) local batches")
        if image_features.dtype not in _DTYPES:
            raise TypeError(f"image_features must be float32/bfloat16/float16/float64, got {image_features.dtype}")
        logit_scale = check_scalar(logit_scale, "logit_scale", image_features)
        if logit_bias is not None:
            logit_bias = check_scalar(logit_bias, "logit_bias", image_features)
        if rank_arg is not None and int(rank_arg) != rank:
            raise ValueError(f"rank={rank_arg} was given but this process is rank {rank} of the process group")
        device_type = image_features.device.type
        flags = (torch.is_grad_enabled(), image_features.requires_grad, text_features.requires_grad,
                 isinstance(logit_scale, Tensor) and logit_scale.requires_grad, logit_bias is not None,
                 isinstance(logit_bias, Tensor) and logit_bias.requires_grad)
        meta[_N_IMAGE], meta[_N_TEXT], meta[_DIM] = n, text_features.shape[0], d
        meta[_DTYPE] = _DTYPES.index(image_features.dtype)
        meta[_DEVICE] = _DEVICE_TYPES.index(device_type) if device_type in _DEVICE_TYPES else len(_DEVICE_TYPES)
        meta[_GRAD_FLAGS] = sum(int(bool(flag)) << bit for bit, flag in enumerate(flags))
    except (TypeError, ValueError) as err:
        local_error = err
        meta[_OK] = 0

    device = _metadata_device(group, image_features, text_features)
    local_meta = torch.tensor(meta, dtype=torch.int64, device=device)
    all_meta = local_meta.new_empty((world * len(meta),))
    _all_gather_into(all_meta, local_meta, group)
    table = all_meta.view(world, len(meta)).cpu().tolist()

    if local_error is not None:
        raise local_error
    bad = [q for q in range(world) if table[q][_OK] == 0]
    if bad:
        raise ValueError(f"mmcl_fast.distributed.{what}: invalid input on rank(s) {bad} (see the error raised "
                         "there); every rank stops so that none waits in a collective")

    def column(field):
        return [row[field] for row in table]

    if world_arg is not None and any(value != world for value in column(_WORLD_ARG)):
        raise ValueError(f"world_size={column(_WORLD_ARG)} (per rank) was given but the process group has "
                         f"{world} ranks")
    if len(set(column(_DIM))) > 1:
        raise ValueError(f"the feature size D differs across ranks: {column(_DIM)} on ranks 0..{world - 1}; "
                         "every rank's image_features and text_features need the same D")
    if len(set(column(_DTYPE))) > 1:
        raise TypeError(f"the feature dtype differs across ranks: {[str(_DTYPES[c]) for c in column(_DTYPE)]} on "
                        f"ranks 0..{world - 1}; every rank needs the same dtype")
    if len(set(column(_DEVICE))) > 1:
        names = [(_DEVICE_TYPES + ("other",))[c] for c in column(_DEVICE)]
        raise ValueError(f"the feature device type differs across ranks: {names} on ranks 0..{world - 1}")
    flags = column(_GRAD_FLAGS)
    if len(set(flags)) > 1:
        differing = [name for bit, name in enumerate(_GRAD_FLAG_NAMES) if len({f >> bit & 1 for f in flags}) > 1]
        raise ValueError(f"ranks disagree on {', '.join(differing)}: the backward's collectives would not match "
                         "(hang), so every rank must pass the same kind of inputs")
    return logit_scale, logit_bias, column(_N_IMAGE)


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------

@autocast_off
def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
              local_loss: bool = False, group=None, rank: int | None = None, world_size: int | None = None,
              backend: str = "auto") -> Tensor:
    """Exact CLIP loss over the batch concatenated across the ranks of `group`, O(N * D) memory per rank.

    Every rank calls it with its own paired local batch. logits = logit_scale * image @ text.T (+ logit_bias)
    over the global batch (N = sum of the local batch sizes, which may differ across ranks), loss =
    1/2 [CE(logits, diag) + CE(logits.T, diag)], never materialising N x N or N_local x N.

    Args:
        image_features, text_features: this rank's (N_r, D) paired features. D, dtype and device type must match
            across ranks (a mismatch raises the same error on every rank instead of hanging).
        logit_scale: already-exponentiated scale, float or 0-d tensor (the same value on every rank, e.g. a
            DDP-replicated parameter). logit_bias: optional float or 0-d tensor.
        local_loss: only changes the returned value (open_clip's meaning). False: every rank returns the global
            loss L. True: rank r returns its share loss_r = (W / N) * 1/2 [sum of its images' row terms + sum of
            its captions' column terms], which for equal batches is open_clip's local loss. The gradients are the
            same in both cases.
        group: the process group (default: the global group). rank / world_size: optional, checked against it.
        backend: the primitive's backend ("auto", "reference", "torch", "cpu", "triton").

    Gradient semantics (DDP): the returned loss_r carries the gradient of rank r's share, so
    sum_r loss_r / W = L and, after every rank runs ``(loss_r / W).backward()`` (what DDP's gradient averaging
    amounts to), each rank's image/text feature gradients equal the single-process gradients dL/d(its rows) —
    the gradients of the other ranks' terms with respect to this rank's captions arrive by reduce-scatter — and
    the logit_scale / logit_bias gradients summed over ranks (what DDP's all-reduce averages) equal dL/ds, dL/db.
    Unlike open_clip with gather_with_grad=False, no cross-rank gradient is dropped. Every rank must call the
    backward (it runs collectives), with the same inputs requiring grad.

    Returns:
        0-d tensor, float32 for float32/bf16/fp16 features (float64 for float64).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                         "first (or use mmcl_fast.clip_loss in a single process)")
    logit_scale, logit_bias, sizes = _exchange_and_check(image_features, text_features, logit_scale, logit_bias,
                                                         rank, world_size, group)
    this_rank, world = dist.get_rank(group), dist.get_world_size(group)
    n_global, n_local = sum(sizes), sizes[this_rank]
    offset = sum(sizes[:this_rank])

    all_text = _GatherRows.apply(text_features, sizes, group)
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    device = image_features.device
    scale_v = _as_vector(logit_scale, n_local, "logit_scale", image_features, acc)
    row_bias = _as_vector(logit_bias, n_local, "logit_bias", image_features, acc)
    col_bias = torch.zeros(n_global, dtype=acc, device=device)
    # Image i's caption is global column offset + i. Its logit L_ii is also the positive of that column's term,
    # so one positive per local pair serves both directions; its gradient is folded into the kernel's weights.
    own_columns = torch.arange(offset, offset + n_local, device=device)
    row_lse, col_partial, positives, *_ = softmax_stats(
        image_features, all_text, scale_v, row_bias, col_bias, row_target=own_columns, col_target=None,
        need_row=True, need_col=True, need_sums=False, backend=backend)
    col_lse = _MergeLse.apply(col_partial, group)
    local_sum = (row_lse - positives).sum() + (col_lse[offset:offset + n_local] - positives).sum()
    share = local_sum * (0.5 * world / n_global)
    if local_loss:
        return share
    # Report the global loss on every rank while keeping the gradient of this rank's share.
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total / world - share.detach())


# ---------------------------------------------------------------------------------------------
# SigLIP across ranks
# ---------------------------------------------------------------------------------------------

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class _Exchange(torch.autograd.Function):
    """One batch of point-to-point transfers: send `tensors[k]` to `send_peers[k]`, receive one tensor of
    `recv_shapes[k]` from `recv_peers[k]`. Backward: each received tensor's gradient goes back to the rank it came
    from, and the gradient of each sent tensor arrives from the rank it went to.

    `pending`: None (wait here) or a list that gets the transfers' work handles, so that the caller can compute on
    the block it holds while the next one is in flight and wait before touching the received tensors."""

    @staticmethod
    def forward(ctx, group, send_peers, recv_peers, recv_shapes, pending, *tensors):
        like = tensors[0]
        received = [like.new_empty(shape) for shape in recv_shapes]
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group) for t, peer in zip(tensors, send_peers)]
        ops += [dist.P2POp(dist.irecv, buf, peer, group) for buf, peer in zip(received, recv_peers)]
        works = dist.batch_isend_irecv(ops)
        if pending is None:
            for work in works:
                work.wait()
        else:
            pending.extend(works)
        ctx.group, ctx.send_peers, ctx.recv_peers = group, send_peers, recv_peers
        ctx.sent_shapes = [t.shape for t in tensors]
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        like = next(g for g in grads if g is not None)
        grad_sent = [like.new_empty(shape) for shape in ctx.sent_shapes]
        ops = [dist.P2POp(dist.isend, (g if g is not None else like.new_zeros(like.shape)).contiguous(), peer,
                          ctx.group) for g, peer in zip(grads, ctx.recv_peers)]
        ops += [dist.P2POp(dist.irecv, buf, peer, ctx.group) for buf, peer in zip(grad_sent, ctx.send_peers)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return (None, None, None, None, None) + tuple(grad_sent)


class _Broadcast(torch.autograd.Function):
    """Rank `src`'s (rows, D) block on every rank; backward: the gradients summed onto `src` (dist.reduce)."""

    @staticmethod
    def forward(ctx, local: Tensor, src: int, rows: int, group) -> Tensor:
        rank = dist.get_rank(group)
        block = local.contiguous().clone() if rank == src else local.new_empty((rows, local.shape[1]))
        dist.broadcast(block, dist.get_global_rank(group, src) if group is not None else src, group=group)
        ctx.src, ctx.group, ctx.rank = src, group, rank
        return block

    @staticmethod
    def backward(ctx, grad_block: Tensor):
        grad_block = grad_block.contiguous().clone()
        dst = dist.get_global_rank(ctx.group, ctx.src) if ctx.group is not None else ctx.src
        dist.reduce(grad_block, dst, group=ctx.group)
        return (grad_block if ctx.rank == ctx.src else None), None, None, None


def _peer(group, rank: int) -> int:
    """The global rank of `rank` in `group` (P2P ops take global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


@autocast_off
def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
                dist_impl: str = "bidir", group=None, rank: int | None = None, world_size: int | None = None,
                backend: str = "auto") -> Tensor:
    """Exact SigLIP loss over the batch concatenated across the ranks of `group`, O(N * D) memory per rank.

    Every rank calls it with its own paired local batch (image i <-> text i). Rank r computes the sigmoid terms of its
    images against every rank's texts, one fused sweep per text block (positives only in its own block), and returns

        loss_r = (W / N) sum_{i in rank r} sum_j softplus(-z_ij L_ij),   N = sum of the local batch sizes,

    so that the mean over ranks of loss_r is the single-process loss of the concatenated batch (for equal local
    batches loss_r is exactly open_clip's per-rank SigLipLoss). How the text blocks travel (`dist_impl`, open_clip's
    names): "bidir" (default) and "shift" pass them around a ring of neighbour exchanges (both directions, or one),
    the next block in flight while the current one is computed; "reduce" broadcasts each rank's block in turn;
    "gather" all-gathers every block and makes one sweep over all N columns.

    Gradient semantics (DDP): as `clip_loss`: after every rank runs ``(loss_r / W).backward()`` (what DDP's gradient
    averaging amounts to), each rank's feature gradients equal the single-process gradients dL/d(its rows), the
    text blocks' gradients having travelled back to their owners, and logit_scale / logit_bias gradients summed
    over ranks (what DDP's all-reduce averages) equal dL/ds, dL/db. Every rank must call the backward, with the same
    inputs requiring grad.

    Returns:
        0-d tensor, float32 for float32/bf16/fp16 features (float64 for float64).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                         "first (or use mmcl_fast.siglip_loss in a single process)")
    if dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
    logit_scale, logit_bias, sizes = _exchange_and_check(image_features, text_features, logit_scale, logit_bias,
                                                         rank, world_size, group, what="siglip_loss")
    this, world = dist.get_rank(group), dist.get_world_size(group)
    n_global, n_local = sum(sizes), sizes[this]
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    device = image_features.device
    scale_v = _as_vector(logit_scale, n_local, "logit_scale", image_features, acc)
    row_bias = _as_vector(0.0 if logit_bias is None else logit_bias, n_local, "logit_bias", image_features, acc)
    own_positives = torch.arange(n_local, device=device)[:, None]
    no_positives = torch.full((n_local, 1), -1, dtype=torch.int64, device=device)

    def block_total(texts: Tensor, positives: Tensor) -> Tensor:
        col_bias = torch.zeros(texts.shape[0], dtype=acc, device=device)
        return sigmoid_stats(image_features, texts, scale_v, row_bias, col_bias, positives, backend=backend)

    if dist_impl == "gather":
        all_text = _GatherRows.apply(text_features, sizes, group)
        offset = sum(sizes[:this])
        total = block_total(all_text, offset + own_positives)
    elif dist_impl == "reduce":
        # every rank takes part in every broadcast and (backward) every reduce, its own block included, so the
        # collectives line up across ranks in both directions
        total = None
        for src in range(world):
            block = _Broadcast.apply(text_features, src, sizes[src], group)
            part = block_total(block, own_positives if src == this else no_positives)
            total = part if total is None else total + part
    else:
        left, right = (this - 1) % world, (this + 1) % world
        d = text_features.shape[1]
        # (blocks to hold, their origins): start with the own block; each step receives the next ones
        if dist_impl == "shift":
            schedule = [("right", k) for k in range(1, world)]
        else:
            half, odd = divmod(world - 1, 2)
            schedule = [("both", k) for k in range(1, half + 1)] + ([("right", half + 1)] if odd else [])
        total = None
        to_right, to_left = text_features, text_features
        current = [(text_features, own_positives)]
        for direction, k in schedule:
            pending: list = []
            if direction == "both":
                # to the right: the block from k - 1 ranks to the left; to the left: the one from k - 1 to the right
                from_left, from_right = (this - k) % world, (this + k) % world
                received = _Exchange.apply(group, [_peer(group, right), _peer(group, left)],
                                           [_peer(group, left), _peer(group, right)],
                                           [(sizes[from_left], d), (sizes[from_right], d)], pending, to_right,
                                           to_left)
            else:
                from_left = (this - k) % world
                received = _Exchange.apply(group, [_peer(group, right)], [_peer(group, left)],
                                           [(sizes[from_left], d)], pending, to_right)
            for block, positives in current:  # compute while the next blocks are in flight
                part = block_total(block, positives)
                total = part if total is None else total + part
            for work in pending:
                work.wait()
            if direction == "both":
                to_right, to_left = received
                current = [(to_right, no_positives), (to_left, no_positives)]
            else:
                to_right = received[0]
                current = [(to_right, no_positives)]
        for block, positives in current:
            part = block_total(block, positives)
            total = part if total is None else total + part
    return total * (world / n_global)
