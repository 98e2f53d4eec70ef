"""The typed structs that carry a problem through the layers (losses -> _ops -> backends -> compiled core).

Every fused kernel works on the affine similarity L_ij = scale_i <x_i, y_j> + row_bias_i + col_bias_j. Instead of
long positional chains, the backends take an `Affine` (and, for the sigmoid loss, `Positives`); the CPU backend
turns them into the compiled core's checked `AffineProblem` / `Positives` structs, so a size or dtype mistake
raises instead of reading out of bounds.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Affine(NamedTuple):
    """x (N, D), y (M, D) features (same dtype, unit feature stride); scale, row_bias (N,) and col_bias (M,) in the
    accumulation dtype (float32; float64 for float64 features)."""

    x: Tensor
    y: Tensor
    scale: Tensor
    row_bias: Tensor
    col_bias: Tensor


class Positives(NamedTuple):
    """Positive pairs of a sigmoid loss in CSR form: row i's positive columns are cols[ptr[i]:ptr[i + 1]], sorted
    ascending and unique. ptr: (N + 1,) int64, cols: (P,) int64."""

    ptr: Tensor
    cols: Tensor


class Gradients(NamedTuple):
    """Gradients with respect to the `Affine` operands."""

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
