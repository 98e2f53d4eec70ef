"""C-MCR's semantic enhancement (docs/design.md#cmcr), streamed: no N x M buffer at any size.

Inter-modality enhancement replaces each query embedding (the shared modality, e.g. a caption in CLIP space) by a
softmax-weighted mix of a memory of the *other* modality's embeddings in the same space:

    enhanced_i = Σ_j softmax_j(<q_i, m_j> / τ) m_j,        τ = 0.01 (the paper's default)

This is attention with the memory as keys and values. Two streamed ways compute it:

- ``method="primitive"``: the row log-sum-exp comes from mmcl_fast's fused primitive (`affine_lse`, one sweep),
  then one value-weighted sweep over (row block x memory block) tiles accumulates exp(L_ij - lse_i) m_j. 2 N·M·D
  GEMM-equivalents (plus one for the LSE), memory O((N + M)·D + one tile). No autograd through it: C-MCR
  enhances frozen embeddings.
- ``method="sdpa"``: `torch.nn.functional.scaled_dot_product_attention` pinned to its flash kernel (online softmax
  over key blocks on CPU and CUDA; never the N x M math path). Differentiable.

Intra-modality enhancement adds Gaussian noise of variance 0.004 to each embedding and projects back onto the unit
sphere (`add_noise`): the projector then sees a small ball around each embedding rather than a point, which helps
it carry over from one modality's region of the sphere to the other's (the modality gap).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._numerics import accumulation_dtype
from .._ops import affine_lse
from .._validate import check_feature, check_features

MEMORY_TEMPERATURE = 0.01  # τ1 of the paper: the softmax over the memory
NOISE_VARIANCE = 0.004     # σ² of the paper's Gaussian noise injection
METHODS = ("primitive", "sdpa")
_TILE_ELEMENTS = 1 << 20   # one fp32 (row block x memory block) tile of the value sweep: 4 MiB


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def semantic_enhance(queries: Tensor, memory: Tensor, temperature: float = MEMORY_TEMPERATURE, *,
                     method: str = "primitive", backend: str = "auto") -> Tensor:
    """softmax(queries @ memory.T / temperature) @ memory, streamed (never an N x M matrix).

    Args:
        queries: (N, D) embeddings (normally L2-normalised), float32 / float64 (bf16 / fp16 for "sdpa").
        memory: (M, D) embeddings of the other modality in the same space, same dtype and device, M >= 1.
        temperature: softmax temperature τ1 (paper: 0.01).
        method: "primitive" (fused LSE + one value sweep, no autograd) or "sdpa" (flash attention, differentiable).
        backend: backend of the fused primitive for method="primitive" ("auto", "torch", "cpu", ...).

    Returns:
        (N, D) tensor in the queries' dtype. Not re-normalised: a mix of unit vectors is shorter than 1, and
        C-MCR re-normalises after the noise injection.
    """
    check_features(queries, "queries", memory, "memory")
    temperature = _check_temperature(temperature)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "sdpa":
        return _enhance_sdpa(queries, memory, temperature)
    if torch.is_grad_enabled() and (queries.requires_grad or memory.requires_grad):
        raise ValueError("semantic_enhance(method='primitive') does not backpropagate (it enhances frozen "
                         "embeddings); detach the inputs, run it under torch.no_grad(), or use method='sdpa'")
    return _enhance_primitive(queries, memory, 1.0 / temperature, backend)


def _enhance_sdpa(queries: Tensor, memory: Tensor, temperature: float) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Pinned to the streamed kernels (flash: CPU and CUDA bf16/fp16; memory-efficient: CUDA fp32): if neither can
    # run these inputs this raises, instead of falling back to the math kernel, which builds the N x M matrix.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = torch.nn.functional.scaled_dot_product_attention(
            queries[None, None], memory[None, None], memory[None, None], scale=1.0 / temperature)
    return out[0, 0]


@torch.no_grad()
def _enhance_primitive(queries: Tensor, memory: Tensor, scale: float, backend: str) -> Tensor:
    row_lse, _ = affine_lse(queries, memory, scale, need_row=True, need_col=False, backend=backend)
    acc = accumulation_dtype(queries.dtype)
    n, m = queries.shape[0], memory.shape[0]
    block_cols = min(m, 4096)
    block_rows = max(1, min(n, _TILE_ELEMENTS // block_cols))
    out = torch.empty(n, memory.shape[1], dtype=acc, device=queries.device)
    memory_acc = memory.to(acc)
    ones = torch.ones(block_cols, 1, dtype=acc, device=queries.device)
    for r0 in range(0, n, block_rows):
        q_blk = queries[r0:r0 + block_rows].to(acc)
        shift = row_lse[r0:r0 + block_rows].to(acc)[:, None]
        values = torch.zeros(q_blk.shape[0], memory.shape[1], dtype=acc, device=queries.device)
        total = torch.zeros(q_blk.shape[0], 1, dtype=acc, device=queries.device)
        for c0 in range(0, m, block_cols):
            m_blk = memory_acc[c0:c0 + block_cols]
            # The LSE is a safe shift (every weight <= 1, no overflow). The weights are summed again in this
            # sweep and divided out below: at τ = 0.01 the LSE is ~100, whose fp32 rounding (ulp 7.6e-6) would
            # otherwise scale every weight of the row by up to 4e-6.
            weights = torch.addmm(shift, q_blk, m_blk.T, beta=-1.0, alpha=scale).exp_()
            values.addmm_(weights, m_blk)
            total.addmm_(weights, ones[:m_blk.shape[0]])
        out[r0:r0 + block_rows] = values / total
    return out.to(queries.dtype)


def add_noise(embeddings: Tensor, variance: float = NOISE_VARIANCE, *, generator: torch.Generator | None = None
              ) -> Tensor:
    """normalize(e + ε), ε ~ N(0, variance · I): C-MCR's intra-modality enhancement (paper: variance 0.004)."""
    check_feature(embeddings, "embeddings")
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not math.isfinite(variance) \
            or variance < 0:
        raise ValueError(f"variance must be a non-negative finite number, got {variance!r}")
    if variance == 0:
        return torch.nn.functional.normalize(embeddings, dim=1)
    noise = torch.randn(embeddings.shape, generator=generator, dtype=embeddings.dtype, device=embeddings.device)
    return torch.nn.functional.normalize(embeddings + math.sqrt(variance) * noise, dim=1)
