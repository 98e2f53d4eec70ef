"""CLIP / symmetric InfoNCE (docs/design.md#clip): `clip_loss` and `ClipLoss`, an exact drop-in for open_clip's
ClipLoss."""
from __future__ import annotations

from torch import Tensor, nn

from .._autocast import autocast_off
from .._validate import check_features, check_labels, check_rank_world, check_scalar
from .infonce import _infonce_from_affine, affine_logits


@autocast_off
def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
              image_labels: Tensor | None = None, text_labels: Tensor | None = None,
              label_smoothing: float = 0.0, backend: str = "auto") -> Tensor:
    """Symmetric CLIP loss ½ [CE(logits, image_labels) + CE(logits.T, text_labels)], exact, O((N + M) D) memory.

    logits = logit_scale * image_features @ text_features.T (+ logit_bias), never materialised.

    Args:
        image_features: (N, D); text_features: (M, D); same dtype (float32 / bfloat16 / float16 / float64)
            and device. Any strides.
        logit_scale: the already-exponentiated scale (open_clip convention): float or 0-d tensor, may need grad.
        logit_bias: optional float or 0-d tensor added to every logit (may need grad).
        image_labels: (N,) index of each image's caption in text_features (default: diagonal, needs N == M).
        text_labels: (M,) index of each caption's image (default: diagonal). With labels N and M may differ,
            e.g. five captions per image.
        label_smoothing: as in `torch.nn.functional.cross_entropy`.
        backend: "auto" (compiled CPU kernel / Triton on CUDA / blocked torch for float64 and other devices)
            or a backend name: "reference" | "torch" | "cpu" | "triton".

    Returns:
        0-d tensor, float32 for float32/bf16/fp16 features (float64 for float64).
    """
    check_features(image_features, "image_features", text_features, "text_features")
    n, m = image_features.shape[0], text_features.shape[0]
    logit_scale = check_scalar(logit_scale, "logit_scale", image_features)
    if logit_bias is not None:
        logit_bias = check_scalar(logit_bias, "logit_bias", image_features)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if n != m and (image_labels is None or text_labels is None):
        raise ValueError(f"image_features has {n} rows and text_features has {m}: unequal batch sizes need "
                         "both image_labels and text_labels")
    if image_labels is not None:
        image_labels = check_labels(image_labels, "image_labels", n, m, image_features)
    if text_labels is not None:
        text_labels = check_labels(text_labels, "text_labels", m, n, image_features)
    logits = affine_logits(image_features, text_features, logit_scale, None, logit_bias, "dot")
    return _infonce_from_affine(logits, image_labels, text_labels, True, float(label_smoothing), "mean",
                                backend)


class ClipLoss(nn.Module):
    """Exact, memory-efficient drop-in for `open_clip.loss.ClipLoss`.

    Same constructor and forward signature. With world_size == 1 the result equals open_clip's loss (to float
    rounding) without the N x N logits. With world_size > 1 the cross-rank path of `mmcl_fast.distributed`
    computes the exact global loss (see its docstring for the DDP gradient semantics); gather_with_grad is accepted
    and irrelevant (every cross-rank gradient is exact). Extra keywords: dist_impl ("ring", the default: per-rank
    memory independent of the world size; or "gather"), equal_batches (promise equal local batches: the ranks'
    sizes and configuration are checked once instead of on every call) and backend.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, backend: str = "auto",
                 dist_impl: str | None = None, equal_batches: bool = False):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("use_horovod=True is not supported; use torch.distributed")
        check_rank_world(rank, world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: labels are never materialised here
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        from ..distributed import CLIP_DIST_IMPLS
        if dist_impl is not None and dist_impl not in CLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {CLIP_DIST_IMPLS} (or None for the default), got {dist_impl!r}")
        self.dist_impl = dist_impl
        self.equal_batches = equal_batches

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        if self.world_size > 1:
            from .. import distributed
            loss = distributed.clip_loss(image_features, text_features, logit_scale, logit_bias,
                                         local_loss=self.local_loss, dist_impl=self.dist_impl,
                                         equal_batches=self.equal_batches, rank=self.rank,
                                         world_size=self.world_size, backend=self.backend)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
