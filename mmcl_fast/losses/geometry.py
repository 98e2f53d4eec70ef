"""Geometric-consistency losses (docs/design.md#geometric-consistency, Jiang et al. CVPR 2023), exact in O(N*D^2)
time and O(D^2) memory.

    L_GC   = (1/N) sum_jk [(<v_j,w_k> - <v_k,w_j>)^2 + (<v_j,v_k> - <w_j,w_k>)^2]
    L^a_GC = (1/N) sum_jk [(<v_j,v_k> - <a_j,a_k>)^2 + (<w_j,w_k> - <b_j,b_k>)^2]
             + (1/N) sum_j (<v_j,w_j> - <a_j,b_j>)^2

(v, w: image and text features; a, b: their augmented views.) No N x N matrix is formed. With the difference
and sum features E = V - W, S = V + W, the (j, k) entry of the two L_GC brackets is the symmetric and the
antisymmetric part of <E_j, S_k>, so their squares add up to

    L_GC = (1/N) ||E S^T||_F^2 = (1/N) <E^T E, S^T S>_F                          (two D x D Grams)

and, with E = V - A, S = V + A (and the same for the text pair), V V^T - A A^T = (E S^T + S E^T) / 2 gives

    ||V V^T - A A^T||_F^2 = (<E^T E, S^T S>_F + tr(C C)) / 2,    C = S^T E.

Written this way nothing cancels when the views are nearly aligned (E is small, and so is the loss). One
cancellation is left: when A is an orthogonal map of V (A = V R, the same Gram structure) the term is 0 while
tr(C C) = -<E^T E, S^T S> is not small; the Grams are therefore accumulated in float64 over row blocks (inputs
are read block by block, never up-cast whole). The gradients come from the same Grams in closed form: for
f = <E^T E, S^T S>, df/dE = 2 E (S^T S), df/dS = 2 S (E^T E); for g = (<E^T E, S^T S> + tr(C C)) / 2,
dg/dE = E (S^T S) + S C^T and dg/dS = S (E^T E) + E C.
Work: N D^2 multiply-adds per Gram (2 Grams for L_GC, 3 per augmented pair) and per (N, D) x (D, D) product in
the backward (2 for L_GC, 4 per augmented pair), in float64; memory O(D^2) plus row-block temporaries.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._autocast import autocast_off
from .._numerics import accumulation_dtype
from .._validate import check_same_shape

# Rows per block: keep each float64 block temporary around 4 MiB, whatever D is.
_BLOCK_BYTES = 4 << 20


def _block_rows(dim: int) -> int:
    return max(1, _BLOCK_BYTES // (8 * dim))


def _diff_sum(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    first, second = first.to(torch.float64), second.to(torch.float64)
    return first - second, first + second


def _rowdot64(first: Tensor, second: Tensor) -> Tensor:
    return (first.to(torch.float64) * second.to(torch.float64)).sum(1)


class _GeometricConsistency(torch.autograd.Function):
    """L_GC (+ L^a_GC when the augmented views are given) from float64 Grams; see the module docstring."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, image_aug: Tensor | None, text_aug: Tensor | None) -> Tensor:
        n, dim = image.shape
        with_aug = image_aug is not None
        names = ["diff", "sum"]
        if with_aug:
            names += [f"{view}_{kind}" for view in ("image", "text") for kind in ("diff", "sum", "cross")]
        grams = {name: image.new_zeros((dim, dim), dtype=torch.float64) for name in names}
        pair_gap = image.new_zeros((n if with_aug else 0,), dtype=torch.float64)  # <v_j,w_j> - <a_j,b_j>
        step = _block_rows(dim)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            diff, total = _diff_sum(image[rows], text[rows])
            grams["diff"].addmm_(diff.T, diff)
            grams["sum"].addmm_(total.T, total)
            if with_aug:
                for name, view, aug_view in (("image", image, image_aug), ("text", text, text_aug)):
                    diff, total = _diff_sum(view[rows], aug_view[rows])
                    grams[f"{name}_diff"].addmm_(diff.T, diff)
                    grams[f"{name}_sum"].addmm_(total.T, total)
                    grams[f"{name}_cross"].addmm_(total.T, diff)
                pair_gap[rows] = _rowdot64(image[rows], text[rows]) - _rowdot64(image_aug[rows], text_aug[rows])
        loss = (grams["diff"] * grams["sum"]).sum()
        if with_aug:
            for name in ("image", "text"):
                cross = grams[f"{name}_cross"]
                loss = loss + 0.5 * ((grams[f"{name}_diff"] * grams[f"{name}_sum"]).sum() + (cross * cross.T).sum())
            loss = loss + (pair_gap * pair_gap).sum()
        ctx.grams = grams
        ctx.save_for_backward(image, text, *((image_aug, text_aug, pair_gap) if with_aug else ()))
        return loss / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        saved = ctx.saved_tensors
        image, text = saved[:2]
        with_aug = len(saved) > 2
        image_aug, text_aug, pair_gap = saved[2:] if with_aug else (None, None, None)
        grams = ctx.grams
        n, dim = image.shape
        coef = grad_loss.to(torch.float64) / n
        needs = ctx.needs_input_grad
        d_image, d_text = torch.empty_like(image), torch.empty_like(text)
        d_image_aug = torch.empty_like(image_aug) if with_aug else None
        d_text_aug = torch.empty_like(text_aug) if with_aug else None
        step = _block_rows(dim)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            diff, total = _diff_sum(image[rows], text[rows])
            d_diff = 2.0 * (diff @ grams["sum"])
            d_total = 2.0 * (total @ grams["diff"])
            grad_image, grad_text = d_total + d_diff, d_total - d_diff
            if with_aug:
                aug_grads = []
                for name, view, aug_view, grad_view in (("image", image, image_aug, grad_image),
                                                        ("text", text, text_aug, grad_text)):
                    diff, total = _diff_sum(view[rows], aug_view[rows])
                    cross = grams[f"{name}_cross"]
                    d_diff = diff @ grams[f"{name}_sum"] + total @ cross.T
                    d_total = total @ grams[f"{name}_diff"] + diff @ cross
                    grad_view += d_total + d_diff
                    aug_grads.append(d_total - d_diff)
                gap = 2.0 * pair_gap[rows, None]
                grad_image += gap * text[rows].to(torch.float64)
                grad_text += gap * image[rows].to(torch.float64)
                aug_grads[0] -= gap * text_aug[rows].to(torch.float64)
                aug_grads[1] -= gap * image_aug[rows].to(torch.float64)
                d_image_aug[rows] = coef * aug_grads[0]
                d_text_aug[rows] = coef * aug_grads[1]
            d_image[rows] = coef * grad_image
            d_text[rows] = coef * grad_text
        grads = (d_image, d_text, d_image_aug, d_text_aug)
        return tuple(g if need else None for g, need in zip(grads, needs))


