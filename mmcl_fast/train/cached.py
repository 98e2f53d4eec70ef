"""Gradient-cached contrastive steps (SPEC §9): the batch is capped by the loss's O(N·D), not by the encoders.

    pass 1  (no autograd)  for each chunk k: record the RNG state, encode images_k then texts_k → cached features
    loss    (once)         L = loss_fn(X, Y, s[, b]) on detached copies; backward gives dL/dX, dL/dY, dL/ds, dL/db
    pass 2  (autograd)     for each chunk k: replay its RNG state, re-encode, backward(features_k, dL/dfeatures_k)

The parameter gradients are those of the ordinary step that encodes the same chunks in the same order with
autograd kept and computes the loss on their concatenation: for a deterministic model that is the plain full-batch
step; with dropout or patch dropout the replayed RNG gives pass 2 the masks of pass 1. Costs: the encoders run
twice (one extra forward per step), the loss once. Peak memory: one chunk's activations plus the N·D cached
features and their gradients, plus whatever the loss itself needs (O(N·D) with mmcl_fast's losses, N² with dense
ones).

Under DDP every chunk's backward but the last runs inside ``no_sync()``, so gradients are all-reduced once per
step; the logit scale/bias gradients travel through the last chunk's graph so that they are all-reduced too.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["grad_cached_step"]


class _RngState:
    """The CPU generator and the CUDA generators of `devices`: what dropout and patch dropout draw from."""

    def __init__(self, devices: tuple[torch.device, ...]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(device, torch.cuda.get_rng_state(device)) for device in devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


def _cuda_devices(*things) -> tuple[torch.device, ...]:
    devices = set()
    for thing in things:
        if isinstance(thing, Tensor) and thing.is_cuda:
            devices.add(thing.device)
        elif isinstance(thing, nn.Module):
            devices.update(p.device for p in thing.parameters() if p.is_cuda)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.device("cuda", torch.cuda.current_device()))
    return tuple(sorted(devices, key=lambda d: d.index if d.index is not None else -1))


def _unwrap(module):
    return module.module if isinstance(module, DistributedDataParallel) else module


def _parse_model_output(out) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """open_clip's forward: a dict (output_dict=True) or a tuple (image, text, logit_scale.exp()[, logit_bias])."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out.get("logit_scale"), out.get("logit_bias")
    if isinstance(out, (tuple, list)) and len(out) in (3, 4):
        return out[0], out[1], out[2], out[3] if len(out) == 4 else None
    raise TypeError("model(images, texts) must return open_clip's output: a dict with image_features, "
                    "text_features, logit_scale[, logit_bias] or a tuple (image_features, text_features, "
                    f"logit_scale[, logit_bias]); got {type(out).__name__}")


class _Encoders:
    """One interface over the two accepted forms: an open_clip-style model (maybe DDP) or a pair of encoders."""

    def __init__(self, model, logit_scale, logit_bias):
        if isinstance(model, (tuple, list)):
            if len(model) != 2 or not all(callable(enc) for enc in model):
                raise TypeError("model: a pair form must be (image_encoder, text_encoder), two callables; got "
                                f"a {type(model).__name__} of length {len(model)}")
            if logit_scale is None:
                raise ValueError("logit_scale: the pair-of-encoders form needs the scale the loss takes "
                                 "(already exponentiated, e.g. raw_scale.exp(), or a float)")
            self.image_encoder, self.text_encoder = model
            self.fixed_scale, self.fixed_bias = logit_scale, logit_bias
            self.ddp = [enc for enc in model if isinstance(enc, DistributedDataParallel)]
            self.modules = [_unwrap(enc) for enc in model if isinstance(enc, nn.Module)]
            self.pair = True
            return
        if not isinstance(model, nn.Module):
            raise TypeError("model must be an open_clip-style nn.Module (encode_image, encode_text, logit_scale) "
                            f"or a pair (image_encoder, text_encoder); got {type(model).__name__}")
        inner = _unwrap(model)
        missing = [name for name in ("encode_image", "encode_text", "logit_scale") if not hasattr(inner, name)]
        if missing:
            raise TypeError(f"model ({type(inner).__name__}) lacks {', '.join(missing)}: pass an open_clip-style "
                            "model or a pair (image_encoder, text_encoder) with logit_scale=")
        if logit_scale is not None or logit_bias is not None:
            raise ValueError("logit_scale / logit_bias: an open_clip-style model carries its own (model.logit_scale "
                             "as a log, model.logit_bias); pass them only with a pair of encoders")
        self.model, self.inner = model, inner
        self.ddp = [model] if isinstance(model, DistributedDataParallel) else []
        self.modules = [inner]
        self.pair = False

    def encode(self, images: Tensor, texts: Tensor):
        """(image_features, text_features, logit_scale, logit_bias) of one chunk, in the model's order."""
        if self.pair:
            return self.image_encoder(images), self.text_encoder(texts), self.fixed_scale, self.fixed_bias
        if self.ddp:  # through DDP's forward: it prepares the reducer for the synchronising backward
            return _parse_model_output(self.model(images, texts))
        image_features = self.inner.encode_image(images, normalize=True)
        text_features = self.inner.encode_text(texts, normalize=True)
        return image_features, text_features, self.inner.logit_scale.exp(), getattr(self.inner, "logit_bias", None)

    def no_sync(self):
        stack = contextlib.ExitStack()
        for module in self.ddp:
            stack.enter_context(module.no_sync())
        return stack


