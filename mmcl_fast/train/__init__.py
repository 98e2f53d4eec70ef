"""Large-batch contrastive training (docs/design.md#gradient-caching): `grad_cached_step` takes one optimizer step's
gradients at a batch bounded by the loss's O(N·D) memory, not by the encoders' activations. examples/digits shows it
training a small CLIP."""
from .cached import grad_cached_step

__all__ = ["grad_cached_step"]
