"""The cross-rank layer: exact CLIP and SigLIP losses over `torch.distributed`, per-rank memory independent of W.

Each rank passes its local batch; the loss is the single-process loss of the batch concatenated across ranks, and
every gradient equals the single-process one (see each function's "Gradient semantics"). Nothing of size N_local x N
is ever formed. The pieces:

- `_checks.py`: one all-gather of sizes and configuration before any other collective, so that a mismatch (feature
  size, dtype, dist_impl, local_loss, backend, labels, logit_scale values, ...) raises the same error on every rank
  instead of hanging; with ``equal_batches=True`` it runs once per shape and configuration (no host sync after).
- `_transport.py`: how column blocks reach every rank (ring, broadcast, all-gather) and how their fp32
  accumulators get back to the owners.
- `clip.py`: CLIP / InfoNCE with labels and label smoothing (ring by default, or gather).
- `siglip.py`: SigLIP, its gradients computed in the forward sweep (bidir / shift rings, reduce, gather).
"""
from .clip import CLIP_DIST_IMPLS, DEFAULT_CLIP_DIST_IMPL, clip_loss
from .siglip import SIGLIP_DIST_IMPLS, siglip_loss

__all__ = ["CLIP_DIST_IMPLS", "DEFAULT_CLIP_DIST_IMPL", "SIGLIP_DIST_IMPLS", "clip_loss", "siglip_loss"]
