"""Cross-modal retrieval metrics and the modality gap, on held-out paired samples.

Query i's one relevant gallery item is gallery item i (the same latent). Its rank is 1 + the number of gallery
items scored strictly higher; R@k is the fraction of queries ranked <= k, and mAP, with a single relevant item per
query, is the mean of 1/rank (mean reciprocal rank). Chance is R@k = k/N and mAP = H_N/N (H_N the harmonic number).
Scores are cosine similarities, computed in row blocks (no N x N buffer).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_same_shape


@torch.no_grad()
def ranks(queries: Tensor, gallery: Tensor, block_rows: int = 1024) -> Tensor:
    """(N,) rank (1 = best) of gallery item i for query i, by cosine similarity."""
    check_same_shape(queries, "queries", gallery, "gallery")
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    g = torch.nn.functional.normalize(gallery.double(), dim=1)
    out = torch.empty(q.shape[0], dtype=torch.long)
    for r0 in range(0, q.shape[0], block_rows):
        scores = q[r0:r0 + block_rows] @ g.T
        own = scores.diagonal(offset=r0)[:, None]  # the same products as the row's other scores: ties stay ties
        out[r0:r0 + block_rows] = 1 + (scores > own).sum(1)
    return out


def retrieval_metrics(queries: Tensor, gallery: Tensor) -> dict[str, float]:
    """{"r1", "r5", "map", "chance_r1", "chance_r5", "chance_map", "n"} for retrieving gallery[i] from queries[i]."""
    rank = ranks(queries, gallery).double()
    n = rank.shape[0]
    harmonic = float((1.0 / torch.arange(1, n + 1, dtype=torch.float64)).sum())
    return {"r1": float((rank <= 1).double().mean()), "r5": float((rank <= 5).double().mean()),
            "map": float((1.0 / rank).mean()), "chance_r1": 1.0 / n, "chance_r5": min(5, n) / n,
            "chance_map": harmonic / n, "n": n}


@torch.no_grad()
def modality_gap(x: Tensor, y: Tensor) -> float:
    """||mean(x̂) − mean(ŷ)||, x̂ and ŷ the L2-normalised rows (Liang et al., 2022)."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    y = torch.nn.functional.normalize(y.double(), dim=1)
    return float((x.mean(0) - y.mean(0)).norm())
