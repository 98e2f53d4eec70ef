"""mmcl_fast: exact, memory-efficient multimodal contrastive losses with fused CPU and Triton kernels."""
from ._ops import affine_lse
from .losses.clip import ClipLoss, clip_loss
from .losses.infonce import infonce

__version__ = "0.1.0"

__all__ = ["ClipLoss", "affine_lse", "clip_loss", "infonce"]
