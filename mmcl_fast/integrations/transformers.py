"""Hugging Face transformers: mmcl_fast's exact, O(N·D) losses for CLIPModel, SiglipModel and Siglip2Model.

What ``model(**batch, return_loss=True).loss`` computes (transformers 4.x and 5.x), with f, g the pooled embeddings
of ``get_image_features`` / ``get_text_features``, t = model.logit_scale (stored as a log) and b = model.logit_bias
(SigLIP only):

    x_i = f_i / ||f_i||,  y_j = g_j / ||g_j||,  L_ij = exp(t) <x_i, y_j> (+ b)
    CLIPModel: ½ [CE(L, diag) + CE(L^T, diag)]      SiglipModel, Siglip2Model: -(1/N) sum_ij log sigmoid(z_ij L_ij)

The model materialises the N x N logits to get it; here the features go to `mmcl_fast.clip_loss` /
`mmcl_fast.siglip_loss` (or their `mmcl_fast.distributed` forms across ranks), which never do. Three entry points:

- `model_loss(model, batch)`: that loss, equal to the model's own (and, with world_size > 1, the loss of the batch
  concatenated across ranks);
- `grad_cached_step(model, pixel_values, text_batch, chunk_size=K)`: `mmcl_fast.train.grad_cached_step` on these
  models (the encoders run on K rows at a time, the loss once on the whole batch);
- `ContrastiveTrainer`: a `transformers.Trainer` whose `compute_loss` is `model_loss`.

Wrapped models (DistributedDataParallel, FSDP). DDP all-reduces gradients only after its own forward ran: its reducer
ignores the parameters' gradient hooks otherwise, so calling ``ddp.module.get_image_features`` directly leaves every
rank with its own, unreduced gradients. A wrapped model is therefore called through the wrapper: for the duration of
the call, the inner model's ``forward`` is routed to the feature computation (an instance attribute, restored
afterwards), so that DDP's forward, its reducer and its find_unused_parameters traversal run as in an ordinary step,
on a forward that builds no logits. FSDP1 / FSDP2 models take the same route (their forward unshards the
parameters); the tests cover DDP. `grad_cached_step` gives the model open_clip's interface the same way
(``encode_image``, ``encode_text`` and ``forward(images, texts)``) for the duration of the step, so that
`mmcl_fast.train.grad_cached_step` drives it unchanged (no_sync on all chunks but the last).

Importing this module imports transformers (and `ContrastiveTrainer` needs accelerate, as any Trainer);
``import mmcl_fast`` does not.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist
import transformers
from torch import Tensor

from .. import distributed
from ..losses.clip import clip_loss
from ..losses.siglip import siglip_loss
from ..train import cached

__all__ = ["ContrastiveTrainer", "grad_cached_step", "model_loss"]


@dataclass(frozen=True)
class _Family:
    """How a model class takes its batch, and which loss its ``return_loss=True`` computes."""

    loss: str                    # "clip" (softmax cross-entropy both ways) or "siglip" (sigmoid)
    image_keys: tuple[str, ...]  # forward arguments that go to get_image_features; the first one is required
    text_keys: tuple[str, ...]   # forward arguments that go to get_text_features; the first one is required


_TEXT_KEYS = ("input_ids", "attention_mask", "position_ids")
_CLIP = _Family("clip", ("pixel_values", "interpolate_pos_encoding"), _TEXT_KEYS)
_SIGLIP = _Family("siglip", ("pixel_values", "interpolate_pos_encoding"), _TEXT_KEYS)
# Siglip2 takes variable-resolution images as padded patch sequences: the mask and each image's patch grid
_SIGLIP2 = _Family("siglip", ("pixel_values", "pixel_attention_mask", "spatial_shapes"), _TEXT_KEYS)
# a flag of the model's forward, not an input of either tower (Trainer's evaluation reads it to ask for the loss)
_FLAG_KEYS = ("return_loss",)
_SUPPORTED = "a transformers CLIPModel, SiglipModel or Siglip2Model"


def _families() -> list:
    """(model class, family) of each supported class the installed transformers has (Siglip2 arrived in 4.49)."""
    names = (("CLIPModel", _CLIP), ("SiglipModel", _SIGLIP), ("Siglip2Model", _SIGLIP2))
    return [(getattr(transformers, name), family) for name, family in names if hasattr(transformers, name)]


def _resolve(model):
    """(the bare model under any DDP / FSDP wrapper, its family); TypeError naming `model` otherwise."""
    inner = cached._unwrap(model)
    for cls, family in _families():
        if isinstance(inner, cls):
            return inner, family
    raise TypeError(f"model must be {_SUPPORTED} (bare, or wrapped in DistributedDataParallel / FSDP), got "
                    f"{type(inner).__name__}")


def _tower_inputs(batch: Mapping, keys: tuple[str, ...], name: str, model_name: str) -> dict:
    """The entries of `batch` that one tower takes; ValueError naming `name` when the required one is missing."""
    if batch.get(keys[0]) is None:
        raise ValueError(f"{name} lacks {keys[0]!r}, which {model_name} needs (its tower takes {list(keys)}); got "
                         f"keys {sorted(batch)}")
    return {key: batch[key] for key in keys if batch.get(key) is not None}


def _split_batch(batch, family: _Family, model_name: str) -> tuple[dict, dict]:
    """A forward batch (dict / BatchEncoding / BatchFeature) as (image tower's inputs, text tower's inputs)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of the model's forward arguments (pixel_values, input_ids, ...: a "
                        f"dict or a processor's BatchEncoding), got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(family.image_keys) - set(family.text_keys) - set(_FLAG_KEYS))
    if unknown:
        raise ValueError(f"batch has key(s) {unknown} that {model_name}'s loss does not take: images take "
                         f"{list(family.image_keys)}, texts {list(family.text_keys)}")
    return (_tower_inputs(batch, family.image_keys, "batch", model_name),
            _tower_inputs(batch, family.text_keys, "batch", model_name))


