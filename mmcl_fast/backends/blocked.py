"""The `torch` backend: the streamed-LSE primitive of docs/design.md#fused-primitive on plain torch ops, on any device torch supports.

Portable and exact where no compiled kernel exists (CUDA without Triton, ROCm, MPS, XPU, a CPU whose compiled core
failed to build), and the blocked, memory-bounded path for float64. The logits are visited in tiles of a block of
rows x a block of columns (all columns when they fit the tile budget):

    forward:  S = X_I Y_J^T (one matmul), L = scale_I S + row_bias_I + col_bias_J, online row and column
              max / sum-exp in the accumulation dtype (fp32; fp64 for fp64 inputs)
    backward: recompute S, G = grad_row e^(L - row_lse) + grad_col e^(L - col_lse) + folded linear terms,
              dX_I += (scale_I G) Y_J, dY_J += (scale_I G)^T X_I, dscale, drow_bias, dcol_bias from G

GEMM count: 4 N*M*D GEMM-equivalents for forward + backward (1 + 3). Memory: O((N + M) * D) for the gradient
accumulators plus at most three tiles of `tile_elements(device)` accumulation-dtype elements (S, L and G); never N x M
(unless N x M is itself under the tile budget). bf16 / fp16 features are converted to fp32 one block at a time (the matmul then
accumulates in fp32: a 16-bit matmul would round every logit to 8 or 11 bits), never as a whole copy. Everything
is sync-free (no `.item()`, no data-dependent shapes), so it runs asynchronously on accelerators; the order of
every reduction is fixed, so results are deterministic wherever torch's matmul is.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._numerics import accumulation_dtype, batched_dot
from .._problem import Gradients, Problem, add_into

# Elements of one logits tile; a step holds at most three tile-sized tensors. CPU: 4 MiB in fp32 (cache-friendly,
# and small next to the inputs); accelerators: 64 MiB, so that each matmul fills the device and few launches
# are needed (2^20 rows x 2^20 columns is 2^16 tiles).
TILE_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_TILE_ELEMENTS = 1 << 24


def tile_elements(device: torch.device) -> int:
    return TILE_ELEMENTS.get(device.type, DEFAULT_TILE_ELEMENTS)
# Widest column block: beyond it the tile budget would leave too few rows per matmul (CPU: 256 rows x 4096
# columns ran 2x faster than 64 x 16384 at N = 16384, D = 512 on 2 Zen 3 cores).
MAX_BLOCK_COLS = {"cpu": 4096}
DEFAULT_MAX_BLOCK_COLS = 16384


def _tiles(x: Tensor, y: Tensor, acc: torch.dtype):
    """(i0, i1, j0, j1, x_blk, y_blk) of every tile, the blocks in `acc`; column block outer (each column block is
    converted once)."""
    n, m = x.shape[0], y.shape[0]
    cols = min(m, MAX_BLOCK_COLS.get(x.device.type, DEFAULT_MAX_BLOCK_COLS))
    rows = max(1, min(n, tile_elements(x.device) // cols))
    for j0 in range(0, m, cols):
        j1 = min(j0 + cols, m)
        y_blk = y[j0:j1].to(acc)
        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            yield i0, i1, j0, j1, x[i0:i1].to(acc), y_blk


def _zero_gradients(x: Tensor, y: Tensor, acc: torch.dtype) -> Gradients:
    n, m = x.shape[0], y.shape[0]
    zeros = lambda *shape: torch.zeros(shape, dtype=acc, device=x.device)  # noqa: E731
    return Gradients(zeros(*x.shape), zeros(*y.shape), zeros(n), zeros(n), zeros(m))


def _add_tile_gradients(grads: Gradients, g: Tensor, sim: Tensor, scale: Tensor, x_blk: Tensor, y_blk: Tensor,
                        i0: int, i1: int, j0: int, j1: int) -> None:
    """The gradients of one tile of gradient weights G (consumed: scaled in place): dscale += rowdot(G, S), drow +=
    G 1, dcol += G^T 1, dX += (a G) Y, dY += (a G)^T X."""
    grads.dscale[i0:i1] += batched_dot(g, sim, g.dtype)  # row dots, no tile temporary
    grads.drow_bias[i0:i1] += g.sum(1)
    grads.dcol_bias[j0:j1] += g.sum(0)
    g.mul_(scale[i0:i1, None].to(g.dtype))
    grads.dx[i0:i1].addmm_(g, y_blk)
    grads.dy[j0:j1].addmm_(g.T, x_blk)


def _logits(x_blk, y_blk, scale, row_bias, col_bias, keep_sim: bool):
    """(S, L) of one tile, the affine terms added in place; keep_sim=False: L overwrites S (one tile, S is None)."""
    sim = x_blk @ y_blk.T
    logits = sim * scale[:, None] if keep_sim else sim.mul_(scale[:, None])
    logits += row_bias[:, None]
    logits += col_bias[None, :]
    return (sim if keep_sim else None), logits


def _online_update(run_max: Tensor, run_sum: Tensor, logits: Tensor, dim: int, consume: bool) -> None:
    """run_sum <- run_sum * e^(run_max - new_max) + sum_dim e^(logits - new_max); run_max <- new_max (in place).
    consume: overwrite `logits` (its last use) instead of allocating another tile."""
    new_max = torch.maximum(run_max, logits.amax(dim))
    # a state that has seen only -inf so far has nothing to rescale (and -inf - -inf would be NaN)
    rescale = torch.where(run_max == float("-inf"), 0.0, torch.exp(run_max - new_max))
    shift = new_max[:, None] if dim == 1 else new_max[None, :]
    shifted = logits.sub_(shift) if consume else logits - shift
    run_sum.mul_(rescale).add_(shifted.exp_().sum(dim))
    run_max.copy_(new_max)


def lse_fwd(problem: Problem, need_row: bool, need_col: bool):
    x, y, scale, row_bias, col_bias = problem.operands
    acc = accumulation_dtype(x.dtype)
    n, m = x.shape[0], y.shape[0]
    row_max = torch.full((n if need_row else 0,), float("-inf"), dtype=acc, device=x.device)
    row_sum = torch.zeros_like(row_max)
    col_max = torch.full((m if need_col else 0,), float("-inf"), dtype=acc, device=x.device)
    col_sum = torch.zeros_like(col_max)
    for i0, i1, j0, j1, x_blk, y_blk in _tiles(x, y, acc):
        _, logits = _logits(x_blk, y_blk, scale[i0:i1], row_bias[i0:i1], col_bias[j0:j1], keep_sim=False)
        if need_row:
            _online_update(row_max[i0:i1], row_sum[i0:i1], logits, 1, consume=not need_col)
        if need_col:
            _online_update(col_max[j0:j1], col_sum[j0:j1], logits, 0, consume=True)
    return row_max + row_sum.log(), col_max + col_sum.log()


def _add_targets(g: Tensor, target: Tensor, target_grad: Tensor, start: int, dim: int) -> None:
    """g[k, target_k - start] += target_grad_k (dim 1; dim 0: transposed) where the target falls in the tile."""
    size = g.shape[dim]
    local = target - start
    inside = (local >= 0) & (local < size)
    index = local.clamp(0, size - 1)
    value = torch.where(inside, target_grad.to(g.dtype), 0.0)
    if dim == 1:
        g.scatter_add_(1, index[:, None], value[:, None])
    else:
        g.scatter_add_(0, index[None, :], value[None, :])


def lse_bwd(problem: Problem, row_lse, col_lse, grad_row, grad_col, *, grad_dtype=None, out=None, in_place=False):
    """(dx, dy, dscale, drow_bias, dcol_bias); dx / dy in `grad_dtype` (default: the features' dtype)."""
    grad_dtype = out[0].dtype if out is not None else grad_dtype
    x, y, scale, row_bias, col_bias = problem.operands
    acc = accumulation_dtype(x.dtype)
    use_row = row_lse.numel() > 0 and grad_row.numel() > 0
    use_col = col_lse.numel() > 0 and grad_col.numel() > 0
    terms = problem.extra_terms()
    row_const, col_const = terms.get("row_const"), terms.get("col_const")
    row_target, col_target = terms.get("row_target"), terms.get("col_target")
    grads = _zero_gradients(x, y, acc)
    for i0, i1, j0, j1, x_blk, y_blk in _tiles(x, y, acc):
        sim, logits = _logits(x_blk, y_blk, scale[i0:i1], row_bias[i0:i1], col_bias[j0:j1], keep_sim=True)
        # G in at most one more tile: the column term is built in a new tile, the row term in place of the logits
        if use_col:
            g = (logits - col_lse[None, j0:j1]).exp_().mul_(grad_col[None, j0:j1].to(acc))
            if use_row:
                g.add_(logits.sub_(row_lse[i0:i1, None]).exp_().mul_(grad_row[i0:i1, None].to(acc)))
        elif use_row:
            g = logits.sub_(row_lse[i0:i1, None]).exp_().mul_(grad_row[i0:i1, None].to(acc))
        else:
            g = logits.zero_()
        del logits
        if row_const is not None:
            g.add_(row_const[i0:i1, None].to(acc))
        if col_const is not None:
            g.add_(col_const[None, j0:j1].to(acc))
        if row_target is not None:
            _add_targets(g, row_target[i0:i1], terms["row_target_grad"][i0:i1], j0, 1)
        if col_target is not None:
            _add_targets(g, col_target[j0:j1], terms["col_target_grad"][j0:j1], i0, 0)
        _add_tile_gradients(grads, g, sim, scale, x_blk, y_blk, i0, i1, j0, j1)
        del sim, g
    return (*add_into(out, grads.dx.to(grad_dtype or x.dtype), grads.dy.to(grad_dtype or y.dtype)),
            grads.dscale.to(scale.dtype), grads.drow_bias.to(row_bias.dtype), grads.dcol_bias.to(col_bias.dtype))


def _negate_positives(t: Tensor, pos_cols: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
    """t[i, j] *= -1 in place where (row, column) is a positive pair of the tile (padded lists, -1 = none): the
    sign flip -z without a sign tile. Out-of-tile entries add 0 (positive columns are unique within a row)."""
    local = pos_cols[i0:i1] - j0
    inside = (local >= 0) & (local < j1 - j0)
    index = local.clamp(0, j1 - j0 - 1)
    t.scatter_add_(1, index, torch.where(inside, -2.0 * t.gather(1, index), 0.0))


def sigmoid_loss(problem: Problem, need_grad: bool, *, out=None, in_place=False):
    """Row sums of softplus(-z L) and (need_grad) the gradients of their total, tile by tile: forward and backward
    in one sweep (3 GEMM-equivalents with gradients, 1 without), at most three tiles alive (S, u = -z L and the
    softplus temporary; G overwrites u)."""
    x, y, scale, row_bias, col_bias = problem.operands
    pos_cols = problem.pos_cols
    acc = accumulation_dtype(x.dtype)
    row_loss = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    grads = _zero_gradients(x, y, acc) if need_grad else None
    for i0, i1, j0, j1, x_blk, y_blk in _tiles(x, y, acc):
        sim, u = _logits(x_blk, y_blk, scale[i0:i1], row_bias[i0:i1], col_bias[j0:j1], keep_sim=need_grad)
        _negate_positives(u, pos_cols, i0, i1, j0, j1)
        row_loss[i0:i1] += torch.nn.functional.softplus(u).sum(1)
        if not need_grad:
            continue
        g = u.sigmoid_()  # sigmoid(-z L); G = -z sigmoid(-z L): flip the positives back
        _negate_positives(g, pos_cols, i0, i1, j0, j1)
        _add_tile_gradients(grads, g, sim, scale, x_blk, y_blk, i0, i1, j0, j1)
        del sim, g
    if need_grad and out is not None:
        grads = grads._replace(**dict(zip(("dx", "dy"), add_into(out, grads.dx, grads.dy))))
    return row_loss, (grads if need_grad else None)
