"""A synthetic three-modality world for C-MCR (docs/design.md#cmcr): A, B and C observe one semantic latent.

Each sample has semantics s ∈ R^k shared by all three modalities and one modality-specific latent per modality:

    s ~ N(0, I_k),   m_A, m_B, m_C ~ N(0, I_p),    A = g_A(s, m_A),   B = g_B(s, m_B),   C = g_C(s, m_C)

g_A, g_B and g_C are frozen invertible 3-layer MLPs, one per modality (square, bias-free, LeakyReLU(0.2) between
layers; each weight is U diag(σ) Vᵀ with Haar-random U, V and σ log-uniform in [1/2, 2], so every layer is
invertible with condition number at most 4): no modality is a linear copy of another, and each determines s.
B plays the overlapping modality (text in CLIP + CLAP), A and C the two that are never paired (image, audio).
A paired triple (A, B, C) shares s; unpaired data are independent draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

MODALITIES = ("a", "b", "c")
LEAKY_SLOPE = 0.2
MIXER_LAYERS = 3
MIXER_CONDITION = 4.0


def _orthogonal(dim: int, generator: torch.Generator) -> Tensor:
    """Haar-random orthogonal matrix: QR of a Gaussian matrix, signs fixed by R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


class Mixer(nn.Module):
    """Frozen invertible MLP R^dim → R^dim: Linear → LeakyReLU(0.2) → Linear → LeakyReLU(0.2) → Linear."""

    def __init__(self, dim: int, generator: torch.Generator, n_layers: int = MIXER_LAYERS,
                 condition: float = MIXER_CONDITION):
        super().__init__()
        half_log = 0.5 * torch.log(torch.tensor(condition, dtype=torch.float64))
        weights = []
        for _ in range(n_layers):
            log_sv = (2 * torch.rand(dim, generator=generator, dtype=torch.float64) - 1) * half_log
            u, v = _orthogonal(dim, generator), _orthogonal(dim, generator)
            weights.append((u * log_sv.exp()[None, :]) @ v.T)
        self.register_buffer("weights", torch.stack(weights).float())

    def forward(self, z: Tensor) -> Tensor:
        for k, weight in enumerate(self.weights):
            z = z @ weight.T
            if k < len(self.weights) - 1:
                z = nn.functional.leaky_relu(z, LEAKY_SLOPE)
        return z


@dataclass(frozen=True)
class WorldConfig:
    """Latent sizes: `n_semantic` shared semantics, `n_specific` modality-specific latents per modality."""

    n_semantic: int = 6
    n_specific: int = 4

    def __post_init__(self):
        for name in ("n_semantic", "n_specific"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def dim(self) -> int:
        """Size of every observed modality: n_semantic + n_specific (the mixers are square)."""
        return self.n_semantic + self.n_specific


@dataclass
class Triples:
    """n samples of the world: the shared semantics and the three observed modalities (row i shares s_i)."""

    s: Tensor  # (n, n_semantic)
    a: Tensor  # (n, dim)
    b: Tensor  # (n, dim)
    c: Tensor  # (n, dim)

    def __getitem__(self, modality: str) -> Tensor:
        if modality not in MODALITIES:
            raise KeyError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return getattr(self, modality)


class ThreeModalityWorld:
    """The frozen data-generating process, built deterministically from `seed`."""

    def __init__(self, config: WorldConfig = WorldConfig(), seed: int = 0):
        if not isinstance(config, WorldConfig):
            raise TypeError(f"config must be a WorldConfig, got {type(config).__name__}")
        self.config = config
        generator = torch.Generator().manual_seed(int(seed))
        self.mixers = {m: Mixer(config.dim, generator) for m in MODALITIES}

    @property
    def dim(self) -> int:
        return self.config.dim

    def sample(self, n: int, generator: torch.Generator) -> Triples:
        """n fresh triples drawn with `generator`: A, B and C of row i share the semantics s_i."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        k, p = self.config.n_semantic, self.config.n_specific
        s = torch.randn(n, k, generator=generator)
        observed = {}
        with torch.no_grad():
            for modality in MODALITIES:
                specific = torch.randn(n, p, generator=generator)
                observed[modality] = self.mixers[modality](torch.cat([s, specific], dim=1))
        return Triples(s=s, **observed)