def _one_tower(batch, keys: tuple[str, ...], name: str, model_name: str) -> dict:
    """One tower's batch for `grad_cached_step`: a tensor (its first key: pixel_values / input_ids) or a mapping."""
    if isinstance(batch, Tensor):
        return {keys[0]: batch}
    if not isinstance(batch, Mapping):
        raise TypeError(f"{name} must be a tensor ({keys[0]}) or a mapping of {list(keys)}, got "
                        f"{type(batch).__name__}")
    unknown = sorted(set(batch) - set(keys) - set(_FLAG_KEYS))
    if unknown:
        raise ValueError(f"{name} has key(s) {unknown} that {model_name}'s tower does not take: {list(keys)}")
    return _tower_inputs(batch, keys, name, model_name)


def _pooled(output, method: str) -> Tensor:
    """The embedding a get_*_features call returned: a tensor (transformers 4.x) or, in 5.x, the output object's
    pooler_output (a tuple (last_hidden_state, pooler_output, ...) under config.return_dict=False)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None and isinstance(output, tuple) and len(output) > 1:
        pooled = output[1]
    if not isinstance(pooled, Tensor):
        raise TypeError(f"model.{method} returned a {type(output).__name__} without a pooled embedding "
                        "(pooler_output)")
    return pooled


def _embeds(inner, method: str, inputs: Mapping, normalize: bool = True) -> Tensor:
    """One tower's embeddings, divided by their L2 norm as the model's forward does (normalize=True)."""
    features = _pooled(getattr(inner, method)(**inputs), method)
    return features / features.norm(p=2, dim=-1, keepdim=True) if normalize else features


def _outputs(inner, family: _Family, images: Mapping | None, texts: Mapping | None) -> dict:
    """open_clip's output dict of one call: the normalised features of the towers that got inputs (None for the
    other), the exponentiated scale and, for SigLIP, the bias, as 0-d tensors on the features' device."""
    image_features = None if images is None else _embeds(inner, "get_image_features", images)
    text_features = None if texts is None else _embeds(inner, "get_text_features", texts)
    device = (image_features if image_features is not None else text_features).device
    # a log stored 0-d (CLIP) or with shape (1,) (SigLIP)
    out = {"image_features": image_features, "text_features": text_features,
           "logit_scale": inner.logit_scale.exp().reshape(()).to(device)}
    if family.loss == "siglip":
        out["logit_bias"] = inner.logit_bias.reshape(()).to(device)
    return out


@contextlib.contextmanager
def _open_clip_interface(inner, family: _Family):
    """Give the bare model open_clip's interface for the duration of a call, as instance attributes that are
    restored afterwards: ``forward(images, texts)`` returning `_outputs` (what a DDP / FSDP wrapper then runs
    instead of the logits-building forward) and ``encode_image`` / ``encode_text(inputs, normalize=False)``."""
    interface = {
        "forward": lambda images=None, texts=None: _outputs(inner, family, images, texts),
        "encode_image": lambda images, normalize=False: _embeds(inner, "get_image_features", images, normalize),
        "encode_text": lambda texts, normalize=False: _embeds(inner, "get_text_features", texts, normalize),
    }
    # an attribute already on the instance (accelerate wraps forward this way for mixed precision) comes back after
    saved = {name: inner.__dict__[name] for name in interface if name in inner.__dict__}
    for name, method in interface.items():
        setattr(inner, name, method)
    try:
        yield
    finally:
        for name in interface:
            if name in saved:
                setattr(inner, name, saved[name])
            else:
                delattr(inner, name)


