"""Latent-modality-structure losses (Jiang et al., CVPR 2023; docs/design.md#latent-structures), mmcl_fast vs the
dense PyTorch formulas.

open_clip has none of these losses, so the anchor of each is `dense`: what one writes from the paper's formulas
(N x N Gram and distance matrices, `cross_entropy`). Every loss gets unit-norm features (augmented views near
their originals) and fixed hyper-parameters (t, temperature); gradients flow to every feature tensor (and to the
per-sample bridge positions t_i). The float64 references are streamed over row blocks (the geometric-consistency
one through D x D Grams), never N x N.

    bridge               contrastive Brownian bridge, scalar t = 0.25     fused: 3 GEMM-eq. = 6 N M D
    bridge_per_sample_t  the same with per-sample t_i                     fused on 2D+3 features: 6 N M (2D+3)
    uniformity           log mean_jk exp(-t ||x_j - x_k||^2), t = 2       6 N M D
    separation           L_Ortho + 2 one-sided InfoNCE (tau 0.07) + 2 uniformity terms    24 N M D
    geometry             L_GC + L^a_GC through D x D Grams in float64      36 N D^2 (no N^2 work)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import (Impl, LossBench, always, block_rows, feature_generator, grad_stepper, itemsize,
                        mmcl_fast_unavailable, register_loss, rowdot64, streamed_lse64, unit_features)

BRIDGE_T = 0.25
TEMPERATURE = 0.07
UNIFORMITY_T = 2.0


# ---------------------------------------------------------------------------------------------
# inputs: float32 unit features from one seeded generator, rounded once to the bench dtype
# ---------------------------------------------------------------------------------------------

def _rounded(tensors: dict, dtype: torch.dtype) -> dict:
    return {name: t.to(dtype) if t.dim() == 2 else t for name, t in tensors.items()}


def _pair_inputs(n: int, d: int, dtype: torch.dtype, seed: int, *names: str) -> dict:
    gen = feature_generator(n, d, seed)
    image = unit_features(n, d, gen)
    text = unit_features(n, d, gen, near=image, noise=1.0)
    made = {"image": image, "text": text}
    if "augmented" in names:
        made["augmented"] = unit_features(n, d, gen, near=image, noise=0.3)
    if "t" in names:  # per-sample bridge positions, strictly inside (0, 1); kept in float32
        made["t"] = 0.1 + 0.8 * torch.rand(n, generator=gen)
    if "image_aug" in names:
        made["image_aug"] = unit_features(n, d, gen, near=image, noise=0.3)
        made["text_aug"] = unit_features(n, d, gen, near=text, noise=0.3)
    return _rounded(made, dtype)


def _bridge_inputs(n, d, dtype, seed):
    return _pair_inputs(n, d, dtype, seed, "augmented")


def _bridge_t_inputs(n, d, dtype, seed):
    return _pair_inputs(n, d, dtype, seed, "augmented", "t")


def _geometry_inputs(n, d, dtype, seed):
    return _pair_inputs(n, d, dtype, seed, "image_aug")


def _uniformity_inputs(n, d, dtype, seed):
    return _rounded({"x": unit_features(n, d, feature_generator(n, d, seed))}, dtype)


def _separation_inputs(n, d, dtype, seed):
    gen = feature_generator(n, d, seed)
    image = unit_features(n, d, gen)
    text = unit_features(n, d, gen, near=image, noise=1.0)
    image_indep, text_indep = unit_features(n, d, gen), unit_features(n, d, gen)
    return _rounded({"image": image, "text": text, "image_indep": image_indep, "text_indep": text_indep,
                     "image_indep_aug": unit_features(n, d, gen, near=image_indep, noise=0.3),
                     "text_indep_aug": unit_features(n, d, gen, near=text_indep, noise=0.3)}, dtype)


# ---------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------

def _bridge_reference(inputs: dict, params: dict) -> float:
    """mean_i (logsumexp_j d_ij - d_ii), d_ij = -||a_i - mu_j||^2 / (2 sigma^2), mu = t v + (1 - t) w, with the
    squared distance expanded into <a_i, mu_j> and the two squared norms (row / column bias)."""
    t = float(params["t"])
    image, text, aug = (inputs[k].double() for k in ("image", "text", "augmented"))
    bridge = t * image + (1 - t) * text
    inv_var = 1.0 / (t * (1 - t))
    row_lse, _ = streamed_lse64(aug, bridge, inv_var, row_bias=-0.5 * inv_var * (aug * aug).sum(1),
                                col_bias=-0.5 * inv_var * (bridge * bridge).sum(1))
    positives = -0.5 * inv_var * ((aug - bridge) ** 2).sum(1)
    return float((row_lse - positives).mean())


def _bridge_t_reference(inputs: dict, params: dict) -> float:
    """As `_bridge_reference` with mu_j(t_i) = t_i v_j + (1 - t_i) w_j: ||a_i - mu_j(t_i)||^2 expanded into
    <a_i, v_j>, <a_i, w_j> and per-pair norms, one block of rows at a time."""
    image, text, aug, t = (inputs[k].double() for k in ("image", "text", "augmented", "t"))
    n = image.shape[0]
    image_sq, text_sq, image_text = (image * image).sum(1), (text * text).sum(1), (image * text).sum(1)
    aug_sq = (aug * aug).sum(1)
    rows = block_rows(n)
    row_lse = torch.empty(n, dtype=torch.float64, device=image.device)
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        t_col, s_col = t[block, None], 1 - t[block, None]
        sq_dist = (aug_sq[block, None] - 2 * t_col * (aug[block] @ image.T) - 2 * s_col * (aug[block] @ text.T)
                   + t_col ** 2 * image_sq + 2 * t_col * s_col * image_text + s_col ** 2 * text_sq)
        row_lse[block] = torch.logsumexp(-sq_dist / (2 * t_col * s_col), dim=1)
    bridge = t[:, None] * image + (1 - t[:, None]) * text
    positives = -((aug - bridge) ** 2).sum(1) / (2 * t * (1 - t))
    return float((row_lse - positives).mean())


def _uniformity64(x: Tensor, t: float) -> Tensor:
    """log mean_jk exp(-t ||x_j - x_k||^2), -t ||x_j - x_k||^2 expanded into 2t <x_j, x_k> and two norms."""
    x = x.double()
    norm_bias = -t * (x * x).sum(1)
    row_lse, _ = streamed_lse64(x, x, 2 * t, row_bias=norm_bias, col_bias=norm_bias)
    return torch.logsumexp(row_lse, dim=0) - 2 * math.log(x.shape[0])


def _uniformity_reference(inputs: dict, params: dict) -> float:
    return float(_uniformity64(inputs["x"], float(params["t"])))


def _infonce64(query: Tensor, keys: Tensor, scale: float) -> Tensor:
    """mean_i CE(scale <q_i, k_.>, i): one-sided InfoNCE with the positives on the diagonal."""
    row_lse, _ = streamed_lse64(query, keys, scale)
    return (row_lse - scale * rowdot64(query, keys)).mean()


def _separation_reference(inputs: dict, params: dict) -> float:
    z = {k: v.double() for k, v in inputs.items()}
    tau, t = float(params["temperature"]), float(params["t"])
    ortho = (rowdot64(z["image"], z["image_indep"]) ** 2).mean() + (rowdot64(z["text"], z["text_indep"]) ** 2).mean()
    contrast = (_infonce64(z["image_indep"], z["image_indep_aug"], 1 / tau)
                + _infonce64(z["text_indep"], z["text_indep_aug"], 1 / tau))
    uniform = _uniformity64(z["image_indep"], t) + _uniformity64(z["text_indep"], t)
    return float(ortho + contrast + uniform)


def _geometry_reference(inputs: dict, params: dict) -> float:
    """L_GC + L^a_GC in float64 through D x D Grams (docs/design.md#geometric-consistency), accumulated over row blocks:

        sum_jk (<v_j,w_k> - <v_k,w_j>)^2 = 2 <V'V, W'W> - 2 tr((V'W)^2)
        ||V V' - W W'||_F^2 = ||V'V||^2 - 2 ||V'W||^2 + ||W'W||^2      (and the same for (V, A), (W, B))
    plus sum_j (<v_j, w_j> - <a_j, b_j>)^2, all over N."""
    image, text, image_aug, text_aug = (inputs[k] for k in ("image", "text", "image_aug", "text_aug"))
    n, d = image.shape
    pairs = {"vv": ("v", "v"), "ww": ("w", "w"), "vw": ("v", "w"), "aa": ("a", "a"), "bb": ("b", "b"),
             "va": ("v", "a"), "wb": ("w", "b")}
    grams = {key: torch.zeros(d, d, dtype=torch.float64, device=image.device) for key in pairs}
    diagonal = torch.zeros((), dtype=torch.float64, device=image.device)
    rows = block_rows(16 * d)  # four (rows, D) float64 blocks: a quarter of a reference block in all
    for start in range(0, n, rows):
        block = {name: tensor[start:start + rows].double()
                 for name, tensor in (("v", image), ("w", text), ("a", image_aug), ("b", text_aug))}
        for key, (left, right) in pairs.items():
            grams[key] += block[left].T @ block[right]
        diagonal += ((block["v"] * block["w"]).sum(1) - (block["a"] * block["b"]).sum(1)).square().sum()

    def sq(gram):
        return gram.square().sum()

    antisymmetric = 2 * (grams["vv"] * grams["ww"]).sum() - 2 * torch.trace(grams["vw"] @ grams["vw"])
    image_text = sq(grams["vv"]) - 2 * sq(grams["vw"]) + sq(grams["ww"])
    image_views = sq(grams["vv"]) - 2 * sq(grams["va"]) + sq(grams["aa"])
    text_views = sq(grams["ww"]) - 2 * sq(grams["wb"]) + sq(grams["bb"])
    return float((antisymmetric + image_text + image_views + text_views + diagonal) / n)


# ---------------------------------------------------------------------------------------------
# implementations: mmcl_fast and the dense formulas
# ---------------------------------------------------------------------------------------------

def _labels(logits: Tensor) -> Tensor:
    return torch.arange(logits.shape[0], device=logits.device)


def dense_bridge(image, text, augmented, t):
    bridge = t * image + (1 - t) * text
    logits = -torch.cdist(augmented, bridge) ** 2 / (2 * t * (1 - t))
    return F.cross_entropy(logits, _labels(logits))


def dense_bridge_per_sample_t(image, text, augmented, t):
    """-||a_i - (t_i v_j + (1 - t_i) w_j)||^2 / (2 sigma_i^2) expanded into N x N products (the (N, N, D)
    difference tensor itself would not fit)."""
    t_col, s_col = t[:, None], (1 - t)[:, None]
    cross = t_col * (augmented @ image.T) + s_col * (augmented @ text.T)
    bridge_sq = (t_col ** 2 * (image * image).sum(1) + 2 * t_col * s_col * (image * text).sum(1)
                 + s_col ** 2 * (text * text).sum(1))
    sq_dist = (augmented * augmented).sum(1)[:, None] - 2 * cross + bridge_sq
    logits = -sq_dist / (2 * t_col * s_col)
    return F.cross_entropy(logits, _labels(logits))


def dense_uniformity(x, t):
    return torch.log(torch.exp(-t * torch.cdist(x, x) ** 2).mean())


def dense_separation(image, text, image_indep, text_indep, image_indep_aug, text_indep_aug, temperature, t):
    ortho = ((image * image_indep).sum(1) ** 2 + (text * text_indep).sum(1) ** 2).mean()
    image_logits = image_indep @ image_indep_aug.T / temperature
    text_logits = text_indep @ text_indep_aug.T / temperature
    contrast = F.cross_entropy(image_logits, _labels(image_logits)) + F.cross_entropy(text_logits, _labels(text_logits))
    return ortho + contrast + dense_uniformity(image_indep, t) + dense_uniformity(text_indep, t)


def dense_geometry(image, text, image_aug, text_aug):
    n = image.shape[0]
    image_text = image @ text.T
    loss = ((image_text - image_text.T) ** 2).sum() + ((image @ image.T - text @ text.T) ** 2).sum()
    loss = loss + ((image @ image.T - image_aug @ image_aug.T) ** 2).sum()
    loss = loss + ((text @ text.T - text_aug @ text_aug.T) ** 2).sum()
    loss = loss + (((image * text).sum(1) - (image_aug * text_aug).sum(1)) ** 2).sum()
    return loss / n


def _mmcl_bridge(z, p, backend):
    import mmcl_fast
    return mmcl_fast.brownian_bridge_loss(z["image"], z["text"], z["augmented"], z.get("t", p.get("t")),
                                          mode="contrastive", backend=backend)


def _mmcl_uniformity(z, p, backend):
    import mmcl_fast
    return mmcl_fast.uniformity_loss(z["x"], p["t"], backend=backend)


def _mmcl_separation(z, p, backend):
    import mmcl_fast
    return mmcl_fast.feature_separation_loss(z["image"], z["text"], z["image_indep"], z["text_indep"],
                                             z["image_indep_aug"], z["text_indep_aug"], p["temperature"], p["t"],
                                             backend=backend)


def _mmcl_geometry(z, p, backend):
    import mmcl_fast  # Grams in float64 on any device: no backend choice
    return mmcl_fast.geometric_consistency_loss(z["image"], z["text"], z["image_aug"], z["text_aug"])


def _mmcl_fast_impl(loss_fn, api: str, n_features: int, widen: int = 1) -> Impl:
    def make_step(inputs: dict, params: dict, options: dict):
        backend = options.get("backend", "auto")
        return grad_stepper(lambda z, p: loss_fn(z, p, backend), inputs, params)

    def estimate_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
        # O(N D): each feature tensor's gradient + float32 working copies and accumulators (`widen`: the
        # per-sample bridge runs on 2D + 3 features)
        return widen * n_features * n * d * (itemsize(dtype) + 12)
    return Impl("mmcl_fast", f"mmcl_fast.{api} (streamed, never N x N)",
                make_step, estimate_bytes, mmcl_fast_unavailable, dense=False)


def _dense_impl(loss_fn, args, buffers: float, min_itemsize: int = 0) -> Impl:
    def make_step(inputs: dict, params: dict, options: dict):
        return grad_stepper(lambda z, p: loss_fn(*(z[a] if a in z else p[a] for a in args)), inputs, params)

    def estimate_bytes(n: int, m: int, d: int, dtype: torch.dtype) -> int:
        # measured peaks at N = 8192 (benchmarks/results/latent_losses_memory.json): `buffers` live N x M
        # matrices at the peak, in the dtype the formula computes in, + the feature gradients
        size = max(itemsize(dtype), min_itemsize)
        return int(buffers * n * m * size) + len(args) * n * d * itemsize(dtype)
    return Impl("dense", f"dense PyTorch formula ({loss_fn.__name__}: N x N matrices)", make_step, estimate_bytes,
                always, dense=True)


def _latent_loss(name, description, make_inputs, params, reference, flops, mmcl_impl, dense_impl) -> LossBench:
    return register_loss(LossBench(name=name, description=description, make_inputs=make_inputs, params=params,
                                   reference=reference, flops=flops,
                                   impls={"mmcl_fast": mmcl_impl, "dense": dense_impl}, anchor="dense"))


BRIDGE = _latent_loss(
    "bridge", f"contrastive Brownian-bridge loss, scalar t = {BRIDGE_T} (Jiang et al. 2023, Wang et al. 2022)",
    _bridge_inputs, {"t": BRIDGE_T}, _bridge_reference, lambda n, m, d: 6 * n * m * d,
    _mmcl_fast_impl(_mmcl_bridge, "brownian_bridge_loss(mode='contrastive')", 3),
    _dense_impl(dense_bridge, ("image", "text", "augmented", "t"), 5))
BRIDGE_PER_SAMPLE_T = _latent_loss(
    "bridge_per_sample_t", "contrastive Brownian-bridge loss with per-sample positions t_i (differentiable)",
    _bridge_t_inputs, {}, _bridge_t_reference, lambda n, m, d: 6 * n * m * (2 * d + 3),
    _mmcl_fast_impl(_mmcl_bridge, "brownian_bridge_loss(mode='contrastive')", 3, widen=2),
    _dense_impl(dense_bridge_per_sample_t, ("image", "text", "augmented", "t"), 8, min_itemsize=4))
UNIFORMITY = _latent_loss(
    "uniformity", f"uniformity log mean_jk exp(-t ||x_j - x_k||^2), t = {UNIFORMITY_T} (Wang & Isola 2020)",
    _uniformity_inputs, {"t": UNIFORMITY_T}, _uniformity_reference, lambda n, m, d: 6 * n * m * d,
    _mmcl_fast_impl(_mmcl_uniformity, "uniformity_loss", 1), _dense_impl(dense_uniformity, ("x", "t"), 5))
SEPARATION = _latent_loss(
    "separation", f"deep feature separation L_Ortho + L^i_Con (tau {TEMPERATURE}) + L^i_Uni (t {UNIFORMITY_T})",
    _separation_inputs, {"temperature": TEMPERATURE, "t": UNIFORMITY_T}, _separation_reference,
    lambda n, m, d: 24 * n * m * d, _mmcl_fast_impl(_mmcl_separation, "feature_separation_loss", 6),
    _dense_impl(dense_separation, ("image", "text", "image_indep", "text_indep", "image_indep_aug",
                                   "text_indep_aug", "temperature", "t"), 10))
GEOMETRY = _latent_loss(
    "geometry", "geometric consistency L_GC + L^a_GC (both augmented views), exact through D x D Grams",
    _geometry_inputs, {}, _geometry_reference, lambda n, m, d: 36 * n * d * d,
    _mmcl_fast_impl(_mmcl_geometry, "geometric_consistency_loss", 4),
    _dense_impl(dense_geometry, ("image", "text", "image_aug", "text_aug"), 7))
