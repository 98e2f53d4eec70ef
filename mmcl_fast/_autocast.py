"""Autocast policy: the losses are exact in the features' own dtype, whatever the caller's AMP context.

Under `torch.autocast` a matmul of fp32 features would run in bf16/fp16 and the "fp32" loss would be off by ~1e-3;
the losses instead compute in the dtype of the features they are given (fp32 features: the fp32 result; bf16
features, e.g. from an encoder under autocast: the bf16 result, accumulated in fp32). Every public loss is wrapped in
`autocast_off`; the custom ops turn autocast off around their kernels with `no_autocast`.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor


def no_autocast(device: torch.device):
    """A context that turns autocast off on `device` (a no-op where torch has no autocast for it)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device of the first tensor among the positional, then the keyword arguments (None if there is none).

    Plain loops, no `next(generator, default)`: torch.compile(fullgraph=True) of torch < 2.9 cannot trace a
    generator expression passed to `next` (a graph break)."""
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    for a in kwargs.values():
        if isinstance(a, Tensor):
            return a.device
    return None


def autocast_off(fn):
    """Run a loss with autocast disabled on the device of its first tensor argument."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = _first_tensor_device(args, kwargs)
        if device is None:
            return fn(*args, **kwargs)
        with no_autocast(device):
            return fn(*args, **kwargs)
    return wrapper