def _call(model, inner, family: _Family, images: dict, texts: dict) -> dict:
    """`_outputs` of the whole batch; through the wrapper's forward when the model is wrapped (module docstring)."""
    if not cached._is_wrapper(model):
        return _outputs(inner, family, images, texts)
    with _open_clip_interface(inner, family):
        return model(images, texts)


def _world_size(world_size, rank, group) -> int:
    """How many ranks the loss spans: the given one, or the group's size if torch.distributed is initialised."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        return dist.get_world_size(group) if initialised else 1
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int (or None: the group's size), got {world_size!r}")
    if world_size > 1 and not initialised:
        raise ValueError(f"world_size={world_size} needs torch.distributed initialised "
                         "(torch.distributed.init_process_group); use world_size=1 for a single process")
    if world_size == 1 and rank not in (None, 0):
        raise ValueError(f"rank={rank} was given with world_size=1")
    return world_size


def _fused_loss(family: _Family, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
                world_size: int, rank, group, backend: str) -> Tensor:
    """The mmcl_fast loss equal to the family's ``return_loss=True`` loss; across ranks, the global loss on every
    rank, carrying the gradient of this rank's share (see `model_loss`)."""
    if world_size == 1:
        loss = clip_loss if family.loss == "clip" else siglip_loss
        return loss(image_features, text_features, logit_scale, logit_bias, backend=backend)
    if family.loss == "clip":
        return distributed.clip_loss(image_features, text_features, logit_scale, logit_bias, local_loss=False,
                                     group=group, rank=rank, world_size=world_size, backend=backend)
    share = distributed.siglip_loss(image_features, text_features, logit_scale, logit_bias, group=group, rank=rank,
                                    world_size=world_size, backend=backend)
    # the mean of the shares is the global loss: report it on every rank, keep the share's gradient (as the CLIP
    # loss does with local_loss=False)
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total / world_size - share.detach())


def _loss_and_outputs(model, batch, *, world_size=None, rank=None, group=None, backend: str = "auto"):
    inner, family = _resolve(model)
    images, texts = _split_batch(batch, family, type(inner).__name__)
    world = _world_size(world_size, rank, group)
    out = _call(model, inner, family, images, texts)
    loss = _fused_loss(family, out["image_features"], out["text_features"], out["logit_scale"],
                       out.get("logit_bias"), world_size=world, rank=rank, group=group, backend=backend)
    return loss, out


def model_loss(model, batch, *, world_size: int | None = None, rank: int | None = None, group=None,
               backend: str = "auto") -> Tensor:
    """``model(**batch, return_loss=True).loss``, computed by mmcl_fast's fused losses: no N x N logits.

    Args:
        model: a transformers CLIPModel (CLIP loss), SiglipModel or Siglip2Model (sigmoid loss), bare or wrapped in
            DistributedDataParallel / FSDP (then called through the wrapper, see the module docstring).
        batch: the model's forward arguments, a dict or a processor's BatchEncoding: pixel_values (+
            interpolate_pos_encoding; for Siglip2 pixel_attention_mask and spatial_shapes) and input_ids (+
            attention_mask, position_ids). A return_loss entry is ignored.
        world_size: 1 for the loss of this process's batch; > 1 for the loss of the batch concatenated across the
            ranks of `group` (every rank calls it with its own pairs; needs torch.distributed initialised). None:
            the group's size if torch.distributed is initialised, else 1.
        rank: this process's rank in `group` (checked).
        group: the process group (default: the global one).
        backend: the loss's backend ("auto", or a name as in `mmcl_fast.clip_loss`).

    Returns:
        The 0-d loss (float32 for float32 / bf16 / fp16 features, float64 for float64). Across ranks every rank
        returns the global loss, whose backward gives this rank's share of the gradient: with DDP's averaging (or
        ``(loss / world_size).backward()`` summed over ranks) every parameter gradient equals the single-process
        gradient of the global loss, i.e. of ``model(**concatenated_batch, return_loss=True).loss``, as in
        `mmcl_fast.distributed.clip_loss` / `siglip_loss`'s "Gradient semantics". Every rank must run the backward.
    """
    return _loss_and_outputs(model, batch, world_size=world_size, rank=rank, group=group, backend=backend)[0]


