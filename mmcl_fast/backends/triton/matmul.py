"""The backward's two GEMMs over a staged chunk of G: ``out (+)= alpha * A @ B`` with fp32 accumulation.

A is a (ROWS, K) chunk of G, possibly a transposed view (dY = G^T X reads G column-major); B is (K, COLS) rows
of the features (or their fp16 copy, see `lse.lse_bwd`); out is the fp32 accumulator or the final gradient
(cast on store). alpha is a 1-element device tensor (the undoing of power-of-two range shifts), read on the
device so that nothing syncs with the host.

Two engines compute it: `_accumulate_matmul_kernel` (Triton, the default; any ROWS, COLS, K >= 1 with masked
edges; the read-modify-write of `out` is done by the one program owning each output tile, so it is
deterministic), and, with `MMCL_FAST_TRITON_GEMM=cublas` on CUDA, cuBLAS through
`torch.mm(..., out_dtype=torch.float32)` (fp16 operands, fp32 result) plus one fused multiply-add pass into
`out` (also deterministic). The benchmark times both.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1 at import of triton)."""
    return bool(triton.knobs.runtime.interpret)


TUNING_SIDE = 65536  # sizes above this share one autotuning class (and the forward tunes on a corner this big)


def size_class(n: int) -> int:
    """Autotuning key for a size: sizes within a factor of two share a config, and every size >= TUNING_SIDE shares
    the class of TUNING_SIDE itself, so a config tuned on a TUNING_SIDE corner is reused for any larger problem."""
    return min(max(n - 1, 1), TUNING_SIDE - 1).bit_length()


@triton.jit
def cast_for_store(value, ptr, ROUND_BF16: tl.constexpr):
    """value (fp32) cast to ptr's element type. ROUND_BF16 (interpreter only): round to nearest even by hand,
    since the interpreter's fp32 -> bf16 cast truncates; on a GPU the cast itself rounds to nearest."""
    if ROUND_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        value = bits.to(tl.float32, bitcast=True)
    return value.to(ptr.dtype.element_ty)


# (BLOCK_R, BLOCK_C, BLOCK_K, warps, stages). Every one compiles for sm_90 without register spills, for both
# layouts of A (`pytest --runslow -k hopper`; 128x256x64 and 128x64x64/4 stages spilled 200 and 56 bytes):
# 16-bit operands take wgmma tiles, fp32 in full precision runs on FMA units and wants small tiles.
_HALF_SHAPES = [(128, 128, 64, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)]
_FP32_SHAPES = [(64, 64, 32, 8, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3)]
_TF32_SHAPES = [(128, 128, 32, 8, 3), (64, 64, 32, 8, 3)]


def _gemm_configs():
    if interpreting():
        shapes = [(16, 32, 16, 4, 1)]
    else:
        shapes = sorted(set(_HALF_SHAPES + _FP32_SHAPES + _TF32_SHAPES))
    return [triton.Config({"BLOCK_R": br, "BLOCK_C": bc, "BLOCK_K": bk, "GROUP_R": 8}, num_warps=w, num_stages=s)
            for br, bc, bk, w, s in shapes]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Keep the shapes meant for this operand type (the autotuner times only those)."""
    if named_args["a_ptr"].dtype != torch.float32:
        wanted = _HALF_SHAPES
    else:
        wanted = _TF32_SHAPES if kwargs.get("INPUT_PRECISION", "").startswith("tf32") else _FP32_SHAPES
    keep = [c for c in configs if (c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_K"], c.num_warps,
                                   c.num_stages) in wanted]
    if os.environ.get("MMCL_FAST_TRITON_AUTOTUNE", "1") == "0":  # pinned: bit-identical across processes
        keep = keep[:1]
    return keep or configs[:1]


# Keyed on size classes (not exact sizes: a new batch size must not re-time every config), on the precision and
# on A's layout (G, or G^T for dY), which change the best tile.
@triton.autotune(configs=_gemm_configs(),
                 key=["R_CLASS", "C_CLASS", "K_CLASS", "A_K_CONTIGUOUS", "ACCUMULATE", "INPUT_PRECISION"],
                 restore_value=["out_ptr"], prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit
def _accumulate_matmul_kernel(a_ptr, b_ptr, out_ptr, alpha_ptr, ROWS, COLS, K,
                              stride_ar, stride_ak, stride_bk, stride_bc, stride_or,
                              R_CLASS, C_CLASS, K_CLASS, A_K_CONTIGUOUS,
                              ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr):
    pid = tl.program_id(0)
    tiles_r = tl.cdiv(ROWS, BLOCK_R)
    tiles_c = tl.cdiv(COLS, BLOCK_C)
    # Grouped order: GROUP_R row tiles sweep the output columns together, sharing their band of A in L2.
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
    acc = acc * tl.load(alpha_ptr)
    out_ptrs = out_ptr + rows[:, None] * stride_or + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, cast_for_store(acc, out_ptr, ROUND_BF16), mask=out_mask)


def _engine(device: torch.device) -> str:
    choice = os.environ.get("MMCL_FAST_TRITON_GEMM", "triton")
    if choice not in ("cublas", "triton"):
        raise ValueError(f"MMCL_FAST_TRITON_GEMM must be 'cublas' or 'triton', got {choice!r}")
    return choice if device.type == "cuda" else "triton"


def _cublas(out: Tensor, a: Tensor, b: Tensor, alpha: Tensor, accumulate: bool) -> bool:
    """out (+)= alpha * a @ b through cuBLAS with an fp32 result; False if this torch cannot (no mm.dtype)."""
    try:
        product = torch.mm(a, b) if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    if accumulate:
        torch.addcmul(out, product, alpha, out=out)
    else:
        torch.mul(product, alpha, out=out)
    return True


def accumulate_matmul(out: Tensor, a: Tensor, b: Tensor, alpha: Tensor, *, accumulate: bool = False,
                      input_precision: str = "ieee") -> None:
    """out = alpha * a @ b (accumulate=False) or out += alpha * a @ b (accumulate=True, fp32 `out`), in place.

    a: (ROWS, K), any strides; b: (K, COLS), unit stride along COLS; a and b share a dtype (fp32 or fp16);
    out: (ROWS, COLS) with unit column stride (fp32, or any float dtype when not accumulating);
    alpha: float32 (1,) tensor on the device.
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
    if _engine(out.device) == "cublas" and _cublas(out, a, b, alpha, accumulate):
        return
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]) * triton.cdiv(cols, meta["BLOCK_C"]),)  # noqa: E731
    _accumulate_matmul_kernel[grid](
        a, b, out, alpha, rows, cols, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        size_class(rows), size_class(cols), size_class(k), int(a.stride(1) == 1),
        ACCUMULATE=accumulate, UPCAST=interpreting() and a.dtype != torch.float32,
        INPUT_PRECISION=input_precision, ROUND_BF16=interpreting() and out.dtype == torch.bfloat16)
