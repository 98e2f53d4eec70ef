"""The one record that carries a problem through the layers (losses -> _ops -> backends -> compiled core).

Every fused kernel works on the affine similarity L_ij = scale_i <x_i, y_j> + row_bias_i + col_bias_j. A backend
takes a `Problem`: the five operands of L, the linear terms a cross-entropy folds into the gradient weights
(`Extras`, read by `lse_bwd`) and the positive pairs of a sigmoid loss (`pos_cols`, read by `sigmoid_loss`). The
CPU backend turns a Problem into the compiled core's checked structs (`AffineProblem`, `LseExtras`, the CSR
`Positives`), so a size or dtype mistake raises instead of reading out of bounds.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _present(t: Tensor | None) -> bool:
    return t is not None and t.numel() > 0


class Extras(NamedTuple):
    """The linear terms folded into the gradient weights of `lse_bwd`:

        G_ij += row_const_i + col_const_j + row_target_grad_i [j == row_target_i] + col_target_grad_j [i == col_target_j]

    row_const, row_target, row_target_grad: (N,); col_const, col_target, col_target_grad: (M,); the consts and
    target gradients in the accumulation dtype, the targets int64 indices. None or an empty tensor = absent."""

    row_const: Tensor | None = None
    col_const: Tensor | None = None
    row_target: Tensor | None = None
    row_target_grad: Tensor | None = None
    col_target: Tensor | None = None
    col_target_grad: Tensor | None = None

    def terms(self) -> dict[str, Tensor]:
        """The terms that contribute, by field name: the non-empty consts, and each target with its gradient only
        when both are present (a target without its gradient, or a gradient without its target, adds nothing)."""
        found = {name: t for name, t in (("row_const", self.row_const), ("col_const", self.col_const))
                 if _present(t)}
        for side in ("row", "col"):
            target, grad = getattr(self, f"{side}_target"), getattr(self, f"{side}_target_grad")
            if _present(target) and _present(grad):
                found[f"{side}_target"], found[f"{side}_target_grad"] = target, grad
        return found


class Problem(NamedTuple):
    """One fused-kernel problem. x (N, D), y (M, D): features of one dtype with unit feature stride; scale, row_bias
    (N,) and col_bias (M,) in the accumulation dtype (float32; float64 for float64 features).

    extras: the linear terms of `lse_bwd` (None: none). pos_cols: the positive pairs of `sigmoid_loss`, the one
    encoding used above the compiled core: an (N, K) int64 table, row i's positive columns ascending and unique,
    then -1 padding (K >= 1; None is not allowed for a sigmoid loss)."""

    x: Tensor
    y: Tensor
    scale: Tensor
    row_bias: Tensor
    col_bias: Tensor
    extras: Extras | None = None
    pos_cols: Tensor | None = None

    @property
    def operands(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(x, y, scale, row_bias, col_bias)."""
        return self.x, self.y, self.scale, self.row_bias, self.col_bias

    def extra_terms(self) -> dict[str, Tensor]:
        """`Extras.terms()` of this problem ({} without extras)."""
        return {} if self.extras is None else self.extras.terms()


class Gradients(NamedTuple):
    """Gradients with respect to the operands of a `Problem`."""

    dx: Tensor
    dy: Tensor
    dscale: Tensor
    drow_bias: Tensor
    dcol_bias: Tensor


def add_into(out, dx: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dy), or with `out` = (dx_sum, dy_sum): the sums with the new gradients added in place (the `out=` option of
    the backends' backward entry points, for backends that compute into a fresh tensor first)."""
    if out is None:
        return dx, dy
    out[0].add_(dx)
    out[1].add_(dy)
    return out[0], out[1]


# Rows past the end of a gradient accumulator that a compiled kernel may write into when it adds to the accumulator
# in place (its padded row blocks; csrc/dispatch.h kSpareRows). `accumulator` leaves them.
SPARE_ROWS = 32


def accumulator(rows: int, cols: int, dtype: torch.dtype, device) -> Tensor:
    """A zeroed (rows, cols) gradient accumulator that the backends' ``out=..., in_place=True`` may add into directly
    (no accumulator-sized temporary): a view of the first rows of a buffer with SPARE_ROWS more."""
    return torch.zeros((rows + SPARE_ROWS, cols), dtype=dtype, device=device)[:rows]
