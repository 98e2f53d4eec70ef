"""Contrastive training of the two encoders on fresh samples of the latent model (SPEC §5).

Each step draws a new batch (x, t), encodes it with MLPs f_x, f_t and minimises the symmetric squared-L2 InfoNCE

    L = ½ [CE_rows + CE_cols] over logits  -||f_x(x_i) - f_t(t_j)||² / τ,     τ = 1,

computed by mmcl_fast's streamed primitive (`mmcl_fast.infonce(..., similarity="sqeuclidean")`, no B x B buffer
outside backend="reference"), with Adam (optionally after a linear warm-up) and gradient-norm clipping (max norm
2, as in the paper's code).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..losses.infonce import infonce
from .data import LatentModel


@dataclass
class TrainConfig:
    """Optimisation settings. `hidden` lists the hidden widths as multiples of each encoder's input size."""

    steps: int = 100_000
    batch: int = 6144
    lr: float = 1e-4
    hidden: tuple[int, ...] = (10, 50, 50, 50, 50, 10)
    encoding_size: int | None = None  # default: |θ \ ρ|, the size of the invariant block (as in the paper)
    tau: float = 1.0
    grad_clip: float = 2.0
    warmup: int = 0  # linear lr warm-up steps (0: none, as in the paper)
    cosine_decay: bool = False  # False: constant lr after the warm-up, as in the paper
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.batch < 2:
            raise ValueError(f"batch must be at least 2 (a contrastive loss needs negatives), got {self.batch}")
        for name in ("lr", "tau", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        hidden = tuple(self.hidden)
        if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ValueError(f"hidden must be positive int width multipliers, got {self.hidden!r}")
        self.hidden = hidden
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {self.warmup!r}")
        if self.encoding_size is not None and (not isinstance(self.encoding_size, int) or self.encoding_size < 1):
            raise ValueError(f"encoding_size must be a positive int or None, got {self.encoding_size!r}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        return out


def make_encoder(n_in: int, n_out: int, hidden_multipliers: tuple[int, ...]) -> nn.Sequential:
    """MLP n_in → (k · n_in for k in hidden_multipliers) → n_out with LeakyReLU(0.01): the paper's encoder."""
    widths = [n_in] + [k * n_in for k in hidden_multipliers]
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.LeakyReLU(0.01)]
    layers.append(nn.Linear(widths[-1], n_out))
    return nn.Sequential(*layers)


@dataclass
class Encoders:
    f_x: nn.Module
    f_t: nn.Module
    history: list[tuple[int, float]]  # (step, loss) every `log_every` steps
    seconds: float


def contrastive_loss(z_x: torch.Tensor, z_t: torch.Tensor, tau: float, backend: str) -> torch.Tensor:
    """Symmetric InfoNCE over -||z_x_i - z_t_j||² / tau through the fused primitive."""
    return infonce(z_x, z_t, scale=1.0 / tau, similarity="sqeuclidean", symmetric=True, backend=backend)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    factor = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.cosine_decay:
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / cfg.steps)))
    return factor


def train_encoders(model: LatentModel, cfg: TrainConfig,
                   on_step: Callable[[int, float], None] | None = None, log_every: int = 50) -> Encoders:
    """Train f_x, f_t from scratch for `cfg.steps` steps; deterministic for `cfg.seed` on a given machine.

    `on_step(step, loss)` is called after every step (the loss is only synchronised every `log_every` steps and
    passed as NaN otherwise, so a GPU run does not stall on .item()).
    """
    encoding_size = cfg.encoding_size or len(model.bias.invariant)
    with torch.random.fork_rng(devices=[]):  # initialise from the seed without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        f_x = make_encoder(model.dim_x, encoding_size, cfg.hidden).to(model.device)
        f_t = make_encoder(model.dim_t, encoding_size, cfg.hidden).to(model.device)
    params = list(f_x.parameters()) + list(f_t.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    data_gen = torch.Generator(device=model.device).manual_seed(cfg.seed + 1)
    history: list[tuple[int, float]] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = model.sample(cfg.batch, data_gen)
        loss = contrastive_loss(f_x(batch.x), f_t(batch.t), cfg.tau, cfg.backend)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, max_norm=cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        logged = step % log_every == 0 or step == cfg.steps - 1
        value = float(loss.detach()) if logged else float("nan")
        if logged:
            history.append((step, value))
            if not math.isfinite(value):
                raise FloatingPointError(f"the contrastive loss became {value} at step {step}; lower the lr")
        if on_step is not None:
            on_step(step, value)
    f_x.eval()
    f_t.eval()
    return Encoders(f_x=f_x, f_t=f_t, history=history, seconds=time.perf_counter() - start)
