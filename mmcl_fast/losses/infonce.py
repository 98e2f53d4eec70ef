"""InfoNCE over an affine similarity: the generic loss every contrastive objective here is a thin layer over.

Logits are ``L_ij = scale_i * sim(q_i, k_j) + row_bias_i + col_bias_j`` with sim the dot product or the negative
squared Euclidean distance. The softmax normalisers come from the streamed-LSE primitive (`_ops.affine_lse`);
the positives' logits and label-smoothing sums come out of the same op, their gradients folded into the kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops
from .._autocast import autocast_off
from .._numerics import accumulation_dtype
from .._stats import squared_norms
from .._validate import check_features, check_labels, check_scalar

SIMILARITIES = ("dot", "sqeuclidean")
REDUCTIONS = ("mean", "sum", "none")




class AffineLogits:
    """The logits L_ij = a_i <x_i, y_j> + r_i + c_j of one loss, in the primitive's affine form."""

    def __init__(self, x: Tensor, y: Tensor, a: Tensor, r: Tensor, c: Tensor):
        self.x, self.y, self.a, self.r, self.c = x, y, a, r, c


def _vector(value, length: int, name: str, like: Tensor, acc: torch.dtype) -> Tensor:
    if value is None:
        return torch.zeros(length, dtype=acc, device=like.device)
    value = check_scalar(value, name, like, allow_vector_of=length)
    if not isinstance(value, Tensor):
        return torch.full((length,), value, dtype=acc, device=like.device)
    return value.to(acc).expand(length)


def affine_logits(query: Tensor, keys: Tensor, scale=1.0, row_bias=None, col_bias=None,
                  similarity: str = "dot") -> AffineLogits:
    """Rewrite ``scale_i * sim(q_i, k_j) + row_bias_i + col_bias_j`` in the primitive's affine form.

    With sim = -||q - k||^2 = 2<q,k> - ||q||^2 - ||k||^2 and a scalar scale, the norms become biases. A per-row
    scale multiplies ||k_j||^2 by scale_i, which is not a column bias: then one feature is appended,
    q~ = [2q, -1], k~ = [k, ||k||^2], so that <q~, k~> = 2<q,k> - ||k||^2 (one extra column, O(N) extra memory).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    acc = accumulation_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    a = _vector(scale, n, "scale", query, acc)
    r = _vector(row_bias, n, "row_bias", query, acc)
    c = _vector(col_bias, m, "col_bias", query, acc)
    if similarity == "dot":
        return AffineLogits(query, keys, a, r, c)
    q_norm, k_norm = squared_norms(query, acc), squared_norms(keys, acc)
    scalar_scale = scale is None or not isinstance(scale, Tensor) or scale.dim() == 0 or scale.numel() == 1
    if scalar_scale:
        return AffineLogits(query, keys, 2 * a, r - a * q_norm, c - a[0] * k_norm)
    x = torch.cat([2 * query, -torch.ones(n, 1, dtype=query.dtype, device=query.device)], dim=1)
    y = torch.cat([keys, k_norm.to(keys.dtype)[:, None]], dim=1)
    return AffineLogits(x, y, a, r - a * q_norm, c)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


@autocast_off
def infonce(query: Tensor, keys: Tensor, scale=1.0, *, row_bias=None, col_bias=None,
            query_labels: Tensor | None = None, key_labels: Tensor | None = None,
            similarity: str = "dot", symmetric: bool = True, label_smoothing: float = 0.0,
            reduction: str = "mean", backend: str = "auto"):
    """Exact InfoNCE / cross-entropy over ``L_ij = scale_i * sim(q_i, k_j) + row_bias_i + col_bias_j``.

    Args:
        query: (N, D), keys: (M, D) features (float32 / bfloat16 / float16 / float64, same dtype and device).
        scale: inverse temperature: float, 0-d tensor or (N,) per-row tensor (differentiable).
        row_bias: scalar or (N,); col_bias: scalar or (M,) (differentiable).
        query_labels: (N,) index of each query's positive key (default: the diagonal, needs N == M).
        key_labels: (M,) index of each key's positive query, for the key→query direction (default: diagonal).
        similarity: "dot" or "sqeuclidean" (sim = -||q - k||^2).
        symmetric: True → ½ (CE over rows + CE over columns); False → CE over rows (query → keys) only.
        label_smoothing: as in `torch.nn.functional.cross_entropy`.
        reduction: "mean" | "sum" | "none" ("none" returns the per-row losses, and with symmetric=True the
            tuple (row_losses, col_losses)).
        backend: "auto" | "reference" | "torch" | "cpu" | "triton".

    Returns a float32 tensor for float32/bf16/fp16 features (float64 for float64). Memory O((N + M) * D).
    """
    check_features(query, "query", keys, "keys")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    n, m = query.shape[0], keys.shape[0]
    if query_labels is None and n != m:
        raise ValueError(f"query has {n} rows and keys has {m}: unequal batch sizes need query_labels")
    if symmetric and key_labels is None and n != m:
        raise ValueError(f"query has {n} rows and keys has {m}: the symmetric loss needs key_labels too")
    if query_labels is not None:
        query_labels = check_labels(query_labels, "query_labels", n, m, query)
    if symmetric and key_labels is not None:
        key_labels = check_labels(key_labels, "key_labels", m, n, query)
    logits = affine_logits(query, keys, scale, row_bias, col_bias, similarity)
    return _infonce_from_affine(logits, query_labels, key_labels if symmetric else None, symmetric,
                                float(label_smoothing), reduction, backend)


def _infonce_from_affine(logits: AffineLogits, row_labels, col_labels, symmetric: bool, smoothing: float,
                         reduction: str, backend: str):
    n, m = logits.x.shape[0], logits.y.shape[0]
    device = logits.x.device
    row_target = row_labels if row_labels is not None else torch.arange(n, device=device)
    col_target = None
    if symmetric:
        col_target = col_labels if col_labels is not None else torch.arange(m, device=device)
    row_lse, col_lse, row_pos, col_pos, row_sum, col_sum = _ops.softmax_stats(
        logits.x, logits.y, logits.a, logits.r, logits.c, row_target=row_target, col_target=col_target,
        need_row=True, need_col=symmetric, need_sums=smoothing > 0, backend=backend)
    # cross_entropy with label smoothing: lse - (1 - eps) * L[target] - eps * mean(L over classes)
    row_losses = row_lse - (1 - smoothing) * row_pos
    if smoothing:
        row_losses = row_losses - smoothing / m * row_sum
    if not symmetric:
        return _reduce(row_losses, reduction)
    col_losses = col_lse - (1 - smoothing) * col_pos
    if smoothing:
        col_losses = col_losses - smoothing / n * col_sum
    if reduction == "none":
        return row_losses, col_losses
    return 0.5 * (_reduce(row_losses, reduction) + _reduce(col_losses, reduction))
