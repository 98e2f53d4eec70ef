"""Triton kernels of the fused primitive (docs/design.md#fused-primitive, #siglip): row/column LSE forward, and one
chunked tile sweep whose epilogue turns each similarity tile into gradient weights: the LSE backward's (below) or the
sigmoid loss's.

The sweep (`_sweep`, `_grad_tile_kernel`) is shared: each tile of X Y^T is computed once, an epilogue
(`_lse_epilogue`, `_sigmoid_epilogue`) makes its gradient weights G (and, for the sigmoid, its loss terms), G is
staged for a bounded chunk and dX += G Y, dY += G^T X run as two GEMMs over the chunk. The sigmoid loss
(`sigmoid_loss`) needs no statistics of the whole row or column, so its forward and backward are this one sweep:
3 GEMM-equivalents with gradients, 1 without.

The logits are ``L_ij = a_i <x_i, y_j> + r_i + c_j``. Forward returns ``row_lse_i = log sum_j exp L_ij`` and
``col_lse_j = log sum_i exp L_ij``; backward turns the upstream gradients of those LSEs into

    G_ij = grad_row_i exp(L_ij - row_lse_i) + grad_col_j exp(L_ij - col_lse_j)
    dx_i = a_i sum_j G_ij y_j,  dy_j = sum_i G_ij a_i x_i,  da_i = sum_j G_ij <x_i,y_j>,  dr_i = sum_j G_ij,
    dc_j = sum_i G_ij.

Work: 4 N*M*D GEMM-equivalents for a symmetric loss (Inf-CL spends 10).
  - forward, 1: one sweep over the tiles of X Y^T gives row and column LSE together (`_lse_partials_kernel`).
    The grid is R x C "splits": program (r, c) owns the row blocks r, r+R, ... and a contiguous range of column
    tiles; it keeps its rows' running (max, sum) in registers and its columns' running (max, sum) in a slot of
    an (R, M) buffer that no other program touches. The R + C partials per row / column are merged at the
    end in a fixed order: deterministic, no atomics, online max (never a fixed shift).
  - backward, 3: each tile of X Y^T is recomputed once (`_grad_tile_kernel`), which writes a_i G_ij for a
    bounded chunk of the matrix and reduces da, dr, dc from the fp32 G in the same pass; dX and dY are then
    two GEMMs over that chunk (`matmul.accumulate_matmul`). A register-resident dX accumulator (the
    FlashAttention layout) is impossible here: a BLOCK x D fp32 block is 128-256 KiB at D = 512-1024, the
    whole register file of an SM, so one tensor-core GEMM over a staged chunk of G is the fast layout.

Memory: inputs and gradients O((N + M) D), the fp32 dY accumulator (only when N spans several row chunks),
forward partials 2 (R + C)(N + M) floats with R, C <= 16, one staged G chunk of at most
`MMCL_FAST_TRITON_CHUNK_MB` MiB (default 128) and, for bf16, an fp16 copy of the chunk's feature rows: bounded
whatever N and M. Never N x M.

Precision: bf16/fp16 features go to the tensor cores as they are in the forward and the recompute, with fp32
accumulation and fp32 LSE. G is staged in fp16 for bf16 and fp16 features (11-bit significand: 8x finer
than bf16, which would add up to 2^-8 relative error per term and break the bf16 gradient tolerance at real
sizes), lifted into fp16's range by a power of two computed on the device; for the backward GEMMs the bf16
feature rows of the current chunk are copied to fp16 with a power-of-two shift (exact down to 2^-31 of the
largest entry). fp32 features are computed in full fp32 (`input_precision="ieee"`) unless the caller allows
TF32 (`torch.backends.cuda.matmul.allow_tf32`, or the newer `fp32_precision = "tf32"`): then the dots run as
"tf32x3" (three TF32 passes, near-IEEE accuracy on the tensor cores), because a single TF32 pass truncates the
features to 10 bits while the positives' logits come from an fp32 torch product: at logit_scale 100 that
mismatch biases the loss by ~0.06 on a confident row. `MMCL_FAST_TRITON_TF32=1x` takes the single pass anyway.
exp(L - lse) is one fma of the exact product with the bias-minus-lse term, so the large parts cancel before
rounding.

Devices: every launch runs under the features' CUDA device (a guard), not the current one.

Determinism: no atomics; every reduction has a fixed order for a given config, so runs in one process are
bit-identical. The autotuner picks configs per process by timing; `MMCL_FAST_TRITON_AUTOTUNE=0` pins the first
config of each list, which makes runs bit-identical across processes too.

Interpreter (TRITON_INTERPRET=1, CPU tensors): bf16/fp16 tiles are converted to fp32 before `tl.dot`, whose
half-precision path is wrong there, and bf16 stores are rounded by hand (the interpreter truncates).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._problem import Gradients, Problem, add_into
from ..._validate import check_features
from .. import KERNEL_DTYPES
from .matmul import TUNING_SIDE, accumulate_matmul, interpreting, size_class

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the same constant, visible inside @triton.jit functions


# (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages) per kernel and feature type: "half" (bf16 and fp16), "bf16",
# "fp16", "fp32" (IEEE) and "tf32" (tf32 / tf32x3). Every one compiles for sm_90 with no register spills
# (`pytest --runslow -k hopper` checks them all): 16-bit features take wgmma tiles (64-row multiples per warp
# group); fp32 in full precision runs on the FMA units and wants small tiles; TF32 sits in between. The gradient
# tile kernel holds more live state than the forward (G, the folded terms, two reductions), and its register
# allocation differs between bf16 (converted to fp16 for the fp16-staged G) and fp16, so it has its own lists.
_FORWARD_SHAPES = {
    "half": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
             (64, 64, 32, 4, 4)],
    "fp32": [(64, 64, 32, 8, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 2)],
    "tf32": [(128, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
}
_GRAD_SHAPES = {
    "bf16": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 32, 4, 4), (64, 64, 64, 4, 3)],
    "fp16": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (64, 128, 64, 4, 3)],
    "fp32": [(64, 64, 32, 8, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3)],
    "tf32": [(128, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
}
# The sigmoid epilogue keeps its sign mask and softplus terms live next to G: 128 x 128 tiles spill on sm_90 for
# 16-bit and TF32 features, so it keeps the grad kernel's smaller shapes.
_SIGMOID_SHAPES = {
    "bf16": [(64, 64, 32, 4, 4), (64, 64, 64, 4, 3)],
    "fp16": [(64, 128, 64, 4, 4), (64, 128, 64, 4, 3)],
    "fp32": [(64, 64, 32, 8, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3)],
    "tf32": [(64, 64, 32, 8, 3)],
}


def _tile_configs():
    if interpreting():
        # Small tiles so that the CPU tests cover several tiles, edges and every split of the grid.
        shapes = [(16, 32, 16, 4, 1)]
    else:
        tables = (_FORWARD_SHAPES, _GRAD_SHAPES, _SIGMOID_SHAPES)
        shapes = sorted({shape for table in tables for group in table.values() for shape in group})
    return [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bm, bk, w, s in shapes]


def shape_group(dtype: torch.dtype, input_precision: str, table: dict) -> str:
    """The key of `table` for features of `dtype` at this tl.dot input precision."""
    if dtype != torch.float32:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        return name if name in table else "half"
    return "tf32" if input_precision.startswith("tf32") else "fp32"


def _prune_for(table: dict, epilogue_tables: dict | None = None):
    def prune(configs, named_args, **kwargs):
        """Keep the shapes meant for this kernel, epilogue and feature type (the autotuner times only those)."""
        chosen = (epilogue_tables or {}).get(kwargs.get("EPILOGUE"), table)
        wanted = chosen[shape_group(named_args["x_ptr"].dtype, kwargs.get("INPUT_PRECISION", ""), chosen)]
        keep = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps,
                                       c.num_stages) in wanted]
        if os.environ.get("MMCL_FAST_TRITON_AUTOTUNE", "1") == "0":  # pinned: bit-identical across processes
            keep = keep[:1]
        return keep or configs[:1]
    return prune


# The partial-reduction buffers of the backward are laid out in slots of this many rows/columns, the smallest
# tile side among the configs, so their size does not depend on which config the autotuner picks.
_SLOT = 16 if interpreting() else 32


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _similarity_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """<x_i, y_j> for a BLOCK_N x BLOCK_M tile, fp32 accumulation over D in BLOCK_K chunks (edges masked)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_x + offs_k[None, :]
    y_ptrs = y_ptr + cols[:, None] * stride_y + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + offs_k) < D
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        y_ptrs += BLOCK_K
    return acc


