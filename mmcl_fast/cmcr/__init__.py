"""C-MCR (Wang et al., NeurIPS 2023; SPEC §4): connect two contrastive spaces through the modality they share,
without paired data. `CMCRConnector` is the method; `mmcl-fast cmcr --help` runs the synthetic reproduction."""
from .connector import (CMCRConfig, CMCRConnector, FitConfig, Projector, cmcr_loss, inter_space_loss,
                        intra_space_loss, nearest_neighbour)
from .enhance import add_noise, semantic_enhance
from .evaluate import modality_gap, retrieval_metrics
from .world import ThreeModalityWorld, WorldConfig

__all__ = ["CMCRConfig", "CMCRConnector", "FitConfig", "Projector", "ThreeModalityWorld", "WorldConfig",
           "add_noise", "cmcr_loss", "inter_space_loss", "intra_space_loss", "modality_gap", "nearest_neighbour",
           "retrieval_metrics", "semantic_enhance"]