def grad_cached_step(model, pixel_values, text_batch, loss_fn=None, chunk_size: int | tuple | None = None, *,
                     world_size: int | None = None, rank: int | None = None, group=None, backend: str = "auto",
                     **step_kwargs):
    """`mmcl_fast.train.grad_cached_step` on a CLIPModel / SiglipModel / Siglip2Model: the encoders run on
    `chunk_size` rows at a time, the loss once on the whole batch; every parameter's ``.grad`` accumulates the
    gradient of the whole batch's loss, as ``model_loss(model, batch).backward()`` would.

    Args:
        model: as in `model_loss`, bare or DDP / FSDP-wrapped (all chunks but the last then run without gradient
            synchronisation). For the duration of the step the bare model carries open_clip's interface (module
            docstring), so that logit_scale (exponentiated) and logit_bias are read from it and get gradients.
        pixel_values: the images, N rows: the pixel_values tensor, or a mapping of the image tower's inputs
            (Siglip2: pixel_values, pixel_attention_mask, spatial_shapes), sliced row-wise.
        text_batch: the texts, N rows: a tokenizer's dict / BatchEncoding (input_ids, attention_mask,
            position_ids) or the input_ids tensor.
        loss_fn: called once as ``loss_fn(image_features, text_features, logit_scale[, logit_bias])`` on the
            normalised features; default: the loss of `model_loss` (`mmcl_fast.clip_loss` for CLIPModel,
            `mmcl_fast.siglip_loss` for SigLIP, their distributed forms across ranks).
        chunk_size: rows per encoder call (required), or a pair (image rows, text rows).
        world_size: the default loss's, as in `model_loss` (unused with a `loss_fn`).
        rank: as in `model_loss` (unused with a `loss_fn`).
        group: as in `model_loss` (unused with a `loss_fn`).
        backend: as in `model_loss` (unused with a `loss_fn`).
        step_kwargs: autocast, scaler, loss_kwargs, check_replay of `mmcl_fast.train.grad_cached_step`.

    Returns:
        The loss, detached. Dropout masks are those of an autograd pass over the same chunks (the RNG is replayed);
        with dropout off (transformers' default for these configs) the gradients are the plain full-batch step's.
    """
    inner, family = _resolve(model)
    model_name = type(inner).__name__
    if chunk_size is None:
        raise ValueError("chunk_size is required: rows per encoder call (an int, or a pair (image rows, text rows))")
    for name in ("logit_scale", "logit_bias"):
        if name in step_kwargs:
            raise ValueError(f"{name}: read from the model (model.{name}), not passed")
    images = _one_tower(pixel_values, family.image_keys, "pixel_values", model_name)
    texts = _one_tower(text_batch, family.text_keys, "text_batch", model_name)
    if loss_fn is None:
        loss_fn = functools.partial(_fused_loss, family, world_size=_world_size(world_size, rank, group), rank=rank,
                                    group=group, backend=backend)
    with _open_clip_interface(inner, family):
        return cached.grad_cached_step(model, images, texts, loss_fn, chunk_size, **step_kwargs)


class ContrastiveTrainer(transformers.Trainer):
    """`transformers.Trainer` for CLIPModel / SiglipModel / Siglip2Model whose loss is `model_loss`: the model's own
    contrastive loss without its N x N logits and, when ``args.world_size > 1``, over the batch concatenated across
    the data-parallel ranks (every rank's pairs are negatives of every other rank's), with the gradients of that
    global loss after DDP's averaging.

    Batches are the model's forward arguments (pixel_values, input_ids, attention_mask, ...); a collator may add
    ``return_loss=True``, which Trainer's evaluation reads to ask for the loss. The loss is a per-batch mean, so with
    gradient accumulation Trainer divides it by the accumulation steps, as it does for the model's own loss (each
    micro-batch is its own contrastive batch, as on the default path). Mixed precision: the features are computed
    under the accelerator's autocast (Trainer otherwise gets it from accelerate's wrapper of ``model.forward``,
    which `model_loss` does not call). ``loss_backend`` picks the loss's backend.
    """

    loss_is_scaled_for_ga = False  # a per-batch mean (see above); read by transformers >= 5

    def __init__(self, *args, loss_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_backend = loss_backend

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        with self.accelerator.autocast():
            loss, out = _loss_and_outputs(model, inputs, world_size=self.args.world_size, backend=self.loss_backend)
        if return_outputs:  # what the model's output names them: evaluation collects them as predictions
            return loss, {"image_embeds": out["image_features"], "text_embeds": out["text_features"]}
        return loss
