"""Contrastive training of the two encoders on fresh samples of the latent model (docs/design.md#misalignment).

Each step draws a new batch (x, t), encodes it with MLPs f_x, f_t (z_x = f_x(x), z_t = f_t(t)) and minimises one
of two squared-L2 objectives (τ = 1), both computed by mmcl_fast's streamed primitive (no B x B buffer outside
backend="reference"):

- objective="clip": the symmetric InfoNCE with in-batch cross-modal negatives,
      L = ½ [CE_rows + CE_cols] over logits  -||z_x_i - z_t_j||² / τ
  (`mmcl_fast.infonce(..., similarity="sqeuclidean")`): image i is told apart from the other texts of the batch;
- objective="lpsimclr": the LpSimCLR loss of the paper's code (p = 2, α = ½, positive kept in the denominator).
  A second fresh batch (x', t') supplies negatives of the anchor's own modality, and the positive sits inside a
  log-mean-exp over B + 1 terms:
      ℓ_x(i) = d_i / τ + log [ (exp(-d_i / τ) + Σ_j exp(-||z_x_i - z_x'_j||² / τ)) / (B + 1) ],
      d_i = ||z_x_i - z_t_i||²,
  and L = ½ [mean_i ℓ_x(i) + mean_i ℓ_t(i)] with ℓ_t built the same way from z_t, z_x and t'. The sum over j is
  `mmcl_fast.affine_lse` of the affine form -||a - b||² = 2<a, b> - ||a||² - ||b||²; the positive is joined with
  one logaddexp. Each step encodes two batches per encoder (twice the encoder work of "clip").

Adam (optionally after a linear warm-up) and gradient-norm clipping (max norm 2, as in the paper's code).

Initialisation: init="torch" keeps PyTorch's default nn.Linear init, as the paper's code does. Its weights have
variance 1/(3 fan_in), so every layer shrinks the signal (by ~6x after the LeakyReLU) and the initial
representation is tiny (covariance eigenvalues ~1e-4) and anisotropic. The encoders then leave that saddle
direction by direction, and in the quick preset a direction that starts last can stay collapsed for the whole run
(the invariant semantic it should carry is then only partly learned). init="kaiming" draws every weight from
N(0, 2 / (1 + 0.01²) / fan_in) (He init for LeakyReLU(0.01)) with zero biases, so the representation starts at unit
scale with all directions populated.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from mmcl_fast import affine_lse, infonce

from .data import LatentModel

OBJECTIVES = ("clip", "lpsimclr")
INITS = ("torch", "kaiming")


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
    objective: str = "clip"  # "clip" (in-batch cross-modal negatives) or "lpsimclr" (the paper code's loss)
    init: str = "torch"  # encoder weights: "torch" (PyTorch's default, as in the paper) or "kaiming" (He, zero bias)
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
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.encoding_size is not None and (not isinstance(self.encoding_size, int) or self.encoding_size < 1):
            raise ValueError(f"encoding_size must be a positive int or None, got {self.encoding_size!r}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        return out


ENCODER_SLOPE = 0.01


def make_encoder(n_in: int, n_out: int, hidden_multipliers: tuple[int, ...], init: str = "torch") -> nn.Sequential:
    """MLP n_in → (k · n_in for k in hidden_multipliers) → n_out with LeakyReLU(0.01): the paper's encoder.

    init="torch": PyTorch's default nn.Linear init (the paper's); "kaiming": every weight (the output layer's too)
    ~ N(0, 2 / (1 + 0.01²) / fan_in), biases zero. Draws from torch's global RNG.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    widths = [n_in] + [k * n_in for k in hidden_multipliers]
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.LeakyReLU(ENCODER_SLOPE)]
    layers.append(nn.Linear(widths[-1], n_out))
    if init == "kaiming":
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, a=ENCODER_SLOPE, mode="fan_in", nonlinearity="leaky_relu")
                nn.init.zeros_(layer.bias)
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


def _lpsimclr_direction(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float,
                        backend: str) -> torch.Tensor:
    """mean_i [d_i/τ + log-mean-exp({-d_i/τ} ∪ {-||anchor_i - negatives_j||²/τ}_j)], d_i = ||anchor_i - positive_i||²"""
    anchor_sq = (anchor * anchor).sum(1)
    negative_sq = (negatives * negatives).sum(1)
    negative_lse, _ = affine_lse(anchor, negatives, scale=2.0 / tau, row_bias=-anchor_sq / tau,
                                 col_bias=-negative_sq / tau, need_col=False, backend=backend)
    positive_dist = ((anchor - positive) ** 2).sum(1) / tau
    log_mean_exp = torch.logaddexp(negative_lse, -positive_dist) - math.log(negatives.shape[0] + 1)
    return (positive_dist + log_mean_exp).mean()


def lpsimclr_loss(z_x: torch.Tensor, z_t: torch.Tensor, z_x_neg: torch.Tensor, z_t_neg: torch.Tensor, tau: float,
                  backend: str) -> torch.Tensor:
    """The paper code's symmetrised LpSimCLR (p = 2): z_x_neg, z_t_neg encode a second, independent batch."""
    return 0.5 * (_lpsimclr_direction(z_x, z_t, z_x_neg, tau, backend)
                  + _lpsimclr_direction(z_t, z_x, z_t_neg, tau, backend))


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    factor = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.cosine_decay:
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / cfg.steps)))
    return factor


def train_encoders(model: LatentModel, cfg: TrainConfig,
                   on_step: Callable[[int, float], None] | None = None, log_every: int = 50,
                   checkpoints: tuple[int, ...] = (),
                   on_checkpoint: Callable[[int, nn.Module, nn.Module], None] | None = None) -> Encoders:
    """Train f_x, f_t from scratch for `cfg.steps` steps; deterministic for `cfg.seed` on a given machine.

    `on_step(step, loss)` is called after every step (the loss is only synchronised every `log_every` steps and
    passed as NaN otherwise, so a GPU run does not stall on .item()). `on_checkpoint(steps_done, f_x, f_t)` is
    called once `steps_done` steps have run, for each entry of `checkpoints`; it must leave the encoders' weights
    alone (evaluating them does not change the rest of the run).
    """
    encoding_size = cfg.encoding_size or len(model.bias.invariant)
    with torch.random.fork_rng(devices=[]):  # initialise from the seed without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        f_x = make_encoder(model.dim_x, encoding_size, cfg.hidden, cfg.init).to(model.device)
        f_t = make_encoder(model.dim_t, encoding_size, cfg.hidden, cfg.init).to(model.device)
    params = list(f_x.parameters()) + list(f_t.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    data_gen = torch.Generator(device=model.device).manual_seed(cfg.seed + 1)
    history: list[tuple[int, float]] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = model.sample(cfg.batch, data_gen)
        if cfg.objective == "clip":
            loss = contrastive_loss(f_x(batch.x), f_t(batch.t), cfg.tau, cfg.backend)
        else:
            negatives = model.sample(cfg.batch, data_gen)
            loss = lpsimclr_loss(f_x(batch.x), f_t(batch.t), f_x(negatives.x), f_t(negatives.t), cfg.tau,
                                 cfg.backend)
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
        if on_checkpoint is not None and step + 1 in checkpoints:
            on_checkpoint(step + 1, f_x, f_t)
    f_x.eval()
    f_t.eval()
    return Encoders(f_x=f_x, f_t=f_t, history=history, seconds=time.perf_counter() - start)
