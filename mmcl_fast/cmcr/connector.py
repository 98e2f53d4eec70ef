"""C-MCR (Wang et al., NeurIPS 2023; docs/design.md#cmcr): connect two frozen contrastive spaces through the
modality they share.

Space 1 embeds modalities A and B, space 2 embeds B and C (CLIP: image–text, CLAP: text–audio, B = text). From B
samples alone, plus unpaired memories of A (in space 1) and C (in space 2), C-MCR trains one projector per space so
that A and C land in one new space although no (A, C) pair is ever seen:

1. semantic enhancement: each B embedding b¹ (space 1) retrieves a pseudo A embedding ã = softmax(<b¹, A_mem>/τ1)·A_mem,
   and b² (space 2) a pseudo C embedding c̃ the same way (τ1 = 0.01; streamed, `enhance.semantic_enhance`); every
   projector input gets Gaussian noise of variance 0.004 and is re-normalised (`enhance.add_noise`);
2. projectors f1, f2: Linear(d→1024) → BatchNorm1d → ReLU → Linear(1024→d') → BatchNorm1d, outputs L2-normalised;
3. loss = InfoNCE(f1(b¹), f2(b²)) + InfoNCE(f1(ã), f2(c̃))                                   (inter-space)
          + λ [ ||f1(b¹) − f1(ã)||² + ||f2(b²) − f2(c̃)||² ],  λ = 0.1                         (intra-space)
   The InfoNCE terms are symmetric CLIP losses on mmcl_fast's fused kernel (`clip_loss`, no B x B buffer), at
   logit scale 1/τ; the L2 terms are means over the batch of squared distances.

Each projector sees B and its retrieved partner in one BatchNorm batch (concatenated), so its batch statistics in
training mix both modalities, as its running statistics do at inference.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .._validate import check_feature, check_same_shape
from ..losses.clip import clip_loss
from .enhance import MEMORY_TEMPERATURE, METHODS, NOISE_VARIANCE, add_noise, semantic_enhance

LOSS_TEMPERATURE = 0.01   # temperature of the InfoNCE terms (logit scale 100, CLIP's cap)
INTRA_WEIGHT = 0.1        # λ of the intra-space L2 alignment
HIDDEN = 1024             # projector hidden width
RETRIEVALS = ("softmax", "nearest", "none")


# --------------------------------------------------------------------------------------------- losses

def inter_space_loss(shared_1: Tensor, shared_2: Tensor, pseudo_1: Tensor | None = None,
                     pseudo_2: Tensor | None = None, temperature: float = LOSS_TEMPERATURE, *,
                     backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """(InfoNCE(shared_1, shared_2), InfoNCE(pseudo_1, pseudo_2) or None), symmetric, logit scale 1/temperature.

    shared_1 / shared_2: projections of the same B samples from space 1 / space 2, row i paired with row i;
    pseudo_1 / pseudo_2: projections of the pseudo partners retrieved for those samples (both or neither).
    """
    check_same_shape(shared_1, "shared_1", shared_2, "shared_2")
    _check_positive(temperature, "temperature")
    shared = clip_loss(shared_1, shared_2, 1.0 / temperature, backend=backend)
    if (pseudo_1 is None) != (pseudo_2 is None):
        raise ValueError("pass both pseudo_1 and pseudo_2, or neither")
    if pseudo_1 is None:
        return shared, None
    check_same_shape(pseudo_1, "pseudo_1", pseudo_2, "pseudo_2")
    check_same_shape(shared_1, "shared_1", pseudo_1, "pseudo_1")
    return shared, clip_loss(pseudo_1, pseudo_2, 1.0 / temperature, backend=backend)


def intra_space_loss(shared_1: Tensor, pseudo_1: Tensor, shared_2: Tensor, pseudo_2: Tensor) -> Tensor:
    """mean_i ||shared_1_i − pseudo_1_i||² + mean_i ||shared_2_i − pseudo_2_i||²: pulls each projected B embedding
    onto its retrieved partner in the same space (closing that space's modality gap after projection)."""
    check_same_shape(shared_1, "shared_1", pseudo_1, "pseudo_1")
    check_same_shape(shared_2, "shared_2", pseudo_2, "pseudo_2")
    if shared_1.shape[0] != shared_2.shape[0]:
        raise ValueError(f"shared_1 and shared_2 must have the same number of rows (paired B samples), got "
                         f"{shared_1.shape[0]} and {shared_2.shape[0]}")
    return (shared_1 - pseudo_1).square().sum(1).mean() + (shared_2 - pseudo_2).square().sum(1).mean()


def cmcr_loss(shared_1: Tensor, shared_2: Tensor, pseudo_1: Tensor | None = None, pseudo_2: Tensor | None = None,
              *, temperature: float = LOSS_TEMPERATURE, intra_weight: float = INTRA_WEIGHT,
              backend: str = "auto") -> dict[str, Tensor]:
    """C-MCR's objective on projected, L2-normalised embeddings: {"loss", "inter_shared", "inter_pseudo", "intra"}.

    loss = inter_shared + inter_pseudo + intra_weight · intra. Without pseudo partners (pseudo_1 = pseudo_2 = None)
    only inter_shared remains (the "text-only" connection) and the other entries are zero.
    """
    _check_non_negative(intra_weight, "intra_weight")
    shared, pseudo = inter_space_loss(shared_1, shared_2, pseudo_1, pseudo_2, temperature, backend=backend)
    zero = shared.new_zeros(())
    if pseudo is None:
        return {"loss": shared, "inter_shared": shared, "inter_pseudo": zero, "intra": zero}
    intra = intra_space_loss(shared_1, pseudo_1, shared_2, pseudo_2) if intra_weight > 0 else zero
    return {"loss": shared + pseudo + intra_weight * intra, "inter_shared": shared, "inter_pseudo": pseudo,
            "intra": intra}


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_non_negative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- projector

class Projector(nn.Sequential):
    """Linear(d→hidden) → BatchNorm1d → ReLU → Linear(hidden→d') → BatchNorm1d; `forward` L2-normalises."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int = HIDDEN):
        for name, value in (("dim_in", dim_in), ("dim_out", dim_out), ("hidden", hidden)):
            _check_count(value, name)
        super().__init__(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, dim_out), nn.BatchNorm1d(dim_out))
        self.dim_in, self.dim_out = dim_in, dim_out

    def forward(self, x: Tensor) -> Tensor:
        check_feature(x, "x")
        if x.shape[1] != self.dim_in:
            raise ValueError(f"x has {x.shape[1]} features but this projector takes {self.dim_in}")
        return nn.functional.normalize(super().forward(x), dim=1)


# --------------------------------------------------------------------------------------------- configuration

@dataclass
class CMCRConfig:
    """The method's constants (paper defaults) and the switches the ablations turn off.

    retrieval: "softmax" (semantic enhancement: softmax mix over the memory, the paper), "nearest" (the single most
    similar memory item: pseudo pairs without enhancement) or "none" (no memory: only the B–B InfoNCE).
    noise_variance = 0 turns the noise injection off; intra_weight = 0 the intra-space alignment.
    """

    memory_temperature: float = MEMORY_TEMPERATURE
    noise_variance: float = NOISE_VARIANCE
    loss_temperature: float = LOSS_TEMPERATURE
    intra_weight: float = INTRA_WEIGHT
    hidden: int = HIDDEN
    out_dim: int | None = None  # default: space 1's embedding size
    retrieval: str = "softmax"
    enhance_method: str = "sdpa"

    def __post_init__(self):
        _check_positive(self.memory_temperature, "memory_temperature")
        _check_non_negative(self.noise_variance, "noise_variance")
        _check_positive(self.loss_temperature, "loss_temperature")
        _check_non_negative(self.intra_weight, "intra_weight")
        _check_count(self.hidden, "hidden")
        if self.out_dim is not None:
            _check_count(self.out_dim, "out_dim")
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {self.retrieval!r}")
        if self.enhance_method not in METHODS:
            raise ValueError(f"enhance_method must be one of {METHODS}, got {self.enhance_method!r}")


@dataclass
class FitConfig:
    """Optimisation of the projectors: AdamW, cosine decay, fixed seed."""

    steps: int = 2000
    batch: int = 4096
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    backend: str = "auto"  # backend of the fused InfoNCE (and of method="primitive" enhancement)

    def __post_init__(self):
        _check_count(self.steps, "steps")
        _check_count(self.batch, "batch", 2)
        _check_positive(self.lr, "lr")
        _check_non_negative(self.weight_decay, "weight_decay")


@torch.no_grad()
def nearest_neighbour(queries: Tensor, memory: Tensor, block_rows: int = 1024) -> Tensor:
    """memory[argmax_j <q_i, m_j>] for every query, in row blocks (memory O(block_rows · M))."""
    out = torch.empty_like(queries)
    for r0 in range(0, queries.shape[0], block_rows):
        out[r0:r0 + block_rows] = memory[(queries[r0:r0 + block_rows] @ memory.T).argmax(1)]
    return out


# --------------------------------------------------------------------------------------------- the connector

class CMCRConnector(nn.Module):
    """Two projectors that connect space 1 (A, B) and space 2 (B, C) into one space for A and C.

    Inputs are either embeddings of the two spaces (default) or raw inputs of frozen encoders passed here:
    `encoder_a`, `encoder_b1` (space 1) and `encoder_b2`, `encoder_c` (space 2), each mapping inputs to that space's
    embeddings. Embeddings are L2-normalised on entry in either case.
    """

    def __init__(self, dim_1: int, dim_2: int, config: CMCRConfig | None = None, *,
                 encoder_a: nn.Module | None = None, encoder_b1: nn.Module | None = None,
                 encoder_b2: nn.Module | None = None, encoder_c: nn.Module | None = None):
        super().__init__()
        config = CMCRConfig() if config is None else config
        if not isinstance(config, CMCRConfig):
            raise TypeError(f"config must be a CMCRConfig, got {type(config).__name__}")
        _check_count(dim_1, "dim_1")
        _check_count(dim_2, "dim_2")
        self.config, self.dim_1, self.dim_2 = config, dim_1, dim_2
        out_dim = config.out_dim or dim_1
        self.project_1 = Projector(dim_1, out_dim, config.hidden)
        self.project_2 = Projector(dim_2, out_dim, config.hidden)
        # Frozen encoders are held outside the module's parameters and state (they are the caller's).
        self._encoders = {"a": encoder_a, "b1": encoder_b1, "b2": encoder_b2, "c": encoder_c}
        self.history: list[tuple[int, float]] = []
        self.seconds = 0.0

    # ----------------------------------------------------------------------------- embedding helpers
    def _embed(self, x: Tensor, which: str, name: str) -> Tensor:
        encoder = self._encoders[which]
        if encoder is not None:
            with torch.no_grad():
                x = encoder(x)
        check_feature(x, name)
        dim = self.dim_1 if which in ("a", "b1") else self.dim_2
        if x.shape[1] != dim:
            space = 1 if which in ("a", "b1") else 2
            raise ValueError(f"{name} has {x.shape[1]} features but space {space} embeddings have {dim}")
        return nn.functional.normalize(x.detach().float() if x.dtype != torch.float64 else x.detach(), dim=1)

    @torch.no_grad()
    def encode_a(self, x: Tensor) -> Tensor:
        """A (embeddings of space 1, or raw inputs of encoder_a) → the connected space, L2-normalised."""
        was_training = self.training
        self.eval()
        out = self.project_1(self._embed(x, "a", "x"))
        self.train(was_training)
        return out

    @torch.no_grad()
    def encode_c(self, x: Tensor) -> Tensor:
        """C (embeddings of space 2, or raw inputs of encoder_c) → the connected space, L2-normalised."""
        was_training = self.training
        self.eval()
        out = self.project_2(self._embed(x, "c", "x"))
        self.train(was_training)
        return out

    @torch.no_grad()
    def encode_b(self, x: Tensor, space: int) -> Tensor:
        """B as seen by space 1 or 2 → the connected space."""
        if space not in (1, 2):
            raise ValueError(f"space must be 1 or 2, got {space!r}")
        was_training = self.training
        self.eval()
        if space == 1:
            out = self.project_1(self._embed(x, "b1", "x"))
        else:
            out = self.project_2(self._embed(x, "b2", "x"))
        self.train(was_training)
        return out

    # ----------------------------------------------------------------------------- training
    def pseudo_partners(self, shared_1: Tensor, shared_2: Tensor, memory_a: Tensor, memory_c: Tensor,
                        backend: str = "auto") -> tuple[Tensor, Tensor]:
        """The retrieved partners (ã in space 1, c̃ in space 2) of normalised B embeddings, per `config.retrieval`."""
        cfg = self.config
        if cfg.retrieval == "nearest":
            return nearest_neighbour(shared_1, memory_a), nearest_neighbour(shared_2, memory_c)
        with torch.no_grad():
            enhance = dict(temperature=cfg.memory_temperature, method=cfg.enhance_method, backend=backend)
            return semantic_enhance(shared_1, memory_a, **enhance), semantic_enhance(shared_2, memory_c, **enhance)

    def fit(self, shared_1: Tensor, shared_2: Tensor, memory_a: Tensor | None = None,
            memory_c: Tensor | None = None, fit: FitConfig | None = None,
            on_step: Callable[[int, float], None] | None = None, log_every: int = 50) -> "CMCRConnector":
        """Train the projectors from B alone plus unpaired memories of A and C.

        Args:
            shared_1: (N, d1) B in space 1 (embeddings, or raw inputs of encoder_b1).
            shared_2: (N, d2) the same B samples in space 2 (row i is row i of shared_1), or raw inputs of encoder_b2.
            memory_a: (M_a, d1) unpaired A embeddings of space 1 (or raw inputs of encoder_a), M_a >= 1;
                memory_c: (M_c, d2) unpaired C embeddings of space 2 (or raw inputs of encoder_c). Both unused
                (may be None) with config.retrieval == "none".
            fit: optimisation settings (steps, batch, lr, seed, backend).
        """
        fit = FitConfig() if fit is None else fit
        b1, b2 = self._embed(shared_1, "b1", "shared_1"), self._embed(shared_2, "b2", "shared_2")
        if b1.shape[0] != b2.shape[0]:
            raise ValueError(f"shared_1 and shared_2 must hold the same B samples row by row, got {b1.shape[0]} and "
                             f"{b2.shape[0]} rows")
        if self.config.retrieval == "none":
            partners = None
        else:
            if memory_a is None or memory_c is None:
                raise ValueError(f"retrieval={self.config.retrieval!r} needs memory_a and memory_c")
            mem_a, mem_c = self._embed(memory_a, "a", "memory_a"), self._embed(memory_c, "c", "memory_c")
            partners = self.pseudo_partners(b1, b2, mem_a, mem_c, fit.backend)
        return self._train(b1, b2, partners, fit, on_step, log_every, intra=True)

    def fit_pairs(self, paired_a: Tensor, paired_c: Tensor, fit: FitConfig | None = None,
                  on_step: Callable[[int, float], None] | None = None, log_every: int = 50) -> "CMCRConnector":
        """The paired-data oracle: the same projectors trained with the InfoNCE on true (A, C) pairs (row i with
        row i), with the same noise injection; no memory, no pseudo pairs."""
        fit = FitConfig() if fit is None else fit
        a, c = self._embed(paired_a, "a", "paired_a"), self._embed(paired_c, "c", "paired_c")
        if a.shape[0] != c.shape[0]:
            raise ValueError(f"paired_a and paired_c must have the same number of rows, got {a.shape[0]} and "
                             f"{c.shape[0]}")
        return self._train(a, c, None, fit, on_step, log_every, intra=False)

    def _train(self, first: Tensor, second: Tensor, partners: tuple[Tensor, Tensor] | None, fit: FitConfig,
               on_step, log_every: int, intra: bool) -> "CMCRConnector":
        cfg = self.config
        n = first.shape[0]
        batch = min(fit.batch, n)
        if batch < 2:
            raise ValueError(f"need at least 2 training samples, got {n}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fit.seed)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.BatchNorm1d)):
                    module.reset_parameters()
        params = list(self.project_1.parameters()) + list(self.project_2.parameters())
        optimizer = torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=fit.steps)
        generator = torch.Generator(device=first.device).manual_seed(fit.seed + 1)
        noisy = (lambda e: add_noise(e, cfg.noise_variance, generator=generator))
        self.train()
        self.history = []
        start = time.perf_counter()
        for step in range(fit.steps):
            idx = torch.randint(n, (batch,), generator=generator, device=first.device)
            if partners is None:
                out_1, out_2 = self.project_1(noisy(first[idx])), self.project_2(noisy(second[idx]))
                parts = cmcr_loss(out_1, out_2, temperature=cfg.loss_temperature, backend=fit.backend)
            else:
                # one BatchNorm batch per projector: B and its partner together
                out_1 = self.project_1(torch.cat([noisy(first[idx]), noisy(partners[0][idx])]))
                out_2 = self.project_2(torch.cat([noisy(second[idx]), noisy(partners[1][idx])]))
                parts = cmcr_loss(out_1[:batch], out_2[:batch], out_1[batch:], out_2[batch:],
                                  temperature=cfg.loss_temperature,
                                  intra_weight=cfg.intra_weight if intra else 0.0, backend=fit.backend)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            scheduler.step()
            logged = step % log_every == 0 or step == fit.steps - 1
            value = float(parts["loss"].detach()) if logged else float("nan")
            if logged:
                self.history.append((step, value))
                if not math.isfinite(value):
                    raise FloatingPointError(f"the C-MCR loss became {value} at step {step}; lower the lr")
            if on_step is not None:
                on_step(step, value)
        self.seconds = time.perf_counter() - start
        self.eval()
        return self

    # ----------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the projectors' weights and the configuration (not the caller's frozen encoders)."""
        path = Path(path)
        torch.save({"dim_1": self.dim_1, "dim_2": self.dim_2, "config": asdict(self.config),
                    "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, **encoders) -> "CMCRConnector":
        """Read a connector written by `save`; pass the frozen encoders again (encoder_a=..., ...) if any."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        connector = cls(blob["dim_1"], blob["dim_2"], CMCRConfig(**blob["config"]), **encoders)
        connector.load_state_dict(blob["state_dict"])
        connector.eval()
        return connector
