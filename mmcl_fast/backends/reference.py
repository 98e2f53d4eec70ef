"""Dense PyTorch reference of the streamed-LSE primitive: materialises the N x M logits.

This is the ground truth for tests and the path for float64 inputs. It is the only backend allowed an N x M
buffer. Inputs are computed in at least float32 (bf16/fp16 are up-cast here, which the kernels do not do).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._numerics import accumulation_dtype
from .._problem import Gradients, Problem, add_into


def _logits(x, y, scale, row_bias, col_bias):
    acc = accumulation_dtype(x.dtype)
    sim = x.to(acc) @ y.to(acc).T
    return sim, scale.to(acc)[:, None] * sim + row_bias.to(acc)[:, None] + col_bias.to(acc)[None, :]


def lse_fwd(problem: Problem, need_row: bool, need_col: bool):
    x, y, scale, row_bias, col_bias = problem.operands
    _, logits = _logits(x, y, scale, row_bias, col_bias)
    empty = logits.new_empty((0,))
    row_lse = torch.logsumexp(logits, dim=1) if need_row else empty
    col_lse = torch.logsumexp(logits, dim=0) if need_col else empty.clone()
    return row_lse, col_lse


def gradient_weights(logits, row_lse, col_lse, grad_row, grad_col, terms=None):
    """The dense G_ij of docs/design.md#gradient-weights (softmax terms plus the folded linear terms: `Problem.extra_terms()`)."""
    acc = logits.dtype
    g = torch.zeros_like(logits)
    if row_lse.numel() and grad_row.numel():
        g += grad_row.to(acc)[:, None] * torch.exp(logits - row_lse.to(acc)[:, None])
    if col_lse.numel() and grad_col.numel():
        g += grad_col.to(acc)[None, :] * torch.exp(logits - col_lse.to(acc)[None, :])
    terms = terms or {}
    if "row_const" in terms:
        g += terms["row_const"].to(acc)[:, None]
    if "col_const" in terms:
        g += terms["col_const"].to(acc)[None, :]
    if "row_target" in terms:
        rows = torch.arange(g.shape[0], device=g.device)
        g.index_put_((rows, terms["row_target"]), terms["row_target_grad"].to(acc), accumulate=True)
    if "col_target" in terms:
        cols = torch.arange(g.shape[1], device=g.device)
        g.index_put_((terms["col_target"], cols), terms["col_target_grad"].to(acc), accumulate=True)
    return g


def lse_bwd(problem: Problem, row_lse, col_lse, grad_row, grad_col, *, grad_dtype=None, out=None, in_place=False):
    grad_dtype = out[0].dtype if out is not None else grad_dtype
    x, y, scale, row_bias, col_bias = problem.operands
    acc = accumulation_dtype(x.dtype)
    sim, logits = _logits(x, y, scale, row_bias, col_bias)
    g = gradient_weights(logits, row_lse, col_lse, grad_row, grad_col, problem.extra_terms())
    gs = g * scale.to(acc)[:, None]
    dx = (gs @ y.to(acc)).to(grad_dtype or x.dtype)
    dy = (gs.T @ x.to(acc)).to(grad_dtype or y.dtype)
    dscale = (g * sim).sum(1).to(scale.dtype)
    drow = g.sum(1).to(row_bias.dtype)
    dcol = g.sum(0).to(col_bias.dtype)
    return (*add_into(out, dx, dy), dscale, drow, dcol)


def positive_mask(pos_cols: Tensor, m: int) -> Tensor:
    """Dense (N, M) bool mask of the positives given as padded per-row column lists (-1 = no entry)."""
    mask = torch.zeros(pos_cols.shape[0], m + 1, dtype=torch.bool, device=pos_cols.device)
    mask.scatter_(1, torch.where(pos_cols < 0, m, pos_cols), True)
    return mask[:, :m]


def sigmoid_loss(problem: Problem, need_grad: bool, *, out=None, in_place=False):
    """Dense sigmoid loss: row sums of softplus(-z L) and (need_grad) the gradients of their total."""
    x, y, scale, row_bias, col_bias = problem.operands
    acc = accumulation_dtype(x.dtype)
    sim, logits = _logits(x, y, scale, row_bias, col_bias)
    sign = 1.0 - 2.0 * positive_mask(problem.pos_cols, y.shape[0]).to(acc)  # -z: +1 for negatives, -1 for positives
    u = sign * logits
    row_loss = torch.nn.functional.softplus(u).sum(1)
    if not need_grad:
        return row_loss, None
    g = sign * torch.sigmoid(u)
    gs = g * scale.to(acc)[:, None]
    return row_loss, Gradients(*add_into(out, gs @ y.to(acc), gs.T @ x.to(acc)), (g * sim).sum(1), g.sum(1), g.sum(0))
