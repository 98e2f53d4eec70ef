"""mmcl_fast: exact, memory-efficient multimodal contrastive losses with fused CPU and Triton kernels."""
from . import distributed
from ._ops import affine_lse
from .losses.bridge import BrownianBridgeLoss, brownian_bridge_loss
from .losses.clip import ClipLoss, clip_loss
from .losses.geometry import GeometricConsistencyLoss, geometric_consistency_loss
from .losses.infonce import infonce
from .losses.separation import FeatureSeparationLoss, feature_separation_loss
from .losses.siglip import SigLipLoss, siglip_loss
from .losses.uniformity import UniformityLoss, uniformity_loss

__version__ = "0.1.0"

__all__ = ["ClipLoss", "affine_lse", "clip_loss", "infonce",
           "BrownianBridgeLoss", "brownian_bridge_loss", "GeometricConsistencyLoss", "geometric_consistency_loss",
           "FeatureSeparationLoss", "feature_separation_loss", "SigLipLoss", "siglip_loss", "UniformityLoss",
           "uniformity_loss"]
