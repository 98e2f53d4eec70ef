"""How column blocks reach every rank, and how their accumulators get back to the owners.

Each distributed loss is a sweep over column blocks: rank r computes the tile (its rows, block k) for every block
k, keeps the row statistics locally and adds the column statistics of the tile (column LSE partials, or fp32 dY
partials) to an accumulator that must end at block k's owner. Three transports do that:

- `ring_pass`: the blocks travel around the ring (lanes of rank -> rank + direction), one hop per step; the
  accumulator follows its block one step behind and returns to the owner after W hops. Per rank: the own block,
  the block in use, the next one in flight, and one or two accumulators, whatever W is. The next block's transfer
  is posted before the current tile is computed (batch_isend_irecv), so communication overlaps computation.
- `broadcast_pass`: block k is broadcast from its owner; the accumulators are summed onto it (dist.reduce), the
  next broadcast in flight during the current tile. Also O(one block) per rank.
- `gather_pass`: every block is all-gathered into one (N, D) block (O(N * D) per rank, the fastest at small W);
  the caller reduces the accumulators (reduce-scatter / all-reduce).

Empty blocks (a rank with no rows of a lane) are skipped on both sides: every rank knows every block's size.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

# Whether the accumulator's transfer overlaps the tile too. On: the tile's column partials go to a fresh buffer while
# the accumulator is in flight, then are added (one more block-sized buffer per rank). Off: the accumulator is
# received before the tile and the kernel adds into it in place (least memory; the accumulator's hop is not hidden).
# Per device type: on CPU (gloo, loopback) a hop costs little next to a tile, on GPUs it does not.
OVERLAP_ACCUMULATOR = {"cpu": False, "cuda": True}


def overlap_accumulator(device: torch.device) -> bool:
    return OVERLAP_ACCUMULATOR.get(device.type, True)


class Lane(NamedTuple):
    """One direction of travel around the ring.

    direction: +1 (blocks go to rank + 1) or -1. payload: this rank's own block, a list of tensors that travel
    together (features, per-column vectors). payload_like(origin): (shape, dtype) of each payload tensor of the
    block that rank `origin` owns. acc_like(origin): (shape, dtype) of that block's accumulator, or None when the
    pass carries no accumulator."""

    direction: int
    payload: list
    payload_like: Callable
    acc_like: Callable


def global_rank(group, rank: int) -> int:
    """The global rank of `rank` in `group` (point-to-point ops and collectives' src/dst take global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


class _Step:
    """The point-to-point ops of one step, posted as one batch; waited in two parts (accumulators, payloads)."""

    def __init__(self, group):
        self.group = group
        self.ops: list = []
        self.kinds: list = []
        self.works: list = []

    def send(self, tensor: Tensor, peer: int, tag: int, kind: str) -> None:
        if tensor.numel():
            self.ops.append(dist.P2POp(dist.isend, tensor, global_rank(self.group, peer), self.group, tag))
            self.kinds.append(kind)

    def recv(self, tensor: Tensor, peer: int, tag: int, kind: str) -> None:
        if tensor.numel():
            self.ops.append(dist.P2POp(dist.irecv, tensor, global_rank(self.group, peer), self.group, tag))
            self.kinds.append(kind)

    def post(self) -> None:
        self.works = dist.batch_isend_irecv(self.ops) if self.ops else []

    def wait(self, kind: str) -> None:
        for index, (work, work_kind) in enumerate(zip(self.works, self.kinds)):
            if work_kind == kind and work is not None:
                work.wait()
                self.works[index] = None


def _empty(like: tuple, device: torch.device) -> Tensor:
    shape, dtype = like
    return torch.empty(shape, dtype=dtype, device=device)


def ring_pass(group, rank: int, world: int, lanes: list, visit: Callable, merge: Callable | None,
              device: torch.device, overlap: bool) -> list:
    """Visit every block of every lane once; return, per lane, the accumulator of this rank's own block.

    visit(lane_index, origin, payload, acc) -> acc: compute the tile of this rank's rows against the block `origin`
    owns and add its column statistics to `acc` (None: start a new accumulator) and return it (None when the lane
    has no accumulator). merge(lane_index, acc, partial) -> acc combines an arriving accumulator with a partial that
    was computed while it was in flight (used when `overlap`).
    """
    held = [list(lane.payload) for lane in lanes]
    origins = [rank] * len(lanes)
    outgoing: list = [None] * len(lanes)  # the accumulator each lane sends this step (computed in the last one)
    for step in range(world):
        transfers = _Step(group)
        arriving: list = [None] * len(lanes)
        following: list = [None] * len(lanes)
        for index, lane in enumerate(lanes):
            right, left = (rank + lane.direction) % world, (rank - lane.direction) % world
            tag = 16 * index
            if step >= 1 and lane.acc_like(origins[index]) is not None:
                arriving[index] = _empty(lane.acc_like(origins[index]), device)
                if outgoing[index] is not None:
                    transfers.send(outgoing[index], right, tag, "acc")
                transfers.recv(arriving[index], left, tag, "acc")
            if step < world - 1:
                following_origin = (rank - lane.direction * (step + 1)) % world
                following[index] = [_empty(like, device) for like in lane.payload_like(following_origin)]
                for item, (tensor, buffer) in enumerate(zip(held[index], following[index])):
                    transfers.send(tensor, right, tag + 1 + item, "payload")
                    transfers.recv(buffer, left, tag + 1 + item, "payload")
        transfers.post()
        if not overlap:
            transfers.wait("acc")
        for index in range(len(lanes)):
            if overlap and arriving[index] is not None:
                partial = visit(index, origins[index], held[index], None)
                transfers.wait("acc")
                outgoing[index] = merge(index, arriving[index], partial)
            else:
                outgoing[index] = visit(index, origins[index], held[index], arriving[index])
        transfers.wait("acc")
        transfers.wait("payload")
        for index, lane in enumerate(lanes):
            if step < world - 1:
                held[index] = following[index]
                origins[index] = (rank - lane.direction * (step + 1)) % world
    if world == 1:
        return outgoing
    # the last accumulators go home: each lane's last block belongs to the next rank along the lane
    final = _Step(group)
    own: list = [None] * len(lanes)
    for index, lane in enumerate(lanes):
        if lane.acc_like(rank) is None:
            continue
        right, left = (rank + lane.direction) % world, (rank - lane.direction) % world
        own[index] = _empty(lane.acc_like(rank), device)
        if outgoing[index] is not None:
            final.send(outgoing[index], right, 16 * index, "acc")
        final.recv(own[index], left, 16 * index, "acc")
    final.post()
    final.wait("acc")
    return own


def broadcast_pass(group, rank: int, world: int, own_block: Tensor, block_like: Callable, visit: Callable,
                   reduce_acc: bool) -> Tensor | None:
    """Broadcast each rank's block in turn (the next one in flight during the current tile); visit(origin, block)
    -> acc computes the tile and returns its accumulator, which (reduce_acc) is summed onto the block's owner.
    Returns the sum of every rank's accumulator of this rank's own block."""
    def start(origin):
        block = own_block if origin == rank else _empty(block_like(origin), own_block.device)
        if block.numel() == 0:
            return block, None
        return block, dist.broadcast(block, global_rank(group, origin), group=group, async_op=True)

    own_acc = None
    pending_reduce = None
    current = start(0)
    for origin in range(world):
        following = start(origin + 1) if origin + 1 < world else None
        block, work = current
        if work is not None:
            work.wait()
        acc = visit(origin, block)
        if pending_reduce is not None:
            pending_reduce.wait()  # at most one reduce in flight: bounded memory
            pending_reduce = None
        if reduce_acc and acc is not None and acc.numel():
            pending_reduce = dist.reduce(acc, global_rank(group, origin), group=group, async_op=True)
        if origin == rank:
            own_acc = acc
        current = following
    if pending_reduce is not None:
        pending_reduce.wait()
    return own_acc


def all_gather_into(output: Tensor, local: Tensor, group) -> None:
    """dist.all_gather_single where this torch has it (all_gather_into_tensor is deprecated there)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)


def all_gather_rows(local: Tensor, sizes: tuple, group) -> Tensor:
    """Every rank's (sizes[q], ...) rows concatenated in rank order (uneven sizes: padded on the wire)."""
    world, widest = len(sizes), max(sizes)
    local = local.contiguous()
    if local.shape[0] < widest:
        local = torch.cat([local, local.new_zeros((widest - local.shape[0],) + tuple(local.shape[1:]))])
    stacked = local.new_empty((world * widest,) + tuple(local.shape[1:]))
    all_gather_into(stacked, local, group)
    if all(size == widest for size in sizes):
        return stacked
    return torch.cat([stacked[q * widest:q * widest + size] for q, size in enumerate(sizes)])


def reduce_scatter_rows(rows: Tensor, sizes: tuple, group) -> Tensor:
    """The sum over ranks of `rows` (the concatenation of every rank's block), this rank's block of it."""
    world, widest, rank = len(sizes), max(sizes), dist.get_rank(group)
    if all(size == widest for size in sizes):
        stacked = rows.contiguous()
    else:
        stacked = rows.new_zeros((world * widest,) + tuple(rows.shape[1:]))
        offset = 0
        for q, size in enumerate(sizes):
            stacked[q * widest:q * widest + size] = rows[offset:offset + size]
            offset += size
    mine = stacked.new_empty((widest,) + tuple(rows.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
    try:
        scatter(mine, stacked, group=group)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        if scatter is not None and "support" not in str(err).lower():
            raise
        # process-group backends without reduce-scatter: the same sum through an all-reduce (O(N * D) memory)
        dist.all_reduce(stacked, group=group)
        mine.copy_(stacked[rank * widest:(rank + 1) * widest])
    return mine[:sizes[rank]]