def _loss_leaf(value):
    """A detached copy of a scale/bias that records its gradient (None and Python numbers pass through).

    Pass 1 runs without autograd, so whether the scale needs a gradient is only known in pass 2: record it always.
    """
    if isinstance(value, Tensor):
        return value.detach().clone().requires_grad_(value.is_floating_point())
    return value


def _total(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and out and all(isinstance(v, Tensor) for v in out.values()):
        return sum(out.values())
    raise TypeError("loss_fn must return a tensor or a dict of tensors (output_dict=True); got "
                    f"{type(out).__name__}")


def _detached(out):
    return {k: v.detach() for k, v in out.items()} if isinstance(out, dict) else out.detach()


def _check_batch(images, texts, chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows per encoder call), got {chunk_size!r}")
    for name, batch in (("images", images), ("texts", texts)):
        if not isinstance(batch, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor batch, got {type(batch).__name__}")
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty batch (rows along dim 0), got shape {tuple(batch.shape)}")
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"images and texts must hold the same number of pairs, got {images.shape[0]} images and "
                         f"{texts.shape[0]} texts")
    return images.shape[0]


def grad_cached_step(model, images: Tensor, texts: Tensor, loss_fn: Callable, chunk_size: int, *,
                     logit_scale=None, logit_bias=None, autocast: Callable | None = None, scaler=None,
                     loss_kwargs: dict | None = None, check_replay: float | None = None):
    """One gradient-cached step: accumulate every parameter's gradient of ``loss_fn`` on the whole batch.

    Encoders run on ``chunk_size`` rows at a time; the loss runs once, on the whole batch. Gradients are
    accumulated into ``.grad`` as ``loss.backward()`` would (zero them before, step the optimizer after).

    Args:
        model: an open_clip-style model (``encode_image(x, normalize=True)``, ``encode_text(t, normalize=True)``,
            ``logit_scale`` stored as a log, optional ``logit_bias``), bare or wrapped in
            DistributedDataParallel (then its forward ``model(images, texts)`` is used and all chunks but the
            last run under ``no_sync()``); or a pair ``(image_encoder, text_encoder)`` of callables (modules or
            DDP modules), whose outputs go to the loss as they are.
        images, texts: the batch, N pairs along dim 0 (texts: token ids or any tensor the encoder takes).
        loss_fn: called once as ``loss_fn(image_features, text_features, logit_scale[, logit_bias],
            **loss_kwargs)`` with ``logit_scale`` exponentiated (open_clip convention); returns a tensor or a
            dict of tensors (summed for the backward). mmcl_fast's ClipLoss / SigLipLoss, open_clip's own, and
            their distributed forms (the loss then sees this rank's rows, as in a plain DDP step).
        chunk_size: rows per encoder call; peak activation memory is one chunk's.
        logit_scale, logit_bias: only with a pair of encoders: what the loss receives (a float, or a tensor, e.g.
            ``raw_scale.exp()``, whose graph gets the gradient).
        autocast: a factory of the context to encode and compute the loss in, e.g.
            ``functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)`` (an ambient autocast works too).
        scaler: a ``torch.amp.GradScaler``: gradients are those of ``scaler.scale(loss)``.
        loss_kwargs: extra keyword arguments of ``loss_fn`` (e.g. ``{"output_dict": True}``).
        check_replay: if set, raise when pass 2 re-encodes a chunk to features more than this far (max abs)
            from pass 1's, i.e. when the encoders' randomness is not replayed by the CPU/CUDA RNG states.

    Returns:
        What ``loss_fn`` returned, detached (unscaled).
    """
    n = _check_batch(images, texts, chunk_size)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if loss_kwargs is not None and not isinstance(loss_kwargs, dict):
        raise TypeError(f"loss_kwargs must be a dict, got {type(loss_kwargs).__name__}")
    encoders = _Encoders(model, logit_scale, logit_bias)
    amp = autocast if autocast is not None else contextlib.nullcontext
    bounds = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    devices = _cuda_devices(images, texts, *encoders.modules)

    # Pass 1 changes running statistics (batch norm) like any forward; pass 2 must start from the same values
    # so that they end as after one autograd pass.
    buffers = [(buf, buf.detach().clone()) for module in encoders.modules for buf in module.buffers()]

    # ---- pass 1: features of every chunk, no autograd graph kept
    chunk_rng, image_cache, text_cache = [], None, None
    scale, bias = None, None
    with torch.no_grad():
        for start, stop in bounds:
            chunk_rng.append(_RngState(devices))
            with amp():
                image_features, text_features, scale, bias = encoders.encode(images[start:stop], texts[start:stop])
            if image_cache is None:  # filled in place: no list of chunks next to a concatenated copy
                image_cache = image_features.new_empty((n,) + tuple(image_features.shape[1:]))
                text_cache = text_features.new_empty((n,) + tuple(text_features.shape[1:]))
            image_cache[start:stop] = image_features
            text_cache[start:stop] = text_features
            del image_features, text_features
    rng_after = _RngState(devices)  # where the autograd step would leave the generators
    with torch.no_grad():
        for buf, saved in buffers:
            buf.copy_(saved)
    del buffers

    # ---- the loss, once, on detached features
    image_cache.requires_grad_()
    text_cache.requires_grad_()
    scale_leaf, bias_leaf = _loss_leaf(scale), _loss_leaf(bias)
    with amp():
        args = (image_cache, text_cache, scale_leaf) + ((bias_leaf,) if bias is not None else ())
        out = loss_fn(*args, **(loss_kwargs or {}))
        total = _total(out)
    (scaler.scale(total) if scaler is not None else total).backward()
    image_grad, text_grad = image_cache.grad, text_cache.grad
    scale_grad = scale_leaf.grad if isinstance(scale_leaf, Tensor) else None
    bias_grad = bias_leaf.grad if isinstance(bias_leaf, Tensor) else None
    out = _detached(out)
    del total, args

    # ---- pass 2: replay each chunk's RNG, re-encode with autograd, backpropagate its slice of the cached gradient
    for index, (start, stop) in enumerate(bounds):
        last = index == len(bounds) - 1
        with contextlib.nullcontext() if last else encoders.no_sync():
            chunk_rng[index].restore()
            with amp():
                image_features, text_features, scale, bias = encoders.encode(images[start:stop], texts[start:stop])
            if check_replay is not None:
                _check_replay(index, image_features, image_cache[start:stop], "image", check_replay)
                _check_replay(index, text_features, text_cache[start:stop], "text", check_replay)
            outputs = [(image_features, None if image_grad is None else image_grad[start:stop]),
                       (text_features, None if text_grad is None else text_grad[start:stop])]
            if last:  # once per step, through the last chunk's graph (so that DDP all-reduces them too)
                outputs += [(scale, scale_grad), (bias, bias_grad)]
            pairs = [(t, g) for t, g in outputs if isinstance(t, Tensor) and t.requires_grad and g is not None]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])
            del image_features, text_features, outputs, pairs
    rng_after.restore()
    return out


def _check_replay(index: int, recomputed: Tensor, cached: Tensor, what: str, tol: float) -> None:
    diff = (recomputed.detach().float() - cached.detach().float()).abs().max().item()
    if not diff <= tol:
        raise RuntimeError(f"check_replay: pass 2 re-encoded the {what}s of chunk {index} to features {diff:.3e} "
                           f"(max abs) away from pass 1's (> {tol:g}): the encoder draws randomness that the "
                           "CPU/CUDA RNG states do not replay, or runs non-deterministic kernels")
