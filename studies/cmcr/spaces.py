"""The two pretrained contrastive spaces C-MCR connects: A–B (CLIP's role) and B–C (CLAP's role).

Each space is a pair of MLP encoders trained from scratch with mmcl_fast's fused CLIP loss on fresh paired
samples of the world, with a learnable logit scale (initial 1/0.07, capped at 100, as in CLIP).

The modality gap is part of the space's architecture. Modality m is embedded as

    e_m(x) = normalize( normalize(P f_m(x)) + c · u_m ),      c = `gap_offset` (0.7)

with u_first, u_second two fixed orthonormal directions and P the projection onto their orthogonal complement: the
content lies orthogonal to the offsets, and each modality sits on its own side of the sphere, shifted along its
own direction. That is the structure Liang et al. (2022) measured in CLIP (a constant offset between the
modalities, orthogonal to what the pairs share); c = 0.7 gives a centroid distance of about 0.82, close to
CLIP's. It is built in because these small encoders, trained from scratch, close their own gap: without the
offset the same training leaves a gap of 0.15-0.2 (and with a free offset added before the normalisation the
encoders learn to cancel it).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from mmcl_fast import clip_loss

from .world import MODALITIES, ThreeModalityWorld

MAX_LOGIT_SCALE = 100.0


@dataclass
class SpaceConfig:
    """Training of one contrastive space: encoder widths, steps, batch, Adam lr, initial temperature."""

    dim: int = 16
    hidden: tuple[int, ...] = (128, 128)
    steps: int = 2000
    batch: int = 1024
    lr: float = 2e-3
    init_temperature: float = 0.07
    gap_offset: float = 0.7
    backend: str = "auto"

    def __post_init__(self):
        for name in ("dim", "steps", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.batch < 2:
            raise ValueError(f"batch must be at least 2 (a contrastive loss needs negatives), got {self.batch}")
        for name in ("lr", "init_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.hidden = tuple(self.hidden)
        if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive int widths, got {self.hidden!r}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        return out


def make_encoder(n_in: int, n_out: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """MLP n_in → hidden... → n_out with ReLU; the space L2-normalises its output."""
    widths = [n_in, *hidden]
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], n_out))
    return nn.Sequential(*layers)


class ContrastiveSpace(nn.Module):
    """Two frozen encoders into one space: `encode(modality, x)` gives L2-normalised embeddings."""

    def __init__(self, modalities: tuple[str, str], n_in: int, cfg: SpaceConfig):
        super().__init__()
        if len(modalities) != 2 or not set(modalities) <= set(MODALITIES) or modalities[0] == modalities[1]:
            raise ValueError(f"modalities must be two distinct names from {MODALITIES}, got {modalities!r}")
        self.modalities = tuple(modalities)
        self.encoders = nn.ModuleDict({m: make_encoder(n_in, cfg.dim, cfg.hidden) for m in modalities})
        # Two orthonormal modality directions u_first, u_second (a random rotation's first two columns).
        generator = torch.Generator().manual_seed(cfg.dim)
        q, _ = torch.linalg.qr(torch.randn(cfg.dim, max(cfg.dim, 2), generator=generator, dtype=torch.float64))
        self.register_buffer("directions", q[:, :2].T.contiguous().float())
        self.gap_offset = cfg.gap_offset
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.history: list[tuple[int, float]] = []
        self.seconds = 0.0

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality not in self.modalities:
            raise ValueError(f"this space embeds {self.modalities}, not {modality!r}")
        content = self.encoders[modality](x)
        content = content - (content @ self.directions.T) @ self.directions  # orthogonal to both directions
        offset = self.gap_offset * self.directions[self.modalities.index(modality)]
        return nn.functional.normalize(nn.functional.normalize(content, dim=1) + offset, dim=1)


def train_space(world: ThreeModalityWorld, modalities: tuple[str, str], cfg: SpaceConfig, seed: int,
                on_step: Callable[[int, float], None] | None = None, log_every: int = 50) -> ContrastiveSpace:
    """Train one space on fresh paired samples (first, second) of `world`; returns it frozen, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        space = ContrastiveSpace(modalities, world.dim, cfg)
    optimizer = torch.optim.Adam(space.parameters(), lr=cfg.lr)
    data_gen = torch.Generator().manual_seed(seed + 1)
    first, second = modalities
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = world.sample(cfg.batch, data_gen)
        loss = clip_loss(space.encode(first, batch[first]), space.encode(second, batch[second]),
                         space.logit_scale, backend=cfg.backend)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logged = step % log_every == 0 or step == cfg.steps - 1
        value = float(loss.detach()) if logged else float("nan")
        if logged:
            space.history.append((step, value))
            if not math.isfinite(value):
                raise FloatingPointError(f"space {first}{second}: the loss became {value} at step {step}")
        if on_step is not None:
            on_step(step, value)
    space.seconds = time.perf_counter() - start
    space.eval()
    space.requires_grad_(False)
    return space
