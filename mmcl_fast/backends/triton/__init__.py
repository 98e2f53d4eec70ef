"""The `triton` backend of the streamed-LSE primitive: fused Triton kernels for CUDA tensors (and for CPU tensors
under the Triton interpreter, TRITON_INTERPRET=1). See `sweep.py` for the algorithm, GEMM count and memory bound."""
from .sweep import lse_bwd, lse_fwd, sigmoid_loss

__all__ = ["lse_bwd", "lse_fwd", "sigmoid_loss"]
