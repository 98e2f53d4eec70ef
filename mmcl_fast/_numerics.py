"""The numerical conventions every layer shares (losses, the op registry, the backends, the cross-rank layer).

- `accumulation_dtype`: statistics (LSEs, sums) and gradient accumulators are float32 for float32 / bfloat16 /
  float16 features and float64 for float64 features: 16-bit inputs are read as they are, never accumulated in 16 bits.
- `batched_dot`: row-wise dot products in a given precision, as one batched matmul (no (N, D) product temporary).
"""
from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and gradients of features of `dtype` accumulate in (float64 for float64, else float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batched_dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """sum_d a[i, d] * b[i, d] in `acc`, as a batched (1 x D) @ (D x 1) matmul."""
    return torch.bmm(a.to(acc).unsqueeze(1), b.to(acc).unsqueeze(2)).reshape(-1)
