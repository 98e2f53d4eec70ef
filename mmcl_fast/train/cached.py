"""Gradient-cached contrastive steps (docs/design.md#gradient-caching): the batch is capped by the loss's O(N·D),
not by the encoders.

    pass 1  (no autograd)  for each chunk k: record the RNG state, encode images_k then texts_k → cached features
    loss    (once)         L = loss_fn(X, Y, s[, b]) on detached copies; backward gives dL/dX, dL/dY, dL/ds, dL/db
    pass 2  (autograd)     for each chunk k: replay its RNG state, re-encode, backward(features_k, dL/dfeatures_k)

The parameter gradients are those of the ordinary step that encodes the same chunks in the same order with
autograd kept and computes the loss on their concatenation: for a deterministic model that is the plain full-batch
step; with dropout or patch dropout the replayed RNG gives pass 2 the masks of pass 1. Costs: the encoders run
twice (one extra forward per step), the loss once. Peak memory: one chunk's activations plus the N·D cached
features and their gradients, plus whatever the loss itself needs (O(N·D) with mmcl_fast's losses, N² with dense
ones).

Under DDP and FSDP every chunk's backward but the last runs without gradient synchronisation (DDP / FSDP1
``no_sync()``, FSDP2 ``set_requires_gradient_sync(False)``), so gradients are reduced once per step; the logit
scale/bias gradients travel through the last chunk's graph so that they are reduced too. Wrapped models are
called through the wrapper's forward (``model(images, texts)``), which is what unshards FSDP parameters.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

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


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch without distributed support
        return ()
    return FullyShardedDataParallel


def _fsdp2_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return ()
    return FSDPModule


def _is_wrapper(module) -> bool:
    """DDP and FSDP1 wrap the model (the wrapper's forward must run); FSDP2 turns the module itself into an
    FSDPModule whose forward hooks unshard its parameters (calling a method of it directly would skip them)."""
    return isinstance(module, (DistributedDataParallel, _fsdp1_class(), _fsdp2_class()))


def _unwrap(module):
    if isinstance(module, (DistributedDataParallel, _fsdp1_class())):
        return module.module
    return module


class _GradientSync:
    """Turns gradient synchronisation off for a chunk's backward (on for the last): DDP and FSDP1 through
    ``no_sync()``, FSDP2 through ``set_requires_gradient_sync`` on every FSDP module of the model."""

    def __init__(self, modules):
        self.no_sync = [m for m in modules if isinstance(m, (DistributedDataParallel, _fsdp1_class()))]
        fsdp2 = _fsdp2_class()
        self.fsdp2 = [sub for m in modules if isinstance(m, nn.Module) for sub in m.modules()
                      if fsdp2 and isinstance(sub, fsdp2)]

    @contextlib.contextmanager
    def off(self):
        with contextlib.ExitStack() as stack:
            for module in self.no_sync:
                stack.enter_context(module.no_sync())
            for module in self.fsdp2:
                module.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for module in self.fsdp2:
                    module.set_requires_gradient_sync(True, recurse=False)


def _parse_model_output(out) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """open_clip's forward: a dict (output_dict=True) or a tuple (image, text, logit_scale.exp()[, logit_bias])."""
    if isinstance(out, dict):
        return out.get("image_features"), out.get("text_features"), out.get("logit_scale"), out.get("logit_bias")
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
            self.sync = _GradientSync([enc for enc in model if isinstance(enc, nn.Module)])
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
        self.sync = _GradientSync([model])
        self.wrapped = _is_wrapper(model)
        self.modules = [inner]
        self.pair = False

    def encode(self, images, texts):
        """(image_features, text_features, logit_scale, logit_bias) of one chunk, in the model's order; a tower whose
        chunk is None (per-tower chunk sizes) gives None."""
        if self.pair:
            return (None if images is None else self.image_encoder(images),
                    None if texts is None else self.text_encoder(texts), self.fixed_scale, self.fixed_bias)
        if self.wrapped:
            # through the wrapper's forward: DDP prepares its reducer there, FSDP unshards the parameters
            return _parse_model_output(self.model(images, texts))
        image_features = None if images is None else self.inner.encode_image(images, normalize=True)
        text_features = None if texts is None else self.inner.encode_text(texts, normalize=True)
        return image_features, text_features, self.inner.logit_scale.exp(), getattr(self.inner, "logit_bias", None)

    def no_sync(self):
        return self.sync.off()


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


def _batch_rows(batch, name: str) -> int:
    """Rows of a batch: a tensor (dim 0) or a mapping of tensors (a tokenizer's dict / BatchEncoding), all of the
    same length along dim 0."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty batch (rows along dim 0), got shape {tuple(batch.shape)}")
        return batch.shape[0]
    if isinstance(batch, Mapping) and batch:
        lengths = {key: value.shape[0] for key, value in batch.items() if isinstance(value, Tensor) and value.dim()}
        if not lengths or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"{name}: a mapping batch needs tensors with the same non-zero length along dim 0, got "
                             f"lengths {lengths}")
        return next(iter(lengths.values()))
    raise TypeError(f"{name} must be a torch.Tensor batch or a mapping of tensors (e.g. a tokenizer's "
                    f"BatchEncoding), got {type(batch).__name__}")


def _rows(batch, start: int, stop: int):
    """Rows [start, stop) of a tensor or of every tensor of a mapping (the mapping's own type where it allows)."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    sliced = {key: value[start:stop] if isinstance(value, Tensor) and value.dim() else value
              for key, value in batch.items()}
    try:
        return type(batch)(sliced)
    except TypeError:
        return sliced


def _chunk_sizes(chunk_size) -> tuple[int, int]:
    """(image rows, text rows) per encoder call: one int for both towers or a pair."""
    pair = chunk_size if isinstance(chunk_size, (tuple, list)) else (chunk_size, chunk_size)
    if len(pair) != 2 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in pair):
        raise ValueError("chunk_size must be a positive int (rows per encoder call) or a pair (image rows, text rows)"
                         f", got {chunk_size!r}")
    return pair[0], pair[1]


