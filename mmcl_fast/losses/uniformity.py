"""Uniformity loss (Wang & Isola 2020, as used by Jiang et al. CVPR 2023), exact on the streamed-LSE primitive.

    L_uni(x) = log( (1/N^2) sum_j sum_k exp(-t ||x_j - x_k||^2) )

The pair logits are affine in the features: -t ||x_j - x_k||^2 = 2t <x_j, x_k> - t ||x_j||^2 - t ||x_k||^2, so the
primitive with x = y = features, scale = 2t and row / column bias -t ||x||^2 gives every row's log-sum-exp over all
N columns (need_col=False: the matrix is symmetric, one side is enough), and
L_uni = logsumexp_j(row_lse_j) - 2 log N. Work: one N x N x D GEMM forward, two backward; O(N*D) memory.

Precision: the feature gradient is a cancelling sum, 2t sum_k p_jk (x_k - x_j), assembled from three parts (the
kernel's x-side and y-side gradients and the norm bias's). bfloat16/float16 features are therefore run through
the kernel as a float32 copy (O(N*D)), so that the parts meet in float32 and the gradient is rounded to the input
dtype once; 16-bit parts rounded separately would cancel into errors of a few percent.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _ops
from .._autocast import autocast_off
from .._numerics import accumulation_dtype
from .._stats import squared_norms
from .._validate import check_feature, check_scalar


def _check_positive(value, name: str, like: Tensor):
    value = check_scalar(value, name, like)
    number = float(value.detach()) if isinstance(value, Tensor) else value
    if not (number > 0.0 and math.isfinite(number)):
        raise ValueError(f"{name} must be a positive finite number, got {number}")
    return value


@autocast_off
def uniformity_loss(x: Tensor, t=2.0, *, backend: str = "auto") -> Tensor:
    """Uniformity of features on the sphere: log of the mean over all N^2 pairs of exp(-t ||x_j - x_k||^2).

    The mean runs over all N^2 ordered pairs, the diagonal (j = k, distance 0) included, as docs/design.md#uniformity
    specifies for L^i_Uni (Jiang et al. print 1/N, a misprint for the pair mean of the Wang & Isola loss they cite; Wang &
    Isola's reference code averages over the N(N-1)/2 distinct pairs instead, which differs by the diagonal).

    Args:
        x: (N, D) features (L2-normalised in the papers; not enforced), any floating dtype (16-bit features are
            computed as float32, see the module docstring).
        t: positive temperature of the Gaussian potential (default 2): float or 0-d tensor (may require grad).
        backend: primitive backend: "auto" | "reference" | "torch" | "cpu" | "triton".

    Returns:
        0-d tensor, float32 (float64 for float64 features). Memory O(N*D), never N x N.
    """
    check_feature(x, "x")
    t = _check_positive(t, "t", x)
    acc = accumulation_dtype(x.dtype)
    if isinstance(t, Tensor):
        t = t.to(acc)
    features = x.to(acc)
    norm_bias = -t * squared_norms(features)
    row_lse, _ = _ops.affine_lse(features, features, 2 * t, norm_bias, norm_bias, need_row=True, need_col=False,
                                 backend=backend)
    return torch.logsumexp(row_lse, dim=0) - 2.0 * math.log(x.shape[0])


class UniformityLoss(nn.Module):
    """Module form of `uniformity_loss`; ``forward(x)``."""

    def __init__(self, t=2.0, backend: str = "auto"):
        super().__init__()
        self.t = t
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return uniformity_loss(x, self.t, backend=self.backend)

    def extra_repr(self) -> str:
        return f"t={self.t}, backend={self.backend!r}"
