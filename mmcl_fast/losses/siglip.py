"""SigLIP, the sigmoid contrastive loss (docs/design.md#siglip): `siglip_loss` and `SigLipLoss`, an exact drop-in
for open_clip's.

    L_ij = s <x_i, y_j> + b,   z_ij = +1 for a positive pair (default i == j), -1 otherwise
    loss = -(1/N) sum_ij log sigmoid(z_ij L_ij)          (N = number of images, open_clip's normalisation)

The gradient weight -z_ij sigmoid(-z_ij L_ij) / N of an entry is known as soon as its logit is, so the fused kernels
compute the loss and its gradients in one sweep over tiles of the similarity matrix: 3 N*M*D GEMM-equivalents for
forward + backward (1 without gradients), O((N + M) D) memory, never N x M.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._autocast import autocast_off
from .._numerics import accumulation_dtype
from .._ops import sigmoid_stats
from .._validate import as_vector, check_features, check_rank_world, check_scalar

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def positive_columns(positives, n: int, m: int, device: torch.device) -> Tensor:
    """The positives as an (N, K) int64 table of each image's positive text indices, ascending, -1 padded.

    positives: None (image i <-> text i; needs N == M); an (M,) integer tensor of per-text image labels (text j is a
    positive of image labels[j], e.g. several captions per image); or a (P, 2) integer tensor of (image index, text
    index) pairs (any bipartite relation; a pair listed twice counts once).
    """
    if positives is None:
        if n != m:
            raise ValueError(f"image_features has {n} rows and text_features has {m}: unequal batch sizes need "
                             "`positives` (per-text image labels or (image, text) pairs)")
        return torch.arange(n, device=device)[:, None]
    if not isinstance(positives, Tensor):
        raise TypeError(f"positives must be None or an integer torch.Tensor, got {type(positives).__name__}")
    if positives.dtype not in _INDEX_DTYPES:
        raise TypeError(f"positives must hold integer indices, got {positives.dtype}")
    if positives.device != device:
        raise ValueError(f"positives is on {positives.device} but the features are on {device}")
    if positives.dim() == 1:
        if positives.shape[0] != m:
            raise ValueError(f"positives as per-text image labels must have shape ({m},) (one per text), got "
                             f"{tuple(positives.shape)}")
        rows, cols = positives.long(), torch.arange(m, device=device)
    elif positives.dim() == 2 and positives.shape[1] == 2:
        rows, cols = positives[:, 0].long(), positives[:, 1].long()
    else:
        raise ValueError("positives must be an (M,) tensor of per-text image labels or a (P, 2) tensor of "
                         f"(image index, text index) pairs, got shape {tuple(positives.shape)}")
    if rows.numel():
        if bool((rows < 0).any()) or bool((rows >= n).any()):
            raise ValueError(f"positives: image indices must lie in [0, {n}), got values in "
                             f"[{int(rows.min())}, {int(rows.max())}]")
        if bool((cols < 0).any()) or bool((cols >= m).any()):
            raise ValueError(f"positives: text indices must lie in [0, {m}), got values in "
                             f"[{int(cols.min())}, {int(cols.max())}]")
    keys = torch.unique(rows * m + cols)  # sorted: by image, then by text; duplicates dropped
    rows, cols = keys // m, keys % m
    counts = torch.bincount(rows, minlength=n)
    width = max(int(counts.max()) if rows.numel() else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    table = torch.full((n, width), -1, dtype=torch.int64, device=device)
    table[rows, torch.arange(keys.numel(), device=device) - starts[rows]] = cols
    return table


@autocast_off
def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *, positives=None,
                backend: str = "auto") -> Tensor:
    """Sigmoid loss -(1/N) sum_ij log sigmoid(z_ij (logit_scale <x_i, y_j> + logit_bias)), exact, O((N + M) D) memory.

    Args:
        image_features: (N, D); text_features: (M, D); same dtype (float32 / bfloat16 / float16 / float64) and
            device. Any strides.
        logit_scale: the already-exponentiated scale (open_clip convention): float or 0-d tensor, may need grad.
        logit_bias: float or 0-d tensor (may need grad); None means 0.
        positives: which pairs have z = +1 (see `positive_columns`): None (the diagonal, N == M), (M,) per-text
            image labels, or (P, 2) (image, text) index pairs. N and M may differ with the last two.
        backend: "auto" (compiled CPU kernel / Triton on CUDA / blocked torch for float64 and other devices)
            or a backend name: "reference" | "torch" | "cpu" | "triton".

    Returns:
        0-d tensor, float32 for float32/bf16/fp16 features (float64 for float64), normalised by N as open_clip's.
    """
    check_features(image_features, "image_features", text_features, "text_features")
    n, m = image_features.shape[0], text_features.shape[0]
    logit_scale = check_scalar(logit_scale, "logit_scale", image_features)
    logit_bias = 0.0 if logit_bias is None else check_scalar(logit_bias, "logit_bias", image_features)
    pos_cols = positive_columns(positives, n, m, image_features.device)
    acc = accumulation_dtype(image_features.dtype)
    scale = as_vector(logit_scale, n, "logit_scale", image_features, acc)
    row_bias = as_vector(logit_bias, n, "logit_bias", image_features, acc)
    col_bias = torch.zeros(m, dtype=acc, device=image_features.device)
    total = sigmoid_stats(image_features, text_features, scale, row_bias, col_bias, pos_cols, backend=backend)
    return total / n


class SigLipLoss(nn.Module):
    """Exact, memory-efficient drop-in for `open_clip.loss.SigLipLoss`.

    Same constructor and forward signature. With world_size == 1 the result equals open_clip's loss (to float
    rounding) without the N x N logits. With world_size > 1 every rank passes its local batch; the text blocks of the
    other ranks reach it by the `dist_impl` open_clip names ("bidir", "shift": a ring of neighbour exchanges;
    "reduce": per-rank broadcasts; "gather": one all-gather), and each block is one fused sweep. See
    `mmcl_fast.distributed.siglip_loss` for the loss and gradient semantics under DDP. Every mode computes all
    gradients in its one forward sweep and returns the text gradients to their owners in fp32; per-rank memory is
    independent of the world size except with "gather". equal_batches: as in `ClipLoss`.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 backend: str = "auto", equal_batches: bool = False):
        super().__init__()
        from ..distributed import SIGLIP_DIST_IMPLS
        check_rank_world(rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS} (or None for 'bidir'), got {dist_impl!r}")
        self.cache_labels = cache_labels  # accepted for compatibility: labels are never materialised here
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend
        self.equal_batches = equal_batches

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, output_dict: bool = False):
        if self.world_size > 1:
            from .. import distributed
            loss = distributed.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                           dist_impl=self.dist_impl, equal_batches=self.equal_batches,
                                           rank=self.rank, world_size=self.world_size, backend=self.backend)
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