def _check_batch(images, texts, chunk_size) -> int:
    _chunk_sizes(chunk_size)
    n_images, n_texts = _batch_rows(images, "images"), _batch_rows(texts, "texts")
    if n_images != n_texts:
        raise ValueError(f"images and texts must hold the same number of pairs, got {n_images} images and "
                         f"{n_texts} texts")
    return n_images


def _schedule(n: int, image_rows: int, text_rows: int) -> list:
    """Per encoder call: (image chunk bounds or None, text chunk bounds or None). With different chunk sizes the
    towers' chunks are right-aligned, so that the last call (the synchronising one under DDP / FSDP) holds the last
    chunk of both towers."""
    image_bounds = [(start, min(start + image_rows, n)) for start in range(0, n, image_rows)]
    text_bounds = [(start, min(start + text_rows, n)) for start in range(0, n, text_rows)]
    steps = max(len(image_bounds), len(text_bounds))
    image_bounds = [None] * (steps - len(image_bounds)) + image_bounds
    text_bounds = [None] * (steps - len(text_bounds)) + text_bounds
    return list(zip(image_bounds, text_bounds))


def grad_cached_step(model, images: Tensor, texts: Tensor, loss_fn: Callable, chunk_size: int, *,
                     logit_scale=None, logit_bias=None, autocast: Callable | None = None, scaler=None,
                     loss_kwargs: dict | None = None, check_replay: float | None = None):
    """One gradient-cached step: accumulate every parameter's gradient of ``loss_fn`` on the whole batch.

    Encoders run on ``chunk_size`` rows at a time; the loss runs once, on the whole batch. Gradients are
    accumulated into ``.grad`` as ``loss.backward()`` would (zero them before, step the optimizer after).

    Args:
        model: an open_clip-style model (``encode_image(x, normalize=True)``, ``encode_text(t, normalize=True)``,
            ``logit_scale`` stored as a log, optional ``logit_bias``), bare, wrapped in DistributedDataParallel or
            FSDP1, or sharded with FSDP2 ``fully_shard`` (then its forward ``model(images, texts)`` is used, with
            None for a tower that has no chunk in a call, and all chunks but the last run without gradient
            synchronisation); or a pair ``(image_encoder, text_encoder)`` of callables (modules, DDP / FSDP
            modules), whose outputs go to the loss as they are.
        images: the batch's images, N along dim 0: a tensor, or a mapping of tensors, sliced row-wise per chunk.
        texts: the batch's texts, N along dim 0: a tensor, or a mapping of tensors (e.g. a tokenizer's
            BatchEncoding with input_ids and attention_mask), sliced row-wise for each chunk.
        loss_fn: called once as ``loss_fn(image_features, text_features, logit_scale[, logit_bias],
            **loss_kwargs)`` with ``logit_scale`` exponentiated (open_clip convention); returns a tensor or a
            dict of tensors (summed for the backward). mmcl_fast's ClipLoss / SigLipLoss, open_clip's own, and
            their distributed forms (the loss then sees this rank's rows, as in a plain DDP step).
        chunk_size: rows per encoder call (peak activation memory is one chunk's), or a pair (image rows, text
            rows) when the towers' activations differ in size.
        logit_scale: only with a pair of encoders: what the loss receives (a float, or a tensor, e.g.
            ``raw_scale.exp()``, whose graph gets the gradient).
        logit_bias: only with a pair of encoders: the loss's bias (a float or a tensor), or None.
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
    calls = _schedule(n, *_chunk_sizes(chunk_size))
    tensors = [t for batch in (images, texts) for t in ([batch] if isinstance(batch, Tensor) else batch.values())]
    devices = _cuda_devices(*tensors, *encoders.modules)

    # Pass 1 changes running statistics (batch norm) like any forward; pass 2 must start from the same values
    # so that they end as after one autograd pass.
    buffers = [(buf, buf.detach().clone()) for module in encoders.modules for buf in module.buffers()]

    # ---- pass 1: features of every chunk, no autograd graph kept
    chunk_rng, image_cache, text_cache = [], None, None
    scale, bias = None, None
    with torch.no_grad():
        for image_span, text_span in calls:
            chunk_rng.append(_RngState(devices))
            with amp():
                image_features, text_features, scale, bias = encoders.encode(
                    None if image_span is None else _rows(images, *image_span),
                    None if text_span is None else _rows(texts, *text_span))
            # filled in place: no list of chunks next to a concatenated copy
            if image_span is not None:
                if image_cache is None:
                    image_cache = image_features.new_empty((n,) + tuple(image_features.shape[1:]))
                image_cache[slice(*image_span)] = image_features
            if text_span is not None:
                if text_cache is None:
                    text_cache = text_features.new_empty((n,) + tuple(text_features.shape[1:]))
                text_cache[slice(*text_span)] = text_features
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
    for index, (image_span, text_span) in enumerate(calls):
        last = index == len(calls) - 1
        with contextlib.nullcontext() if last else encoders.no_sync():
            chunk_rng[index].restore()
            with amp():
                image_features, text_features, scale, bias = encoders.encode(
                    None if image_span is None else _rows(images, *image_span),
                    None if text_span is None else _rows(texts, *text_span))
            outputs = []
            for features, span, cache, grad, what in ((image_features, image_span, image_cache, image_grad, "image"),
                                                      (text_features, text_span, text_cache, text_grad, "text")):
                if span is None:
                    continue
                if check_replay is not None:
                    _check_replay(index, features, cache[slice(*span)], what, check_replay)
                outputs.append((features, None if grad is None else grad[slice(*span)]))
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
