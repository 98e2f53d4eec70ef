"""Large-batch contrastive training (SPEC §9): gradient-cached steps and the `mmcl-fast train` run."""
from .cached import grad_cached_step

__all__ = ["grad_cached_step"]
