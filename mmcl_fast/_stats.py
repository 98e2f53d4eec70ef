"""The O((N + M) D) statistics a cross-entropy over L = scale_i <x_i, y_j> + row_bias_i + col_bias_j needs beside the
two log-sum-exps: the positives' logits L[i, row_target_i] and L[col_target_j, j], and the row / column sums of L
(label smoothing). Plain torch over blocks of rows, so their fp32 temporaries stay bounded; `rowdot` is also the
differentiable row-wise dot product the losses use.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._numerics import batched_dot


def empty_vector(x: Tensor, acc: torch.dtype) -> Tensor:
    """A fresh empty vector on x's device: an output that was not asked for (outputs of a custom op must not alias)."""
    return x.new_empty((0,), dtype=acc)


STATS_BLOCK_ROWS = 1 << 16  # rows per block of the O(N*D) statistics: bounds their fp32 temporaries


class RowDot(torch.autograd.Function):
    """sum_d a[i, d] * b[i, d] in `acc`: a batched dot in the forward, elementwise products in the backward, so that
    no matmul runs in the backward (a backward called inside torch.autocast would run a matmul in bf16)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
        ctx.save_for_backward(a, b)
        return batched_dot(a, b, acc)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        column = grad[:, None]
        grad_a = (column * b).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = (column * a).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def rowdot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """sum_d a[i, d] * b[i, d] in `acc` precision, without an (N, D) product temporary (differentiable)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return RowDot.apply(a, b, acc)
    return batched_dot(a, b, acc)


class SquaredNorms(torch.autograd.Function):
    """||x_i||^2 per row in `acc`, with one input (autograd.Function of torch.compile rejects the same tensor passed
    twice, as rowdot(x, x) would) and a backward that allocates one (N, D) gradient (2 g_i x_i), not one per factor."""

    @staticmethod
    def forward(ctx, x: Tensor, acc: torch.dtype) -> Tensor:
        ctx.save_for_backward(x)
        return batched_dot(x, x, acc)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return x * (2 * grad).to(x.dtype)[:, None], None


def squared_norms(x: Tensor, acc: torch.dtype | None = None) -> Tensor:
    """Row squared norms of an (N, D) tensor in `acc` (default: x's dtype), differentiable, O(N*D) in the backward."""
    acc = x.dtype if acc is None else acc
    if torch.is_grad_enabled() and x.requires_grad:
        return SquaredNorms.apply(x, acc)
    return batched_dot(x, x, acc)


def blocked_rowdot(a: Tensor, b: Tensor, b_rows: Tensor | None, acc: torch.dtype) -> Tensor:
    """rowdot(a, b[b_rows]) over blocks of rows: fp32 copies and the gather never exceed one block."""
    out = torch.empty(a.shape[0], dtype=acc, device=a.device)
    for start in range(0, a.shape[0], STATS_BLOCK_ROWS):
        stop = min(start + STATS_BLOCK_ROWS, a.shape[0])
        rows = b[start:stop] if b_rows is None else b[b_rows[start:stop]]
        out[start:stop] = rowdot(a[start:stop], rows, acc)
    return out


def _blocked_weighted_sum(a: Tensor, weights: Tensor | None, acc: torch.dtype) -> Tensor:
    """sum_i weights_i a_i (weights None = 1) in `acc`, one block of rows at a time."""
    total = torch.zeros(a.shape[1], dtype=acc, device=a.device)
    for start in range(0, a.shape[0], STATS_BLOCK_ROWS):
        block = a[start:start + STATS_BLOCK_ROWS].to(acc)
        if weights is not None:
            block = weights[start:start + STATS_BLOCK_ROWS, None] * block
        total += block.sum(0)
    return total


def _blocked_matvec(a: Tensor, v: Tensor, acc: torch.dtype) -> Tensor:
    """a @ v in `acc`, one block of rows at a time."""
    return torch.cat([a[start:start + STATS_BLOCK_ROWS].to(acc) @ v
                      for start in range(0, a.shape[0], STATS_BLOCK_ROWS)])


def linear_stats(x, y, scale, row_bias, col_bias, row_target, col_target, need_sums):
    """Positives' logits and row / column sums of L, O((N + M) D) work, bounded temporaries (no autograd)."""
    acc = scale.dtype
    # outputs of a custom op must not alias each other: a fresh empty tensor for each absent one
    row_pos, col_pos, row_sum, col_sum = (empty_vector(x, acc) for _ in range(4))
    if row_target.numel():
        row_pos = scale * blocked_rowdot(x, y, row_target, acc) + row_bias + col_bias[row_target]
    if col_target.numel():
        col_pos = (scale[col_target] * blocked_rowdot(y, x, col_target, acc) + row_bias[col_target]
                   + col_bias)
    if need_sums:
        n, m = x.shape[0], y.shape[0]
        row_sum = scale * _blocked_matvec(x, _blocked_weighted_sum(y, None, acc), acc) + m * row_bias + col_bias.sum()
        col_sum = (_blocked_matvec(y, _blocked_weighted_sum(x, scale, acc), acc) + row_bias.sum()
                   + n * col_bias)
    return row_pos, col_pos, row_sum, col_sum
