"""C-MCR (Wang et al., NeurIPS 2023; docs/design.md#cmcr): connect two contrastive spaces through the modality they
share, without paired data. `CMCRConnector` is the method, `semantic_enhance` its streamed memory retrieval,
`retrieval_metrics` and `modality_gap` score the result. The synthetic reproduction lives beside the library, in
studies/cmcr."""
from .connector import (CMCRConfig, CMCRConnector, FitConfig, Projector, cmcr_loss, inter_space_loss,
                        intra_space_loss, nearest_neighbour)
from .enhance import add_noise, semantic_enhance
from .evaluate import modality_gap, retrieval_metrics

__all__ = ["CMCRConfig", "CMCRConnector", "FitConfig", "Projector", "add_noise", "cmcr_loss", "inter_space_loss",
           "intra_space_loss", "modality_gap", "nearest_neighbour", "retrieval_metrics", "semantic_enhance"]
