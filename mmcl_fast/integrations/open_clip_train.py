"""Run open_clip's training script with mmcl_fast's loss and gradient-cached steps, without forking it.

    python -m mmcl_fast.integrations.open_clip_train <open_clip_train's own arguments> --mmcl-chunk K

Two in-process patches of the `open_clip_train` package (open_clip_torch's `training` extra), nothing copied:

- `create_loss`: mmcl_fast's ClipLoss with open_clip's flags (local_loss, gather_with_grad, rank, world_size),
  or mmcl_fast's SigLipLoss under `--siglip`;
- `train_one_epoch` (with `--mmcl-chunk K`): open_clip's own epoch loop runs unchanged, but its model call hands
  the raw batch to the loss, and the loss runs `mmcl_fast.train.grad_cached_step` (encoders on K rows at a time,
  the loss once on the whole batch, RNG replayed). The loop's own `backward(total_loss, scaler)` then has nothing
  left to do, and its optimizer step, clipping, logit-scale clamp and logging see the gradients and losses as
  they would after an ordinary step. `--batch-size` is the per-rank batch of the loss; `--accum-freq` is
  replaced (and refused alongside `--mmcl-chunk`).

Without `--mmcl-chunk` only the loss is replaced.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import torch
from torch import Tensor, nn

from ..train.cached import grad_cached_step


class _Batch:
    """Stands in for a feature tensor: the raw images or texts, which the cached step encodes chunk by chunk."""

    def __init__(self, data: Tensor):
        self.data = data


class _DeferredModel:
    """open_clip_train's model, except that calling it defers the encoders to the loss (everything else forwards)."""

    def __init__(self, model: nn.Module):
        self._model = model

    def __call__(self, images: Tensor, texts: Tensor) -> dict:
        inner = getattr(self._model, "module", self._model)
        out = {"image_features": _Batch(images), "text_features": _Batch(texts),
               "logit_scale": inner.logit_scale.exp().detach()}  # for the loop's log line
        if getattr(inner, "logit_bias", None) is not None:
            out["logit_bias"] = inner.logit_bias.detach()
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


class CachedStepLoss(nn.Module):
    """The loss open_clip_train sees: on a deferred batch it runs the whole gradient-cached step."""

    def __init__(self, loss: nn.Module, chunk_size: int):
        super().__init__()
        self.loss = loss
        self.chunk_size = chunk_size
        self.model = None
        self.scaler = None

    def bind(self, model: nn.Module, scaler) -> None:
        self.model, self.scaler = model, scaler

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        if not isinstance(image_features, _Batch):  # real features (e.g. an evaluation): the plain loss
            args = (image_features, text_features, logit_scale) + ((logit_bias,) if logit_bias is not None else ())
            return self.loss(*args, output_dict=output_dict)
        if self.model is None:
            raise RuntimeError("CachedStepLoss: no model bound (the patched train_one_epoch binds it)")
        losses = grad_cached_step(self.model, image_features.data, text_features.data, self.loss, self.chunk_size,
                                  scaler=self.scaler, loss_kwargs={"output_dict": True})
        # The gradients are in place already; the loop's backward runs through a zero-weighted leaf only.
        anchor = torch.zeros((), device=image_features.data.device, requires_grad=True)
        losses = {name: value + 0.0 * anchor for name, value in losses.items()}
        return losses if output_dict else sum(losses.values())


def create_mmcl_loss(args) -> nn.Module:
    """mmcl_fast's loss for open_clip_train's parsed `args` (the flags of open_clip's own create_loss)."""
    import mmcl_fast
    if getattr(args, "distill", False):
        raise ValueError("--distill-model: distillation is not supported with mmcl_fast's loss; drop --mmcl-* or "
                         "the distillation flags")
    if "coca" in args.model.lower():
        raise ValueError(f"--model {args.model}: CoCa's captioning loss is not supported by mmcl_fast")
    if args.horovod:
        raise ValueError("--horovod is not supported; use torchrun (torch.distributed)")
    if args.siglip:
        siglip = getattr(mmcl_fast, "SigLipLoss", None)
        if siglip is None:
            raise RuntimeError("--siglip needs mmcl_fast.SigLipLoss, which this mmcl_fast version does not have")
        return siglip(rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl)
    return mmcl_fast.ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                              rank=args.rank, world_size=args.world_size)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer (rows per encoder call), got {text!r}") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (rows per encoder call), got {value}")
    return value


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our options, open_clip_train's arguments): --mmcl-chunk K is taken out, the rest passes through."""
    parser = argparse.ArgumentParser(prog="python -m mmcl_fast.integrations.open_clip_train", add_help=False,
                                     allow_abbrev=False)
    parser.add_argument("--mmcl-chunk", type=_positive_int, default=None,
                        help="rows per encoder call of the gradient-cached step (default: plain steps)")
    ours, rest = parser.parse_known_args(argv)
    return ours, rest


@contextlib.contextmanager
def patched(chunk_size: int | None):
    """open_clip_train.main with mmcl_fast's loss and, if chunk_size is set, gradient-cached steps."""
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train
    original_create_loss, original_epoch = oc_main.create_loss, oc_main.train_one_epoch

    def create_loss(args):
        if chunk_size is not None and args.accum_freq != 1:
            raise ValueError(f"--accum-freq {args.accum_freq}: --mmcl-chunk replaces gradient accumulation; "
                             "drop --accum-freq and raise --batch-size instead")
        loss = create_mmcl_loss(args)
        step = f"gradient-cached steps, {chunk_size} rows per encoder call" if chunk_size else "plain steps"
        logging.info(f"mmcl_fast: loss {type(loss).__name__}, {step}")
        return CachedStepLoss(loss, chunk_size) if chunk_size is not None else loss

    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        if isinstance(loss, CachedStepLoss):
            loss.bind(model, scaler)
            model = _DeferredModel(model)
        return oc_train.train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                                        tb_writer=tb_writer)

    oc_main.create_loss, oc_main.train_one_epoch = create_loss, train_one_epoch
    try:
        yield oc_main
    finally:
        oc_main.create_loss, oc_main.train_one_epoch = original_create_loss, original_epoch


def main(argv: list[str] | None = None):
    ours, rest = split_argv(list(sys.argv[1:] if argv is None else argv))
    with patched(ours.mmcl_chunk) as oc_main:
        return oc_main.main(rest)


if __name__ == "__main__":
    sys.exit(main())
