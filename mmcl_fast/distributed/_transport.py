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
- `all_gather_rows` / `reduce_scatter_rows`: every block is all-gathered into one (N, D) block (O(N * D) per rank,
  the fewest messages); the caller reduces the accumulators (reduce-scatter / all-reduce).

Empty blocks (a rank with no rows of a lane) are skipped on both sides: every rank knows every block's size.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .._problem import SPARE_ROWS, accumulator

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


def _widest(likes: list, spare_rows: int) -> tuple:
    """The (shape, dtype) that holds any of `likes` (same dtype and trailing dims, differing row counts), plus
    `spare_rows` (the rows a kernel may write past the end of an in-place accumulator, `_problem.accumulator`)."""
    (shape, dtype), rows = likes[0], max(like[0][0] for like in likes)
    return (rows + spare_rows,) + tuple(shape[1:]), dtype


def _rows(buffer: Tensor, like: tuple) -> Tensor:
    """The leading rows of a preallocated buffer that hold a block of shape like[0] (a contiguous view)."""
    return buffer[:like[0][0]]


class _PingPong:
    """`count` buffers of the widest shape a lane needs, reused every step: a ring allocates nothing per step (no
    allocator growth with W) and hands out row views, so uneven blocks share the same buffers."""

    def __init__(self, likes: list, count: int, device: torch.device, accumulators: bool = False):
        widest = _widest(likes, SPARE_ROWS if accumulators else 0)
        self.buffers = [_empty(widest, device) for _ in range(count)]

    def get(self, index: int, like: tuple) -> Tensor:
        return _rows(self.buffers[index], like)


def ring_pass(group, rank: int, world: int, lanes: list, visit: Callable, merge: Callable | None,
              device: torch.device, overlap: bool, final_out: list | None = None) -> list:
    """Visit every block of every lane once; return, per lane, the accumulator of this rank's own block (None for a
    lane without accumulator), received into `final_out[lane]` where given (else into a ring buffer).

    visit(lane_index, origin, payload, acc, fresh): compute the tile of this rank's rows against the block `origin`
    owns and put its column statistics into `acc` (overwrite when `fresh`, otherwise combine with what `acc` holds);
    acc is None for a lane without accumulator. merge(lane_index, acc, partial): combine, in place into `acc`, an
    arriving accumulator and a partial computed while it was in flight (used when `overlap`).
    """
    payload_buffers, acc_buffers = [], []
    for lane in lanes:
        items = len(lane.payload)
        likes = [lane.payload_like(q) for q in range(world)]
        payload_buffers.append([_PingPong([like[item] for like in likes], 2, device) for item in range(items)]
                               if world > 1 else [])
        acc_likes = [lane.acc_like(q) for q in range(world)]
        acc_buffers.append(None if acc_likes[0] is None else
                           _PingPong(acc_likes, 3 if overlap and world > 1 else 2, device, accumulators=True))
    held = [list(lane.payload) for lane in lanes]
    origins = [rank] * len(lanes)
    current = 0  # the accumulator buffer that holds this step's running sum (the other one is in flight)
    for step in range(world):
        transfers = _Step(group)
        following: list = [None] * len(lanes)
        following_origin = [(rank - lane.direction * (step + 1)) % world for lane in lanes]
        arriving = 1 - current if step >= 1 else current
        for index, lane in enumerate(lanes):
            right, left = (rank + lane.direction) % world, (rank - lane.direction) % world
            tag = 16 * index
            if step >= 1 and acc_buffers[index] is not None:
                transfers.send(acc_buffers[index].get(current, lane.acc_like((origins[index] + lane.direction)
                                                                            % world)), right, tag, "acc")
                transfers.recv(acc_buffers[index].get(arriving, lane.acc_like(origins[index])), left, tag, "acc")
            if step < world - 1:
                likes = lane.payload_like(following_origin[index])
                following[index] = [payload_buffers[index][item].get(step % 2, like)
                                    for item, like in enumerate(likes)]
                for item, (tensor, buffer) in enumerate(zip(held[index], following[index])):
                    transfers.send(tensor, right, tag + 1 + item, "payload")
                    transfers.recv(buffer, left, tag + 1 + item, "payload")
        transfers.post()
        if not overlap:
            transfers.wait("acc")
        for index, lane in enumerate(lanes):
            if acc_buffers[index] is None:
                visit(index, origins[index], held[index], None, True)
                continue
            acc = acc_buffers[index].get(arriving, lane.acc_like(origins[index]))
            if step == 0:
                visit(index, origins[index], held[index], acc, True)
            elif overlap:
                partial = acc_buffers[index].get(2, lane.acc_like(origins[index]))
                visit(index, origins[index], held[index], partial, True)
                transfers.wait("acc")
                merge(index, acc, partial)
            else:
                visit(index, origins[index], held[index], acc, False)
        transfers.wait("acc")
        transfers.wait("payload")
        current = arriving
        for index in range(len(lanes)):
            if step < world - 1:
                held[index] = following[index]
                origins[index] = following_origin[index]
    own: list = [None] * len(lanes)
    if world == 1:
        for index, (lane, buffers) in enumerate(zip(lanes, acc_buffers)):
            if buffers is not None:
                own[index] = buffers.get(current, lane.acc_like(rank))
                if final_out is not None:
                    own[index] = final_out[index].copy_(own[index])
        return own
    # the last accumulators go home: each lane's last block belongs to the next rank along the lane
    final = _Step(group)
    for index, lane in enumerate(lanes):
        if acc_buffers[index] is None:
            continue
        right, left = (rank + lane.direction) % world, (rank - lane.direction) % world
        own[index] = (final_out[index] if final_out is not None else
                      acc_buffers[index].get(1 - current, lane.acc_like(rank)))
        final.send(acc_buffers[index].get(current, lane.acc_like(right)), right, 16 * index, "acc")
        final.recv(own[index], left, 16 * index, "acc")
    final.post()
    final.wait("acc")
    return own


