"""The backward's two GEMMs over a staged chunk of G: ``out (+)= alpha * A @ B``, fp32 accumulation.

A is a (ROWS, K) chunk of G, possibly a transposed view (dY = G^T X reads G column-major), B is (K, COLS) rows
of the features, out is either the fp32 accumulator or the final gradient (cast on store). Any ROWS, COLS, K
>= 1 (edges masked). Accumulation into `out` is a read-modify-write by the one program that owns each output
tile: deterministic, no atomics. Grouped tile order keeps a band of A in L2 across the output columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1 at import of triton)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def cast_for_store(value, ptr, ROUND_BF16: tl.constexpr):
    """value (fp32) cast to ptr's element type. ROUND_BF16 (interpreter only): round to nearest even by hand,
    since the interpreter's fp32 -> bf16 cast truncates; on a GPU the cast itself rounds to nearest."""
    if ROUND_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        value = bits.to(tl.float32, bitcast=True)
    return value.to(ptr.dtype.element_ty)


def _gemm_configs():
    if interpreting():
        return [triton.Config({"BLOCK_R": 16, "BLOCK_C": 32, "BLOCK_K": 16, "GROUP_R": 2}, num_warps=4,
                              num_stages=1)]
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
              (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]
    return [triton.Config({"BLOCK_R": br, "BLOCK_C": bc, "BLOCK_K": bk, "GROUP_R": 8}, num_warps=w, num_stages=s)
            for br, bc, bk, w, s in shapes]


@triton.autotune(configs=_gemm_configs(), key=["ROWS", "COLS", "K", "ACCUMULATE"], restore_value=["out_ptr"])
@triton.jit
def _accumulate_matmul_kernel(a_ptr, b_ptr, out_ptr, alpha, ROWS, COLS, K,
                              stride_ar, stride_ak, stride_bk, stride_bc, stride_or,
                              ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_R: tl.constexpr):
    pid = tl.program_id(0)
    tiles_r = tl.cdiv(ROWS, BLOCK_R)
    tiles_c = tl.cdiv(COLS, BLOCK_C)
    group_size = GROUP_R * tiles_c
    first_r = (pid // group_size) * GROUP_R
    rows_in_group = tl.minimum(tiles_r - first_r, GROUP_R)
    tile_r = first_r + (pid % group_size) % rows_in_group
    tile_c = (pid % group_size) // rows_in_group

    rows = (tile_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tile_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < ROWS
    col_ok = cols < COLS
    a_ptrs = a_ptr + rows[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + cols[None, :] * stride_bc
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = acc * alpha
    out_ptrs = out_ptr + rows[:, None] * stride_or + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, cast_for_store(acc, out_ptr, ROUND_BF16), mask=out_mask)


def accumulate_matmul(out: Tensor, a: Tensor, b: Tensor, *, alpha: float = 1.0, accumulate: bool = False,
                      input_precision: str = "ieee") -> None:
    """out = alpha * a @ b (accumulate=False) or out += alpha * a @ b (accumulate=True, fp32 `out`), in place.

    a: (ROWS, K) with any strides; b: (K, COLS) with unit stride along COLS; out: (ROWS, COLS), unit column
    stride. a and b share a dtype (fp32 / bf16 / fp16); accumulation is fp32.
    """
    rows, k = a.shape
    k_b, cols = b.shape
    if k != k_b or out.shape != (rows, cols):
        raise ValueError(f"shapes do not chain: out {tuple(out.shape)} = a {tuple(a.shape)} @ b {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if accumulate and out.dtype != torch.float32:
        raise TypeError(f"accumulating needs a float32 out, got {out.dtype}")
    if b.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("b and out need unit stride along their columns")
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]) * triton.cdiv(cols, meta["BLOCK_C"]),)
    _accumulate_matmul_kernel[grid](
        a, b, out, alpha, rows, cols, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        ACCUMULATE=accumulate, UPCAST=interpreting() and a.dtype != torch.float32,
        INPUT_PRECISION=input_precision, ROUND_BF16=interpreting() and out.dtype == torch.bfloat16)