@autocast_off
def geometric_consistency_loss(image_features: Tensor, text_features: Tensor, image_aug: Tensor | None = None,
                               text_aug: Tensor | None = None) -> Tensor:
    """Geometric-consistency loss L_GC of Jiang et al. (CVPR 2023), plus L^a_GC when both augmented views are given.

    L_GC keeps the image-text similarity structure symmetric and the image-image and text-text structures equal;
    L^a_GC keeps each modality's structure, and each pair's image-text similarity, stable under augmentation
    (formulas: docs/design.md#geometric-consistency). Exact, in O(N*D^2) time through D x D Gram matrices accumulated
    in float64, O(D^2 + N) extra memory: no N x N matrix, and full accuracy when image and text are nearly aligned
    (loss ~ 0). Any floating dtype (bf16/fp16 blocks are widened to float64 one block at a time); gradients come back
    in the features' dtype.

    Args:
        image_features: (N, D) image features z_V.
        text_features: (N, D) paired text features z_T.
        image_aug: optional (N, D) features of augmented images z^a_V; give both augmented views or neither.
        text_aug: optional (N, D) features of augmented texts z^a_T.

    Returns:
        0-d tensor L_GC (+ L^a_GC), float32 (float64 for float64 features).
    """
    check_same_shape(image_features, "image_features", text_features, "text_features")
    if (image_aug is None) != (text_aug is None):
        missing = "text_aug" if text_aug is None else "image_aug"
        raise ValueError(f"L^a_GC needs both augmented views: got one of image_aug / text_aug but {missing} is None")
    if image_aug is not None:
        check_same_shape(image_features, "image_features", image_aug, "image_aug")
        check_same_shape(text_features, "text_features", text_aug, "text_aug")
    acc = accumulation_dtype(image_features.dtype)
    return _GeometricConsistency.apply(image_features, text_features, image_aug, text_aug).to(acc)


class GeometricConsistencyLoss(nn.Module):
    """Module form of `geometric_consistency_loss`; ``forward(image, text, image_aug=None, text_aug=None)``."""

    def forward(self, image_features: Tensor, text_features: Tensor, image_aug: Tensor | None = None,
                text_aug: Tensor | None = None) -> Tensor:
        return geometric_consistency_loss(image_features, text_features, image_aug, text_aug)
