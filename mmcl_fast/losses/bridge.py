"""Brownian-bridge losses (docs/design.md#brownian-bridge): the augmented view of an image must lie on the bridge
to its caption.

Jiang et al., "Understanding and Constructing Latent Modality Structures in Multi-modal Representation
Learning" (CVPR 2023), with the batch-contrastive form of Wang et al., "Language Modeling via Stochastic
Processes" (ICLR 2022). With image features v, text features w, augmented image features a and mixing weight t:

* ``mode="pairwise"`` (the paper's loss): mu_j = normalize(t v_j + (1 - t) w_j),
  L = (1/N) sum_j ||a_j - mu_j||^2. O(N*D) work and memory; plain autograd.
* ``mode="contrastive"`` (large batch): mu_j(t) = t v_j + (1 - t) w_j (not re-normalised), sigma^2 = t (1 - t),
  d_ij = -||a_i - mu_j(t_i)||^2 / (2 sigma_i^2), L = -(1/N) sum_i log softmax_j(d_ij)[i].
  The softmax normaliser runs on the streamed-LSE primitive, never an N x N buffer:

  - scalar t: d_ij = (1/sigma^2) <a_i, mu_j> - ||mu_j||^2 / (2 sigma^2) - ||a_i||^2 / (2 sigma^2), i.e. the
    primitive with x = a, y = mu, scale = 1/sigma^2, col_bias = -||mu_j||^2 / (2 sigma^2). The row term
    -||a_i||^2 / (2 sigma^2) shifts row i's logits and its positive alike, so it cancels and is left out.
    Work: one (N, N, D) GEMM forward, two backward (dx, dy), as for a one-sided InfoNCE.
  - per-sample t_i: mu_j(t_i) depends on the row, but the logits stay affine in a (2D + 3)-feature space:
        x~_i = [t_i a_i, (1 - t_i) a_i, -t_i^2 / 2, -t_i (1 - t_i), -(1 - t_i)^2 / 2]
        y~_j = [v_j, w_j, ||v_j||^2, <v_j, w_j>, ||w_j||^2]
    give <x~_i, y~_j> = <a_i, mu_j(t_i)> - ||mu_j(t_i)||^2 / 2, so d_ij = (1/sigma_i^2) <x~_i, y~_j> up to the
    same cancelling row term. Twice the GEMM work of the scalar case, still O(N*D) memory, exact, and autograd
    flows through the concatenation to a, v, w and t.

Precision: float32 and float64 features are used as they are. For bfloat16/float16 features the bridge points
are mixed in float32 and the primitive runs on float32 features (the mixed means, and a float32 copy of the
augmented features, O(N*D)): rounding the mixed means back to 16 bits would add an error of about one bf16 ulp
to every logit, well above the library's bf16 loss tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ops
from .._autocast import autocast_off
from .._numerics import accumulation_dtype
from .._stats import rowdot, squared_norms
from .._validate import as_vector, check_same_shape, check_scalar
from ..backends import resolve_backend

BRIDGE_MODES = ("pairwise", "contrastive")


def _check_bridge_t(t, n: int, like: Tensor, mode: str):
    """t as a float, a 0-d tensor or an (N,) tensor; in [0, 1] (pairwise) or (0, 1) (contrastive: sigma^2 > 0)."""
    t = check_scalar(t, "t", like, allow_vector_of=n)
    if isinstance(t, Tensor) and torch.compiler.is_compiling():
        # reading the values would break the graph: an asynchronous assert checks the same range inside it
        inside = (t > 0) & (t < 1) if mode == "contrastive" else (t >= 0) & (t <= 1)
        torch._assert_async(inside.all(), f"t must lie in {'(0, 1)' if mode == 'contrastive' else '[0, 1]'}")
        return t
    if isinstance(t, Tensor):
        with torch.no_grad():
            lo, hi = float(t.min()), float(t.max())
    else:
        lo = hi = t
    if mode == "contrastive":
        if not (0.0 < lo and hi < 1.0):
            raise ValueError("t must lie strictly inside (0, 1) for mode='contrastive' (the bridge variance "
                             f"t(1 - t) must be positive), got values in [{lo}, {hi}]")
    elif not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"t must lie in [0, 1], got values in [{lo}, {hi}]")
    return t


def _pairwise_bridge(augmented: Tensor, image: Tensor, text: Tensor, t, acc: torch.dtype) -> Tensor:
    weight = t[:, None].to(acc) if isinstance(t, Tensor) and t.dim() == 1 else t
    if isinstance(weight, Tensor):
        weight = weight.to(acc)
    bridge = F.normalize(torch.lerp(text.to(acc), image.to(acc), weight), dim=1)
    return squared_norms(augmented.to(acc) - bridge).mean()


def _bridge_cross_entropy(query: Tensor, keys: Tensor, inv_var, key_bias, acc: torch.dtype, backend: str) -> Tensor:
    """mean_i [LSE_j(L_ij) - L_ii] with L_ij = inv_var_i <query_i, keys_j> + key_bias_j, on the fused primitive
    (the positives' gradients are folded into the kernel's gradient weights)."""
    n = query.shape[0]
    scale = as_vector(inv_var, n, "t", query, acc)
    key_bias = as_vector(key_bias, n, "t", query, acc)
    no_bias = torch.zeros(n, dtype=acc, device=query.device)
    row_lse, _, positive, *_ = _ops.softmax_stats(
        query, keys, scale, no_bias, key_bias, row_target=torch.arange(n, device=query.device), col_target=None,
        need_row=True, need_col=False, need_sums=False, backend=backend)
    return (row_lse - positive).mean()


def _contrastive_bridge_scalar_t(augmented: Tensor, image: Tensor, text: Tensor, t, acc: torch.dtype,
                                 backend: str) -> Tensor:
    weight = t.to(acc) if isinstance(t, Tensor) else t
    bridge = torch.lerp(text.to(acc), image.to(acc), weight)
    inv_var = 1.0 / (weight * (1.0 - weight))
    bridge_bias = -0.5 * inv_var * squared_norms(bridge)
    return _bridge_cross_entropy(augmented.to(acc), bridge, inv_var, bridge_bias, acc, backend)


def _contrastive_bridge_per_sample_t(augmented: Tensor, image: Tensor, text: Tensor, t: Tensor,
                                     acc: torch.dtype, backend: str) -> Tensor:
    t_col = t.to(acc)[:, None]
    s_col = 1.0 - t_col
    aug = augmented.to(acc)
    image_acc, text_acc = image.to(acc), text.to(acc)
    query = torch.cat([t_col * aug, s_col * aug, -0.5 * t_col * t_col, -t_col * s_col, -0.5 * s_col * s_col], dim=1)
    keys = torch.cat([image_acc, text_acc, squared_norms(image_acc)[:, None],
                      rowdot(image_acc, text_acc, acc)[:, None], squared_norms(text_acc)[:, None]], dim=1)
    inv_var = 1.0 / (t_col * s_col).reshape(-1)
    return _bridge_cross_entropy(query, keys, inv_var, None, acc, backend)


@autocast_off
def brownian_bridge_loss(image_features: Tensor, text_features: Tensor, augmented_image_features: Tensor,
                         t=0.25, *, mode: str = "pairwise", backend: str = "auto") -> Tensor:
    """Brownian-bridge loss of Jiang et al. (CVPR 2023): pull augmented image features onto the image-text bridge.

    Args:
        image_features: (N, D) image features z_V (L2-normalised in the paper; not enforced).
        text_features: (N, D) paired caption features z_T.
        augmented_image_features: (N, D) features z^a_V of an augmented view of each image.
        t: bridge position, 0 = text, 1 = image (paper default 0.25): a float, a 0-d tensor or an (N,) tensor of
            per-sample positions (may require grad). In [0, 1] for "pairwise", strictly inside (0, 1) for
            "contrastive".
        mode: "pairwise" — (1/N) sum_j ||z^a_Vj - normalize(t z_Vj + (1 - t) z_Tj)||^2, the paper's loss;
            "contrastive" — mean_i CE(d_i., i) with d_ij = -||z^a_Vi - mu_j(t_i)||^2 / (2 t_i (1 - t_i)) and
            mu_j(t) = t z_Vj + (1 - t) z_Tj (not re-normalised): every augmented point is classified against
            every pair's bridge in the batch (Wang et al. 2022), on the fused LSE kernels, O(N*D) memory.
        backend: primitive backend for mode="contrastive": "auto" | "reference" | "torch" | "cpu" | "triton".

    Returns:
        0-d tensor, float32 (float64 for float64 features).
    """
    check_same_shape(image_features, "image_features", text_features, "text_features")
    check_same_shape(image_features, "image_features", augmented_image_features, "augmented_image_features")
    if mode not in BRIDGE_MODES:
        raise ValueError(f"mode must be one of {BRIDGE_MODES}, got {mode!r}")
    n = image_features.shape[0]
    t = _check_bridge_t(t, n, image_features, mode)
    acc = accumulation_dtype(image_features.dtype)
    if mode == "pairwise":
        return _pairwise_bridge(augmented_image_features, image_features, text_features, t, acc)
    resolve_backend(backend, image_features.device, acc)  # fail early on a bad backend name
    if isinstance(t, Tensor) and t.dim() == 1:
        return _contrastive_bridge_per_sample_t(augmented_image_features, image_features, text_features, t, acc,
                                                backend)
    return _contrastive_bridge_scalar_t(augmented_image_features, image_features, text_features, t, acc, backend)


class BrownianBridgeLoss(nn.Module):
    """Module form of `brownian_bridge_loss`; ``forward(image, text, augmented_image, t=None)``.

    A `t` given to forward (e.g. per-sample positions drawn each step) overrides the one set at construction.
    """

    def __init__(self, t=0.25, mode: str = "pairwise", backend: str = "auto"):
        super().__init__()
        if mode not in BRIDGE_MODES:
            raise ValueError(f"mode must be one of {BRIDGE_MODES}, got {mode!r}")
        self.t = t
        self.mode = mode
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, augmented_image_features: Tensor,
                t=None) -> Tensor:
        return brownian_bridge_loss(image_features, text_features, augmented_image_features,
                                    self.t if t is None else t, mode=self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"t={self.t}, mode={self.mode!r}, backend={self.backend!r}"