def broadcast_pass(group, rank: int, world: int, own_block: Tensor, block_like: Callable, visit: Callable,
                   acc_like: Callable | None, overlap: bool) -> Tensor | None:
    """Broadcast each rank's block in turn, the next one in flight during the current tile; visit(origin, block, acc)
    computes the tile and adds its column statistics to the zeroed `acc` (None without accumulators), which is summed
    onto the block's owner (dist.reduce, in flight during the next tile when `overlap`). Returns this rank's own
    block's accumulator, summed over every rank."""
    device = own_block.device
    blocks = _PingPong([block_like(q) for q in range(world)], 2, device)
    accs = None if acc_like is None else _PingPong([acc_like(q) for q in range(world)], 2 if overlap else 1, device,
                                                   accumulators=True)
    own_acc = None if acc_like is None else accumulator(*acc_like(rank)[0], acc_like(rank)[1], device)

    def start(origin: int, slot: int):
        block = own_block if origin == rank else blocks.get(slot, block_like(origin))
        if block.numel() == 0:
            return block, None
        return block, dist.broadcast(block, global_rank(group, origin), group=group, async_op=True)

    pending_reduce = None
    current = start(0, 0)
    for origin in range(world):
        following = start(origin + 1, (origin + 1) % 2) if origin + 1 < world else None
        block, work = current
        if work is not None:
            work.wait()
        acc = None
        if accs is not None:
            if origin == rank:
                acc = own_acc
            else:
                if not overlap and pending_reduce is not None:
                    pending_reduce.wait()  # the single scratch accumulator is free again
                    pending_reduce = None
                acc = accs.get(origin % 2 if overlap else 0, acc_like(origin))
            acc.zero_()
        visit(origin, block, acc)
        if pending_reduce is not None:
            pending_reduce.wait()  # at most one reduce in flight
            pending_reduce = None
        if acc is not None and acc.numel():
            pending_reduce = dist.reduce(acc, global_rank(group, origin), group=group, async_op=True)
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
