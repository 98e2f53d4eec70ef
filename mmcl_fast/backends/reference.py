"""Dense PyTorch reference of the streamed-LSE primitive: materialises the N x M logits.

This is the ground truth for tests and the path for float64 inputs. It is the only backend allowed an N x M
buffer. Inputs are computed in at least float32 (bf16/fp16 are up-cast here, which the kernels do not do).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _logits(x, y, scale, row_bias, col_bias):
    acc = _acc_dtype(x)
    sim = x.to(acc) @ y.to(acc).T
    return sim, scale.to(acc)[:, None] * sim + row_bias.to(acc)[:, None] + col_bias.to(acc)[None, :]


def lse_fwd(x, y, scale, row_bias, col_bias, need_row: bool, need_col: bool):
    _, logits = _logits(x, y, scale, row_bias, col_bias)
    empty = logits.new_empty((0,))
    row_lse = torch.logsumexp(logits, dim=1) if need_row else empty
    col_lse = torch.logsumexp(logits, dim=0) if need_col else empty.clone()
    return row_lse, col_lse


def lse_bwd(x, y, scale, row_bias, col_bias, row_lse, col_lse, grad_row, grad_col):
    acc = _acc_dtype(x)
    sim, logits = _logits(x, y, scale, row_bias, col_bias)
    g = torch.zeros_like(logits)
    if row_lse.numel():
        g += grad_row.to(acc)[:, None] * torch.exp(logits - row_lse.to(acc)[:, None])
    if col_lse.numel():
        g += grad_col.to(acc)[None, :] * torch.exp(logits - col_lse.to(acc)[None, :])
    gs = g * scale.to(acc)[:, None]
    dx = (gs @ y.to(acc)).to(x.dtype)
    dy = (gs.T @ x.to(acc)).to(y.dtype)
    dscale = (g * sim).sum(1).to(scale.dtype)
    drow = g.sum(1).to(row_bias.dtype)
    dcol = g.sum(0).to(col_bias.dtype)
    return dx, dy, dscale, drow, dcol
