"""What the benchmark compares: every registered loss, each with its implementations and exact reference.

The registry and its shared pieces are in `registry.py`; each loss family registers itself from its module in
`cases/` (clip, siglip, and the latent-structure losses bridge, bridge_per_sample_t, uniformity, separation,
geometry). Adding a loss is one more module there that calls `register_loss`, and one import below.
"""
from __future__ import annotations

from .cases import clip, latent, siglip  # noqa: F401 - importing a case registers its losses
from .registry import (DTYPES, LOSSES, Impl, LossBench, Step, get_loss, grad_stepper, paired_features,  # noqa: F401
                       register_loss, split_rows, streamed_lse64)

# registration order is the order `--loss` lists the choices in: clip first (the default), then siglip
LOSS_ORDER = ("clip", "siglip", "bridge", "bridge_per_sample_t", "uniformity", "separation", "geometry")
LOSSES.update({name: LOSSES.pop(name) for name in LOSS_ORDER if name in LOSSES})
