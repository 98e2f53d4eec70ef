"""The latent-variable model of the misalignment study (Cai et al., 2025; docs/design.md#misalignment).

A paired sample is generated from semantics s ∈ R^10 and modality-specific latents m_x, m_t ∈ R^5:

    s ~ N(0, Σ),  Σ = I  (independent) or Σ ~ Wishart(10, I) (dependent)
    m_x, m_t ~ N(0, Σ_m),  Σ_m = I (independent) or Σ_m ~ Wishart(5, I) (dependent)
    s̃ = s + mask_ρ ⊙ b ⊙ ε,   b ~ Bernoulli(0.75),   ε ~ N(0, Σ)          (perturbation bias on ρ ⊆ θ)
    x = g_x(s, m_x),            t = g_t(s̃[θ], m_t)                          (selection bias: the text keeps θ)

The perturbation noise has the semantics' own covariance, as in the paper's code: in the independent case that is
ε ~ N(0, I); in the dependent case it keeps each perturbation as large as the semantic it distorts (Wishart
variances are ~10, so N(0, I) noise there would be a 10:1 signal-to-noise ratio, barely a perturbation).

In the dependent case the paper's code draws the covariances of m_x and m_t from one Wishart(5, I) draw each, but
with the same random state, so the two coincide; this model draws Σ_m once and uses it for both (m_x and m_t stay
independent of each other and of s).

g_x and g_t are frozen, square, bias-free 3-layer MLPs with LeakyReLU(0.2) between layers. Their weights are drawn
as in the paper's code (`mixer="paper"`, the default): entries uniform in [-1, 1], every column scaled to unit
norm, and a draw is rejected while its condition number exceeds a threshold per size, the 0.1 % quantile of the
condition numbers of such matrices (≈ 2.7 for 6 x 6, 5.1 for 10 x 10, 8.5 for 15 x 15). `mixer="spectral"` keeps
the earlier construction: Haar-orthogonal factors around singular values log-uniform in [1/sqrt(κ), sqrt(κ)],
κ = 4, about twice as well conditioned per layer. Either way the mixers are invertible
(`InvertibleMixer.inverse`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

N_SEMANTIC = 10
N_MODALITY = 5
CHANGE_PROB = 0.75
LEAKY_SLOPE = 0.2
LAYER_CONDITION = 4.0  # per-layer condition number bound κ of the "spectral" mixers' weights
MIXERS = ("paper", "spectral")
# The paper code's threshold: the 0.1 % quantile (index 25 of 25000 sorted draws) of the condition numbers of
# random column-normalised uniform matrices of the mixer's size.
THRESHOLD_POOL = 25_000
THRESHOLD_QUANTILE = 0.001


def _check_indices(indices, name: str, n: int) -> tuple[int, ...]:
    """A collection of distinct ints in [0, n) → a sorted tuple; anything else raises, naming the argument."""
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise TypeError(f"{name} must be a collection of semantic indices in [0, {n}), got {indices!r}")
    values = list(indices)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must hold ints (semantic indices in [0, {n})), got {value!r}")
        if not 0 <= value < n:
            raise ValueError(f"{name} index {value} is out of range: semantic indices lie in [0, {n})")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has repeated indices: {values}")
    return tuple(sorted(values))


@dataclass(frozen=True)
class BiasConfig:
    """Which semantics reach the text (selection θ) and which of those are randomly distorted (perturbation ρ).

    The invariant block θ \\ ρ is what contrastive learning can recover; it must not be empty.
    """

    selection: tuple[int, ...] = tuple(range(N_SEMANTIC))
    perturbation: tuple[int, ...] = ()
    dependent: bool = False
    change_prob: float = CHANGE_PROB

    def __post_init__(self):
        selection = _check_indices(self.selection, "selection", N_SEMANTIC)
        perturbation = _check_indices(self.perturbation, "perturbation", N_SEMANTIC)
        if not selection:
            raise ValueError("selection must keep at least one semantic index in the text")
        outside = sorted(set(perturbation) - set(selection))
        if outside:
            raise ValueError(f"perturbation must be a subset of selection: {outside} not in "
                             f"selection {list(selection)}")
        if len(perturbation) == len(selection):
            raise ValueError("perturbation must leave at least one selected index unperturbed "
                             f"(selection {list(selection)}, perturbation {list(perturbation)}): "
                             "there would be nothing invariant to learn")
        if not isinstance(self.dependent, bool):
            raise TypeError(f"dependent must be a bool, got {type(self.dependent).__name__}")
        if not 0.0 <= float(self.change_prob) <= 1.0:
            raise ValueError(f"change_prob must be a probability in [0, 1], got {self.change_prob}")
        object.__setattr__(self, "selection", selection)
        object.__setattr__(self, "perturbation", perturbation)
        object.__setattr__(self, "change_prob", float(self.change_prob))

    @property
    def invariant(self) -> tuple[int, ...]:
        """θ \\ ρ: the semantics shared exactly by both modalities."""
        return tuple(i for i in self.selection if i not in self.perturbation)

    @property
    def excluded(self) -> tuple[int, ...]:
        """Semantics dropped from the text (outside θ)."""
        return tuple(i for i in range(N_SEMANTIC) if i not in self.selection)

    def role(self, index: int) -> str:
        """'invariant', 'perturbed' or 'excluded' for semantic `index`."""
        if index in self.perturbation:
            return "perturbed"
        return "invariant" if index in self.selection else "excluded"


def _orthogonal(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix with the sign ambiguity removed)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def wishart_identity(df: int, dim: int, generator: torch.Generator) -> Tensor:
    """One draw of Wishart(df, I_dim): Σ = A Aᵀ with A a (dim, df) standard normal matrix (float64, symmetric)."""
    a = torch.randn(dim, df, generator=generator, dtype=torch.float64)
    cov = a @ a.T
    return 0.5 * (cov + cov.T)  # a @ a.T rounds its two halves differently


def well_conditioned_matrix(dim: int, generator: torch.Generator, condition: float = LAYER_CONDITION) -> Tensor:
    """U diag(σ) Vᵀ, U and V Haar-orthogonal, σ log-uniform in [1/sqrt(condition), sqrt(condition)] (float64)."""
    half_log = 0.5 * math.log(condition)
    log_sv = (2 * torch.rand(dim, generator=generator, dtype=torch.float64) - 1) * half_log
    if dim > 1:  # pin the extremes so every matrix spans the full allowed spread
        log_sv[0], log_sv[1] = half_log, -half_log
    u, v = _orthogonal(dim, generator), _orthogonal(dim, generator)
    return (u * torch.exp(log_sv)[None, :]) @ v.T


def _unit_column_uniform(count: int, dim: int, generator: torch.Generator) -> Tensor:
    """`count` (dim, dim) matrices with entries uniform in [-1, 1] and unit-norm columns (float64)."""
    a = torch.rand(count, dim, dim, generator=generator, dtype=torch.float64) * 2 - 1
    return a / torch.linalg.vector_norm(a, dim=1, keepdim=True)


def _condition_numbers(a: Tensor) -> Tensor:
    sv = torch.linalg.svdvals(a)
    return sv[..., 0] / sv[..., -1]


@functools.lru_cache(maxsize=None)
def paper_condition_threshold(dim: int) -> float:
    """Condition-number threshold of the paper code's mixers for size `dim` (a property of the size, not of the
    draw: estimated once from a fixed-seed pool of THRESHOLD_POOL matrices)."""
    generator = torch.Generator().manual_seed(dim)
    conds = torch.cat([_condition_numbers(_unit_column_uniform(5000, dim, generator))
                       for _ in range(THRESHOLD_POOL // 5000)])
    return float(conds.sort().values[int(THRESHOLD_POOL * THRESHOLD_QUANTILE)])


def paper_mixer_matrix(dim: int, generator: torch.Generator, threshold: float | None = None) -> Tensor:
    """A column-normalised uniform matrix whose condition number is at most `threshold` (default: the paper
    code's threshold for `dim`), by rejection; about one draw in a thousand is kept (float64)."""
    threshold = paper_condition_threshold(dim) if threshold is None else threshold
    while True:
        candidates = _unit_column_uniform(1024, dim, generator)
        kept = torch.nonzero(_condition_numbers(candidates) <= threshold).flatten()
        if len(kept):
            return candidates[kept[0]]


class InvertibleMixer(nn.Module):
    """Frozen square bias-free MLP: Linear → LeakyReLU(0.2) → ... → Linear, with an exact inverse.

    mixer="paper": weights as in the paper's code (see the module docstring); "spectral": singular values
    log-uniform in [1/sqrt(condition), sqrt(condition)].
    """

    def __init__(self, dim: int, n_layers: int = 3, *, generator: torch.Generator, mixer: str = "paper",
                 condition: float = LAYER_CONDITION):
        super().__init__()
        if dim < 1 or n_layers < 1:
            raise ValueError(f"need dim >= 1 and n_layers >= 1, got dim={dim}, n_layers={n_layers}")
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if mixer == "paper":
            draws = [paper_mixer_matrix(dim, generator) for _ in range(n_layers)]
        else:
            draws = [well_conditioned_matrix(dim, generator, condition) for _ in range(n_layers)]
        self.register_buffer("weights", torch.stack(draws).float())

    def forward(self, z: Tensor) -> Tensor:
        h = z
        for k, weight in enumerate(self.weights):
            h = h @ weight.to(h.dtype).T
            if k < len(self.weights) - 1:
                h = nn.functional.leaky_relu(h, LEAKY_SLOPE)
        return h

    def inverse(self, x: Tensor) -> Tensor:
        h = x
        for k in reversed(range(len(self.weights))):
            if k < len(self.weights) - 1:
                h = torch.where(h >= 0, h, h / LEAKY_SLOPE)  # LeakyReLU is a bijection of R
            h = torch.linalg.solve(self.weights[k].to(h.dtype), h.T).T
        return h


@dataclass
class Sample:
    """One batch of the generative model: latents and the two observed modalities."""

    s: Tensor          # (n, 10) semantics seen by the image
    s_tilde: Tensor    # (n, 10) semantics after perturbation (only θ reaches the text)
    m_x: Tensor        # (n, 5) image-specific latents
    m_t: Tensor        # (n, 5) text-specific latents
    x: Tensor          # (n, 15) image = g_x(s, m_x)
    t: Tensor          # (n, |θ| + 5) text = g_t(s̃[θ], m_t)


class LatentModel:
    """The frozen data-generating process for one bias configuration, built deterministically from `seed`."""

    def __init__(self, bias: BiasConfig, seed: int = 0, device: str | torch.device = "cpu", mixer: str = "paper"):
        if not isinstance(bias, BiasConfig):
            raise TypeError(f"bias must be a BiasConfig, got {type(bias).__name__}")
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        self.bias = bias
        self.mixer = mixer
        self.device = torch.device(device)
        generator = torch.Generator().manual_seed(int(seed))
        if bias.dependent:
            self.covariance = wishart_identity(N_SEMANTIC, N_SEMANTIC, generator)
            self.modality_covariance = wishart_identity(N_MODALITY, N_MODALITY, generator)
        else:
            self.covariance = torch.eye(N_SEMANTIC, dtype=torch.float64)
            self.modality_covariance = torch.eye(N_MODALITY, dtype=torch.float64)
        self._chol = torch.linalg.cholesky(self.covariance).float().to(self.device)
        self._chol_m = torch.linalg.cholesky(self.modality_covariance).float().to(self.device)
        self.g_x = InvertibleMixer(N_SEMANTIC + N_MODALITY, generator=generator, mixer=mixer).to(self.device)
        self.g_t = InvertibleMixer(len(bias.selection) + N_MODALITY, generator=generator,
                                   mixer=mixer).to(self.device)
        self._selection = torch.tensor(bias.selection, dtype=torch.long, device=self.device)
        mask = torch.zeros(N_SEMANTIC, device=self.device)
        mask[list(bias.perturbation)] = 1.0
        self._perturb_mask = mask

    @property
    def dim_x(self) -> int:
        return N_SEMANTIC + N_MODALITY

    @property
    def dim_t(self) -> int:
        return len(self.bias.selection) + N_MODALITY

    def sample(self, n: int, generator: torch.Generator) -> Sample:
        """n fresh paired samples drawn with `generator` (on the model's device)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        kw = dict(generator=generator, device=self.device)
        s = torch.randn(n, N_SEMANTIC, **kw) @ self._chol.T
        m_x = torch.randn(n, N_MODALITY, **kw) @ self._chol_m.T
        m_t = torch.randn(n, N_MODALITY, **kw) @ self._chol_m.T
        changed = (torch.rand(n, N_SEMANTIC, **kw) < self.bias.change_prob).float()
        noise = torch.randn(n, N_SEMANTIC, **kw) @ self._chol.T
        s_tilde = s + self._perturb_mask * changed * noise
        with torch.no_grad():
            x = self.g_x(torch.cat([s, m_x], dim=1))
            t = self.g_t(torch.cat([s_tilde[:, self._selection], m_t], dim=1))
        return Sample(s=s, s_tilde=s_tilde, m_x=m_x, m_t=m_t, x=x, t=t)

    def oracle_r2(self) -> dict[str, float]:
        """Best achievable R² for each latent from the invariant block s[θ \\ ρ] alone (exact).

        Contrastive learning identifies the invariant block and nothing else, so this is what a perfect
        representation gives: 1 for the invariant semantics and for the block as a whole ("s_inv"),
        Σ_jI Σ_II⁻¹ Σ_Ij / Σ_jj for the other semantics (0 in the independent case), 0 for m_x and m_t, and for
        the text's value of a perturbed semantic ("s_tilde<j>" = s_j + b ε_j) the same explained variance over
        Var(s̃_j) = (1 + p) Σ_jj. E[s_j | s_I] is linear (s is Gaussian) and the noise b ε_j has mean zero and is
        independent of s, so these are the R² of the best predictor, not only of the best linear one.
        """
        cov = self.covariance
        inv = list(self.bias.invariant)
        explained = cov[:, inv] @ torch.linalg.solve(cov[inv][:, inv], cov[inv, :])
        r2 = {f"s{j}": float(explained[j, j] / cov[j, j]) for j in range(N_SEMANTIC)}
        r2["m_x"] = 0.0
        r2["m_t"] = 0.0
        r2["s_inv"] = 1.0
        for j in self.bias.perturbation:
            r2[f"s_tilde{j}"] = float(explained[j, j] / ((1.0 + self.bias.change_prob) * cov[j, j]))
        return r2