@triton.autotune(configs=_tile_configs(), key=["D", "N_CLASS", "M_CLASS", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_for(_FORWARD_SHAPES)})
@triton.jit
def _lse_partials_kernel(x_ptr, y_ptr, scale_ptr, row_bias_ptr, col_bias_ptr,
                         row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr,
                         N, M, D, stride_x, stride_y, N_CLASS, M_CLASS,
                         NEED_ROW: tl.constexpr, NEED_COL: tl.constexpr, UPCAST: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (r, c): running (max, sum exp(L - max)) for its rows over its columns and vice versa.

    Writes row partials to slot c of (C, N) buffers and column partials to slot r of (R, M) buffers. Every
    slot is written on every launch (empty splits write max=-inf, sum=0), so the kernel is idempotent, which
    autotuning relies on.
    """
    split_r = tl.program_id(0)
    split_c = tl.program_id(1)
    num_r = tl.num_programs(0)
    num_c = tl.num_programs(1)
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    num_col_tiles = tl.cdiv(M, BLOCK_M)
    tiles_per_split = tl.cdiv(num_col_tiles, num_c)
    tile_lo = split_c * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_col_tiles)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)

    for row_block in range(split_r, num_row_blocks, num_r):
        rows = (row_block * BLOCK_N + offs_n).to(tl.int64)
        row_ok = rows < N
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        row_bias = tl.load(row_bias_ptr + rows, mask=row_ok, other=0.0)
        row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_N,), tl.float32)
        for tile in range(tile_lo, tile_hi):
            cols = (tile * BLOCK_M + offs_m).to(tl.int64)
            col_ok = cols < M
            sim = _similarity_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
                                   BLOCK_N, BLOCK_M, BLOCK_K, UPCAST, INPUT_PRECISION)
            col_bias = tl.load(col_bias_ptr + cols, mask=col_ok, other=0.0)
            logit = sim * scale[:, None] + (row_bias[:, None] + col_bias[None, :])
            logit = tl.where(row_ok[:, None] & col_ok[None, :], logit, float("-inf"))
            if NEED_ROW:
                new_max = tl.maximum(row_max, tl.max(logit, axis=1))
                # A row with no valid entry yet keeps max=-inf; shift by 0 there so that exp2 gives 0, not NaN.
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                # exp(v) as exp2(v log2 e) of the small shifted value: the big logits cancel before scaling
                row_sum = (row_sum * tl.exp2((row_max - shift) * _LOG2E)
                           + tl.sum(tl.exp2((logit - shift[:, None]) * _LOG2E), axis=1))
                row_max = new_max
            if NEED_COL:
                tile_max = tl.max(logit, axis=0)
                tile_shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
                tile_sum = tl.sum(tl.exp2((logit - tile_shift[None, :]) * _LOG2E), axis=0)
                slot = split_r.to(tl.int64) * M + cols
                if row_block != split_r:  # not this program's first row block: merge with its slot
                    # the slot was stored in the previous row block's register layout by other threads of this
                    # program: make those stores visible before reading them back in this layout
                    tl.debug_barrier()
                    prev_max = tl.load(col_max_ptr + slot, mask=col_ok, other=float("-inf"))
                    prev_sum = tl.load(col_sum_ptr + slot, mask=col_ok, other=0.0)
                    merged_max = tl.maximum(prev_max, tile_max)
                    merged_shift = tl.where(merged_max == float("-inf"), 0.0, merged_max)
                    tile_sum = (prev_sum * tl.exp2((prev_max - merged_shift) * _LOG2E)
                                + tile_sum * tl.exp2((tile_max - merged_shift) * _LOG2E))
                    tile_max = merged_max
                tl.store(col_max_ptr + slot, tile_max, mask=col_ok)
                tl.store(col_sum_ptr + slot, tile_sum, mask=col_ok)
        if NEED_ROW:
            tl.store(row_max_ptr + split_c.to(tl.int64) * N + rows, row_max, mask=row_ok)
            tl.store(row_sum_ptr + split_c.to(tl.int64) * N + rows, row_sum, mask=row_ok)

    if NEED_COL:
        if split_r >= num_row_blocks:  # a split with no row block still owns its slot: mark it empty
            for tile in range(tile_lo, tile_hi):
                cols = (tile * BLOCK_M + offs_m).to(tl.int64)
                col_ok = cols < M
                slot = split_r.to(tl.int64) * M + cols
                tl.store(col_max_ptr + slot, tl.full((BLOCK_M,), float("-inf"), tl.float32), mask=col_ok)
                tl.store(col_sum_ptr + slot, tl.zeros((BLOCK_M,), tl.float32), mask=col_ok)
    if NEED_ROW:
        if tile_lo >= tile_hi:
            for row_block in range(split_r, num_row_blocks, num_r):
                rows = (row_block * BLOCK_N + offs_n).to(tl.int64)
                row_ok = rows < N
                slot = split_c.to(tl.int64) * N + rows
                tl.store(row_max_ptr + slot, tl.full((BLOCK_N,), float("-inf"), tl.float32), mask=row_ok)
                tl.store(row_sum_ptr + slot, tl.zeros((BLOCK_N,), tl.float32), mask=row_ok)


@triton.jit
def _lse_epilogue(sim, scale, row_bias, col_bias, rows, cols, row_ok, col_ok,
                  row_lse_ptr, col_lse_ptr, grad_row_ptr, grad_col_ptr, row_const_ptr, col_const_ptr,
                  row_target_ptr, row_target_grad_ptr, col_target_ptr, col_target_grad_ptr,
                  HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_ROW_CONST: tl.constexpr,
                  HAS_COL_CONST: tl.constexpr, HAS_ROW_TARGET: tl.constexpr, HAS_COL_TARGET: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Gradient weights of a linear function of the row / column LSEs plus the folded linear terms (fp32)."""
    # L - lse as one fma of the exact product a_i <x_i,y_j> with the bias-minus-lse term: the large parts cancel
    # inside the fma, so exp(L - lse) carries about one rounding of |L| instead of four.
    grad = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if HAS_ROW:
        row_lse = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)
        grad_row = tl.load(grad_row_ptr + rows, mask=row_ok, other=0.0)
        shifted = tl.fma(sim, scale[:, None], (row_bias - row_lse)[:, None] + col_bias[None, :])
        grad += grad_row[:, None] * tl.exp2(shifted * _LOG2E)
    if HAS_COL:
        col_lse = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0)
        grad_col = tl.load(grad_col_ptr + cols, mask=col_ok, other=0.0)
        shifted = tl.fma(sim, scale[:, None], row_bias[:, None] + (col_bias - col_lse)[None, :])
        grad += grad_col[None, :] * tl.exp2(shifted * _LOG2E)
    # Linear terms of the loss (label smoothing, positives) folded in, so that the feature gradients come out
    # of one fp32 accumulation and are rounded once.
    if HAS_ROW_CONST:
        grad += tl.load(row_const_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_COL_CONST:
        grad += tl.load(col_const_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_ROW_TARGET:
        target = tl.load(row_target_ptr + rows, mask=row_ok, other=-1)
        target_grad = tl.load(row_target_grad_ptr + rows, mask=row_ok, other=0.0)
        grad += tl.where(cols[None, :] == target[:, None], target_grad[:, None], 0.0)
    if HAS_COL_TARGET:
        target = tl.load(col_target_ptr + cols, mask=col_ok, other=-1)
        target_grad = tl.load(col_target_grad_ptr + cols, mask=col_ok, other=0.0)
        grad += tl.where(rows[:, None] == target[None, :], target_grad[None, :], 0.0)
    return grad


@triton.jit
def _log1p_unit(e):
    """log1p(e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, odd series to s^17 (relative error < 2e-9;
    exact for tiny e, where log(1 + e) would round 1 + e)."""
    s = e / (2.0 + e)
    t = s * s
    poly = 1.0 / 17.0
    poly = poly * t + 1.0 / 15.0
    poly = poly * t + 1.0 / 13.0
    poly = poly * t + 1.0 / 11.0
    poly = poly * t + 1.0 / 9.0
    poly = poly * t + 1.0 / 7.0
    poly = poly * t + 1.0 / 5.0
    poly = poly * t + 1.0 / 3.0
    poly = poly * t + 1.0
    return 2.0 * s * poly


@triton.jit
def _sigmoid_epilogue(sim, scale, row_bias, col_bias, rows, cols, row_ok, pos_ptr, POS_WIDTH):
    """(G, loss terms) of the sigmoid loss: u = -z L, softplus(u) = max(u, 0) + log1p(e) and
    G = -z sigmoid(u) = -z (u >= 0 ? 1 / (1 + e) : e / (1 + e)) with e = exp(-|u|): no overflow, no cancellation."""
    logit = tl.fma(sim, scale[:, None], row_bias[:, None] + col_bias[None, :])
    positive = tl.zeros(logit.shape, dtype=tl.int1)
    for k in range(POS_WIDTH):
        col_k = tl.load(pos_ptr + rows * POS_WIDTH + k, mask=row_ok, other=-1)
        positive = positive | (cols[None, :] == col_k[:, None])
    sign = tl.where(positive, -1.0, 1.0)
    u = sign * logit
    e = tl.exp2(-tl.abs(u) * _LOG2E)
    loss_terms = tl.maximum(u, 0.0) + _log1p_unit(e)
    inv = 1.0 / (1.0 + e)
    grad = sign * tl.where(u >= 0.0, inv, e * inv)
    return grad, loss_terms


@triton.autotune(configs=_tile_configs(), key=["D", "N_CLASS", "M_CLASS", "INPUT_PRECISION", "EPILOGUE", "GRADS"],
                 prune_configs_by={"early_config_prune": _prune_for(_GRAD_SHAPES, {1: _SIGMOID_SHAPES})})
@triton.jit
def _grad_tile_kernel(x_ptr, y_ptr, scale_ptr, row_bias_ptr, col_bias_ptr,
                      row_lse_ptr, col_lse_ptr, grad_row_ptr, grad_col_ptr,
                      row_const_ptr, col_const_ptr, row_target_ptr, row_target_grad_ptr,
                      col_target_ptr, col_target_grad_ptr, pos_ptr, POS_WIDTH,
                      g_ptr, row_part_ptr, col_part_ptr,
                      row0, col0, n_rows, n_cols, D, stride_x, stride_y, g_scale_ptr,
                      CHUNK_N, CHUNK_M, G_STRIDE, row_slots, col_slots, N_CLASS, M_CLASS,
                      EPILOGUE: tl.constexpr, GRADS: tl.constexpr,
                      HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_ROW_CONST: tl.constexpr,
                      HAS_COL_CONST: tl.constexpr, HAS_ROW_TARGET: tl.constexpr, HAS_COL_TARGET: tl.constexpr,
                      UPCAST: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, SLOT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of the chunk [row0, row0 + n_rows) x [col0, col0 + n_cols) of the shared sweep: the similarity
    tile is computed once and handed to an epilogue that returns the gradient weights G (and loss terms).

    EPILOGUE == 0 (LSE, `_lse_epilogue`): G_ij = grad_row_i exp(L_ij - row_lse_i) + grad_col_j exp(L_ij - col_lse_j)
    + row_const_i + col_const_j + row_target_grad_i [j = row_target_i] + col_target_grad_j [i = col_target_j].
    EPILOGUE == 1 (sigmoid, `_sigmoid_epilogue`): G_ij = -z_ij sigmoid(-z_ij L_ij) and the loss terms
    softplus(-z_ij L_ij), z = +1 where j is one of row i's POS_WIDTH positive columns (pos_ptr, -1 padded).

    With GRADS, stores g_scale * a_i * G_ij into the (CHUNK_N, CHUNK_M) staging buffer and the tile's partial sums
    sum_j G_ij <x_i,y_j>, sum_j G_ij (row_part[0/1, column slot, i]) and sum_i G_ij (col_part[row slot, j]); the
    sigmoid epilogue also writes sum_j softplus (row_part[2, column slot, i]). A tile wider than one slot writes its
    sum to its first slot and zeros to the others.
    """
    tile_n = tl.program_id(0)
    tile_m = tl.program_id(1)
    local_rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local_rows < n_rows
    col_ok = local_cols < n_cols
    rows = row0 + local_rows.to(tl.int64)
    cols = col0 + local_cols.to(tl.int64)
    sim = _similarity_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
                           BLOCK_N, BLOCK_M, BLOCK_K, UPCAST, INPUT_PRECISION)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    row_bias = tl.load(row_bias_ptr + rows, mask=row_ok, other=0.0)
    col_bias = tl.load(col_bias_ptr + cols, mask=col_ok, other=0.0)
    valid = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE == 0:
        grad = _lse_epilogue(sim, scale, row_bias, col_bias, rows, cols, row_ok, col_ok,
                             row_lse_ptr, col_lse_ptr, grad_row_ptr, grad_col_ptr, row_const_ptr, col_const_ptr,
                             row_target_ptr, row_target_grad_ptr, col_target_ptr, col_target_grad_ptr,
                             HAS_ROW, HAS_COL, HAS_ROW_CONST, HAS_COL_CONST, HAS_ROW_TARGET, HAS_COL_TARGET,
                             BLOCK_N, BLOCK_M)
    else:
        grad, loss_terms = _sigmoid_epilogue(sim, scale, row_bias, col_bias, rows, cols, row_ok, pos_ptr, POS_WIDTH)
        row_loss = tl.sum(tl.where(valid, loss_terms, 0.0), axis=1)
    # Padding lanes may hold inf * 0 = NaN: select, do not multiply.
    grad = tl.where(valid, grad, 0.0)

    # Partial reductions, written into slots so the buffer layout is independent of the tile shape.
    col_slot = tile_m * (BLOCK_M // SLOT) + tl.arange(0, BLOCK_M // SLOT)
    first_col_slot = (tl.arange(0, BLOCK_M // SLOT) == 0)[:, None]
    row_part_ptrs = row_part_ptr + col_slot.to(tl.int64)[:, None] * CHUNK_N + local_rows[None, :]
    row_part_mask = (col_slot < col_slots)[:, None] & row_ok[None, :]
    if EPILOGUE == 1:
        tl.store(row_part_ptrs + 2 * col_slots * CHUNK_N, tl.where(first_col_slot, row_loss[None, :], 0.0),
                 mask=row_part_mask)
    if GRADS:
        g_scale = tl.load(g_scale_ptr)
        g_ptrs = g_ptr + local_rows.to(tl.int64)[:, None] * G_STRIDE + local_cols[None, :]
        tl.store(g_ptrs, (grad * (scale * g_scale)[:, None]).to(g_ptr.dtype.element_ty), mask=valid)
        row_dscale = tl.sum(grad * sim, axis=1)
        row_dbias = tl.sum(grad, axis=1)
        col_dbias = tl.sum(grad, axis=0)
        tl.store(row_part_ptrs, tl.where(first_col_slot, row_dscale[None, :], 0.0), mask=row_part_mask)
        tl.store(row_part_ptrs + col_slots * CHUNK_N, tl.where(first_col_slot, row_dbias[None, :], 0.0),
                 mask=row_part_mask)
        row_slot = tile_n * (BLOCK_N // SLOT) + tl.arange(0, BLOCK_N // SLOT)
        first_row_slot = (tl.arange(0, BLOCK_N // SLOT) == 0)[:, None]
        col_part_ptrs = col_part_ptr + row_slot.to(tl.int64)[:, None] * CHUNK_M + local_cols[None, :]
        tl.store(col_part_ptrs, tl.where(first_row_slot, col_dbias[None, :], 0.0),
                 mask=(row_slot < row_slots)[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------

_MAX_SPLITS = 16  # R and C of the forward grid: R * C programs, (R + C) partials per row/column
_MIN_ROWS_PER_SPLIT = 8 if interpreting() else 64  # 8: the CPU tests also meet splits with no work


def _tf32_allowed() -> bool:
    """Has the caller allowed TF32 for fp32 matmuls on CUDA? Reads torch's newer `fp32_precision` first: once a
    user set it, reading the legacy `allow_tf32` raises ("mix of the legacy and new APIs")."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision not in (None, "none"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 features are full fp32 unless torch allows TF32, and then "tf32x3" (see the
    module docstring; MMCL_FAST_TRITON_TF32=1x: plain "tf32"). bf16/fp16 features ignore it."""
    if dtype != torch.float32:
        return "tf32"
    if interpreting() or not _tf32_allowed():
        return "ieee"
    return "tf32" if os.environ.get("MMCL_FAST_TRITON_TF32", "3x") == "1x" else "tf32x3"


_TUNED: set = set()  # (D, dtype, precision, need_row, need_col, device) already tuned on a corner


def _check_vector(t, name: str, length: int, device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")


def _check_problem(x, y, scale, row_bias, col_bias) -> None:
    check_features(x, "x", y, "y")
    for t, name in ((x, "x"), (y, "y")):
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the triton backend supports float32/bfloat16/float16 {name}, got {t.dtype}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along features, got strides {t.stride()}")
    n, m = x.shape[0], y.shape[0]
    _check_vector(scale, "scale", n, x.device)
    _check_vector(row_bias, "row_bias", n, x.device)
    _check_vector(col_bias, "col_bias", m, x.device)
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        raise ValueError(f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got x on {x.device}")


def _merge_partials(part_max: Tensor, part_sum: Tensor) -> Tensor:
    """LSE from (splits, L) partial (max, sum-of-exp(L - max)) pairs, merged in a fixed order."""
    top = part_max.max(dim=0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    total = (part_sum * torch.exp(part_max - top)).sum(dim=0)
    return top + torch.log(total)


def _on_device(t: Tensor):
    """Launch on `t`'s CUDA device, whatever the current device is (a no-op for CPU tensors: the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def lse_fwd(problem: Problem, need_row: bool, need_col: bool) -> tuple[Tensor, Tensor]:
    """(row_lse (N,), col_lse (M,)) in fp32; an unneeded side comes back empty. One GEMM-equivalent."""
    x, y, scale, row_bias, col_bias = problem.operands
    _check_problem(x, y, scale, row_bias, col_bias)
    with _on_device(x):
        return _lse_fwd(x, y, scale, row_bias, col_bias, need_row, need_col)


def _lse_fwd(x, y, scale, row_bias, col_bias, need_row, need_col):
    if not (need_row or need_col):
        raise ValueError("at least one of need_row / need_col must be True")
    tuning_key = (x.shape[1], x.dtype, _input_precision(x.dtype), need_row, need_col, x.device)
    if max(x.shape[0], y.shape[0]) > TUNING_SIDE and tuning_key not in _TUNED and not interpreting():
        # One sweep at N = 8M takes minutes: let the autotuner time its configs on a 64k x 64k corner (same
        # grid, same tiles) and reuse the winner, which the capped size class maps the full problem to.
        side_n, side_m = min(x.shape[0], TUNING_SIDE), min(y.shape[0], TUNING_SIDE)
        _launch_lse_partials(x[:side_n], y[:side_m], scale[:side_n], row_bias[:side_n], col_bias[:side_m],
                             need_row, need_col)
        _TUNED.add(tuning_key)
    return _launch_lse_partials(x, y, scale, row_bias, col_bias, need_row, need_col)


def _forward_grid(n: int, m: int, device: torch.device) -> tuple[int, int]:
    """(R, C) programs of the forward: up to _MAX_SPLITS each way, and on a GPU a whole number of waves over its
    SMs (each program sweeps a large block of tiles, so a partial last wave would idle most SMs for a whole
    program's time: 256 programs on a 108-SM A100 take 3 waves, 208 take 2)."""
    splits_r = min(_MAX_SPLITS, triton.cdiv(n, _MIN_ROWS_PER_SPLIT))
    splits_c = min(_MAX_SPLITS, triton.cdiv(m, _MIN_ROWS_PER_SPLIT))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        waves = (splits_r * splits_c) // sms
        if waves >= 1:
            splits_c = max(1, min(splits_c, waves * sms // splits_r))
    return splits_r, splits_c


def _launch_lse_partials(x, y, scale, row_bias, col_bias, need_row, need_col):
    n, d = x.shape
    m = y.shape[0]
    splits_r, splits_c = _forward_grid(n, m, x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    row_max = torch.empty((splits_c, n) if need_row else (1,), **f32)
    row_sum = torch.empty_like(row_max)
    col_max = torch.empty((splits_r, m) if need_col else (1,), **f32)
    col_sum = torch.empty_like(col_max)
    _lse_partials_kernel[(splits_r, splits_c)](
        x, y, scale, row_bias, col_bias, row_max, row_sum, col_max, col_sum,
        n, m, d, x.stride(0), y.stride(0), size_class(n), size_class(m),
        NEED_ROW=need_row, NEED_COL=need_col, UPCAST=interpreting() and x.dtype != torch.float32,
        INPUT_PRECISION=_input_precision(x.dtype))
    empty = torch.empty(0, **f32)
    row_lse = _merge_partials(row_max, row_sum) if need_row else empty
    col_lse = _merge_partials(col_max, col_sum) if need_col else empty.clone()
    return row_lse, col_lse


def _chunk_shape(n: int, m: int, element_size: int) -> tuple[int, int]:
    """Rows x columns of the staged G chunk: at most MMCL_FAST_TRITON_CHUNK_MB MiB (default 128), square when
    both sides are long (GEMMs with long K both ways), the whole of a short side otherwise."""
    budget = float(os.environ.get("MMCL_FAST_TRITON_CHUNK_MB", "128")) * 2**20
    elements = max(int(budget // element_size), 1)
    align = 1 if interpreting() else 256

    def fit(length: int) -> int:  # the longest side <= elements // length, in whole alignment units
        return max(align, elements // length // align * align)

    side = max(align, math.isqrt(elements) // align * align)
    if n <= side:
        return n, min(m, fit(n))
    if m <= side:
        return min(n, fit(m)), m
    return side, side


def _pow2_below(bound: Tensor, top: int) -> Tensor:
    """2^(top - ceil(log2 bound)) as a 0-d device tensor (1 where bound is 0 or not finite): the power of two
    that maps [0, bound] into [0, 2^top]. Computed on the device, so no host sync."""
    ok = torch.isfinite(bound) & (bound > 0)
    safe = torch.where(ok, bound, torch.ones_like(bound))
    exponent = torch.clamp(top - torch.ceil(torch.log2(safe)), -60, 60)  # keep products of two shifts finite
    return torch.where(ok, torch.exp2(exponent), torch.ones_like(bound))


def _abs_max(t: Tensor) -> Tensor:
    """max |t| as a 0-d fp32 device tensor, without an |t|-sized temporary."""
    low, high = torch.aminmax(t)
    return torch.maximum(low.abs(), high.abs()).float()


def _g_scale(scale: Tensor, terms: list[Tensor]) -> Tensor:
    """Power of two that lifts fp16-staged G into fp16's normal range: |a_i G_ij| <= max|a| * sum max|term|."""
    bound = scale.abs().amax() * sum((t.abs().amax() for t in terms), torch.zeros((), device=scale.device))
    return _pow2_below(bound, 14)


def _optional(t, name: str, length: int, device, dtype=torch.float32):
    """(tensor, present): an absent vector (None or empty) is replaced by a 1-element dummy the kernel never reads."""
    if t is None or t.numel() == 0:
        return torch.zeros(1, dtype=dtype, device=device), False
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) (or be empty), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")
    return t.contiguous(), True


def lse_bwd(problem: Problem, row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor, *,
            grad_dtype=None, out=None, in_place=False):
    """(dx, dy, dscale, drow_bias, dcol_bias) for the gradient weights G of docs/design.md#gradient-weights (see
    `_grad_tile_kernel`).

    `problem.extras` (see `_problem.Extras`): row_const, col_const, row_target + row_target_grad, col_target +
    col_target_grad, the linear terms folded into G; an empty LSE or LSE gradient means absent. dx / dy come in
    `grad_dtype` (default: the features' dtype; float32 keeps the partial gradients of a cross-rank sum unrounded).
    Three GEMM-equivalents: the recompute of each tile of X Y^T (with da, dr, dc reduced from it), then
    dX += G Y and dY += G^T X over each staged chunk of G.
    """
    x, y, scale, row_bias, col_bias = problem.operands
    _check_problem(x, y, scale, row_bias, col_bias)
    with _on_device(x):
        dx, dy, dscale, drow, dcol = _lse_bwd(x, y, scale, row_bias, col_bias, row_lse, col_lse, grad_row, grad_col,
                                              problem.extra_terms(),
                                              out[0].dtype if out is not None else (grad_dtype or x.dtype))
    return (*add_into(out, dx, dy), dscale, drow, dcol)


def _lse_bwd(x, y, scale, row_bias, col_bias, row_lse, col_lse, grad_row, grad_col, terms, grad_dtype):
    n, d = x.shape
    m = y.shape[0]
    device = x.device
    row_lse, has_row_lse = _optional(row_lse, "row_lse", n, device)
    col_lse, has_col_lse = _optional(col_lse, "col_lse", m, device)
    grad_row, has_grad_row = _optional(grad_row, "grad_row", n, device)
    grad_col, has_grad_col = _optional(grad_col, "grad_col", m, device)
    has_row, has_col = has_row_lse and has_grad_row, has_col_lse and has_grad_col
    get = terms.get
    row_const, has_row_const = _optional(get("row_const"), "row_const", n, device)
    col_const, has_col_const = _optional(get("col_const"), "col_const", m, device)
    row_target, has_row_target = _optional(get("row_target"), "row_target", n, device, torch.int64)
    row_target_grad, has_row_target_grad = _optional(get("row_target_grad"), "row_target_grad", n, device)
    col_target, has_col_target = _optional(get("col_target"), "col_target", m, device, torch.int64)
    col_target_grad, has_col_target_grad = _optional(get("col_target_grad"), "col_target_grad", m, device)
    bound_terms = [t for t, present in (
        (grad_row, has_row), (grad_col, has_col), (row_const, has_row_const), (col_const, has_col_const),
        (row_target_grad, has_row_target), (col_target_grad, has_col_target)) if present]
    no_positives = torch.zeros(1, dtype=torch.int64, device=device)
    epilogue = _Epilogue(
        kind=0, pointers=(row_lse, col_lse, grad_row, grad_col, row_const, col_const, row_target, row_target_grad,
                          col_target, col_target_grad, no_positives, 0),
        flags=dict(HAS_ROW=has_row, HAS_COL=has_col, HAS_ROW_CONST=has_row_const, HAS_COL_CONST=has_col_const,
                   HAS_ROW_TARGET=has_row_target, HAS_COL_TARGET=has_col_target),
        g_bound=bound_terms)
    dx, dy, dscale, drow, dcol, _ = _sweep(x, y, scale, row_bias, col_bias, epilogue, grads=True, grad_dtype=grad_dtype)
    return dx, dy, dscale, drow, dcol


def sigmoid_loss(problem: Problem, need_grad: bool, *, out=None, in_place=False):
    """(row_loss (N,), Gradients in fp32 or None) of the sigmoid loss (see `_sigmoid_epilogue`), one fused sweep.

    problem.pos_cols: (N, K) int64 positive columns per row (-1 padded). 3 GEMM-equivalents with gradients (the
    similarity tile, then dX += G Y and dY += G^T X over each staged chunk of G), 1 without."""
    x, y, scale, row_bias, col_bias = problem.operands
    pos_cols = problem.pos_cols
    _check_problem(x, y, scale, row_bias, col_bias)
    n = x.shape[0]
    if pos_cols.dtype != torch.int64 or pos_cols.dim() != 2 or pos_cols.shape[0] != n:
        raise ValueError(f"pos_cols must be an ({n}, K) int64 tensor, got {pos_cols.dtype} {tuple(pos_cols.shape)}")
    if pos_cols.device != x.device:
        raise ValueError(f"pos_cols is on {pos_cols.device} but the features are on {x.device}")
    with _on_device(x):
        dummy = torch.zeros(1, dtype=torch.float32, device=x.device)
        dummy_index = torch.zeros(1, dtype=torch.int64, device=x.device)
        epilogue = _Epilogue(
            kind=1, pointers=(dummy,) * 6 + (dummy_index, dummy, dummy_index, dummy, pos_cols.contiguous(),
                                              pos_cols.shape[1]),
            flags=dict(HAS_ROW=False, HAS_COL=False, HAS_ROW_CONST=False, HAS_COL_CONST=False, HAS_ROW_TARGET=False,
                       HAS_COL_TARGET=False),
            g_bound=[torch.ones(1, device=x.device)])  # |G| <= 1
        dx, dy, dscale, drow, dcol, row_loss = _sweep(x, y, scale, row_bias, col_bias, epilogue, grads=need_grad,
                                                      grad_dtype=torch.float32)
    if not need_grad:
        return row_loss, None
    return row_loss, Gradients(*add_into(out, dx, dy), dscale, drow, dcol)


class _Epilogue(NamedTuple):
    """What the shared sweep's tile kernel runs on each similarity tile: `kind` (0 LSE, 1 sigmoid), its pointer
    arguments in kernel order (dummies where absent), its constexpr flags, and bounds of its G terms (for the
    fp16 staging scale)."""

    kind: int
    pointers: tuple
    flags: dict
    g_bound: list


def _sweep(x, y, scale, row_bias, col_bias, epilogue: _Epilogue, *, grads: bool, grad_dtype: torch.dtype):
    """The shared chunked sweep: the tile kernel over every chunk of the N x M matrix, then (grads) dX += G Y and
    dY += G^T X over each staged chunk. Returns (dx, dy, dscale, drow, dcol, row_loss); what was not computed is
    None (gradients without `grads`, row_loss for the LSE epilogue)."""
    n, d = x.shape
    m = y.shape[0]
    device = x.device
    f32 = dict(dtype=torch.float32, device=device)

    # G is staged in fp16 for fp16 *and* bf16 features: bf16's 8-bit significand would add up to 2^-8 relative
    # error per term before the sum, fp16's 11 bits add 2^-11. A power of two keeps it in fp16's range.
    g_dtype = torch.float32 if x.dtype == torch.float32 else torch.float16
    one = torch.ones((), **f32)
    g_scale = _g_scale(scale, epilogue.g_bound) if g_dtype == torch.float16 else one
    chunk_n, chunk_m = _chunk_shape(n, m, torch.finfo(g_dtype).bits // 8)
    row_chunks = list(range(0, n, chunk_n))
    col_chunks = list(range(0, m, chunk_m))
    # G's row stride is padded to a multiple of 16 elements: Triton then specialises the kernels on an aligned
    # stride (16-byte vector loads and stores, wgmma-friendly) whatever M is
    g_stride = -(-chunk_m // 16) * 16
    staged = torch.empty((chunk_n, g_stride) if grads else (1, 16), dtype=g_dtype, device=x.device)
    row_slots, col_slots = triton.cdiv(chunk_n, _SLOT), triton.cdiv(chunk_m, _SLOT)
    row_part = torch.empty((3, col_slots, chunk_n), **f32)
    col_part = torch.empty((row_slots, chunk_m), **f32)
    with_loss = epilogue.kind == 1
    row_loss = torch.empty(n, **f32) if with_loss else None

    dx = dy = dx_acc = dy_acc = dscale = drow = dcol = None
    if grads:
        dx = torch.empty(x.shape, dtype=grad_dtype, device=device)
        dy = torch.empty(y.shape, dtype=grad_dtype, device=device)
        # dX rows are finished chunk by chunk (inner loop over columns): with one column chunk each row chunk's
        # GEMM writes its own rows of dx directly, otherwise it accumulates in fp32 and is copied out. dY
        # accumulates over row chunks in fp32 unless one row chunk covers all of N.
        dx_acc = None if len(col_chunks) == 1 else torch.empty((min(chunk_n, n), d), **f32)
        dy_acc = dy if len(row_chunks) == 1 else torch.empty((m, d), **f32)
        dscale = torch.empty(n, **f32)
        drow = torch.empty(n, **f32)
        dcol = torch.empty(m, **f32)
    precision = _input_precision(x.dtype)
    upcast = interpreting() and x.dtype != torch.float32
    # bf16 features meet the fp16 G through an fp16 copy of the chunk's rows, shifted by a power of two into
    # fp16's range (exact down to 2^-31 of the largest entry): O((chunk_n + chunk_m) D) scratch, and the GEMMs
    # see one operand type.
    to_fp16 = grads and x.dtype == torch.bfloat16
    x_shift = _pow2_below(_abs_max(x), 14) if to_fp16 else one
    y_shift = _pow2_below(_abs_max(y), 14) if to_fp16 else one
    x16 = torch.empty((chunk_n, d), dtype=torch.float16, device=device) if to_fp16 else None
    y16 = torch.empty((chunk_m, d), dtype=torch.float16, device=device) if to_fp16 else None
    dx_alpha = (1.0 / (g_scale * y_shift)).reshape(1)
    dy_alpha = (1.0 / (g_scale * x_shift)).reshape(1)

    for ci, row0 in enumerate(row_chunks):
        n_rows = min(chunk_n, n - row0)
        rows = slice(row0, row0 + n_rows)
        x_rows = torch.mul(x[rows], x_shift, out=x16[:n_rows]) if to_fp16 else x[rows]
        for cj, col0 in enumerate(col_chunks):
            n_cols = min(chunk_m, m - col0)
            cols = slice(col0, col0 + n_cols)
            grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(n_cols, meta["BLOCK_M"]))
            _grad_tile_kernel[grid](
                x, y, scale, row_bias, col_bias, *epilogue.pointers,
                staged, row_part, col_part, row0, col0, n_rows, n_cols, d, x.stride(0), y.stride(0), g_scale,
                chunk_n, chunk_m, g_stride, row_slots, col_slots, size_class(n_rows), size_class(n_cols),
                EPILOGUE=epilogue.kind, GRADS=grads, **epilogue.flags, UPCAST=upcast, INPUT_PRECISION=precision,
                SLOT=_SLOT)
            used_row_slots, used_col_slots = triton.cdiv(n_rows, _SLOT), triton.cdiv(n_cols, _SLOT)
            if with_loss:
                part_loss = row_part[2, :used_col_slots, :n_rows].sum(dim=0)
                if cj == 0:
                    row_loss[rows] = part_loss
                else:
                    row_loss[rows] += part_loss
            if not grads:
                continue
            part_dscale = row_part[0, :used_col_slots, :n_rows].sum(dim=0)
            part_drow = row_part[1, :used_col_slots, :n_rows].sum(dim=0)
            part_dcol = col_part[:used_row_slots, :n_cols].sum(dim=0)
            if cj == 0:
                dscale[rows] = part_dscale
                drow[rows] = part_drow
            else:
                dscale[rows] += part_dscale
                drow[rows] += part_drow
            if ci == 0:
                dcol[cols] = part_dcol
            else:
                dcol[cols] += part_dcol
            y_cols = torch.mul(y[cols], y_shift, out=y16[:n_cols]) if to_fp16 else y[cols]
            g = staged[:n_rows, :n_cols]
            dx_out = dx[rows] if dx_acc is None else dx_acc[:n_rows]
            accumulate_matmul(dx_out, g, y_cols, dx_alpha, accumulate=cj > 0, input_precision=precision)
            accumulate_matmul(dy_acc[cols], g.t(), x_rows, dy_alpha, accumulate=ci > 0, input_precision=precision)
        if grads and dx_acc is not None:
            dx[rows] = dx_acc[:n_rows]
    if grads and dy_acc is not dy:
        dy.copy_(dy_acc)
    return dx, dy, dscale, drow, dcol, row_loss
