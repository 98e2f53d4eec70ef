"""Input checks shared by every loss: each error names the argument and says what was expected."""
from __future__ import annotations

import torch
from torch import Tensor


def check_feature(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (batch, dim) tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float32, bfloat16, float16, float64), "
                        f"got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); need at least one row")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has feature size 0 (shape {tuple(t.shape)}); need at least one feature")


def check_features(x, x_name: str, y, y_name: str) -> None:
    """Both 2-D floating tensors with the same feature size, dtype and device."""
    check_feature(x, x_name)
    check_feature(y, y_name)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{x_name} and {y_name} must have the same feature size, got {x.shape[1]} and {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"{x_name} and {y_name} must be on the same device, got {x.device} and {y.device}")
    if x.dtype != y.dtype:
        raise TypeError(f"{x_name} and {y_name} must have the same dtype, got {x.dtype} and {y.dtype}")


def check_same_shape(x, x_name: str, y, y_name: str) -> None:
    """Both features, and exactly the same (N, D) shape (paired rows)."""
    check_features(x, x_name, y, y_name)
    if x.shape != y.shape:
        raise ValueError(f"{x_name} and {y_name} must have the same shape (paired rows), "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def check_scalar(value, name: str, like: Tensor, *, allow_vector_of: int | None = None):
    """A Python number or a 0-d (or 1-element) floating tensor on the features' device."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-d floating tensor, got bool")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a number or a 0-d floating tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    if allow_vector_of is not None and value.dim() == 1 and value.shape[0] == allow_vector_of:
        return value
    if value.numel() != 1:
        expected = "a scalar (0-d tensor)" + (f" or a ({allow_vector_of},) tensor" if allow_vector_of else "")
        raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")
    return value.reshape(())


def check_labels(labels, name: str, length: int, num_classes: int | None, like: Tensor) -> Tensor:
    """Integer class indices, shape (length,), each in [0, num_classes) (num_classes None: the range is checked by
    the caller, e.g. against the global batch across ranks)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(labels.shape)}")
    if labels.device != like.device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {like.device}")
    if length and num_classes is not None and not torch.compiler.is_compiling():
        # The range check reads values: on the CPU that is free, on an accelerator it would sync with the host on
        # every step, so there it is an asynchronous device assert. Under torch.compile it is left to the
        # indexing of the positives (a graph must not break on a host read).
        if labels.device.type == "cpu":
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
        else:
            torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                                f"{name} must lie in [0, {num_classes})")
    return labels.long()


def check_rank_world(rank, world_size) -> None:
    """open_clip's loss-module arguments: 0 <= rank < world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def as_vector(value, length: int, name: str, like: Tensor, acc_dtype: torch.dtype) -> Tensor:
    """A float, 0-d tensor or (length,) tensor → contiguous (length,) tensor in the accumulation dtype."""
    if value is None:
        return torch.zeros(length, dtype=acc_dtype, device=like.device)
    if not isinstance(value, Tensor):
        return torch.full((length,), float(value), dtype=acc_dtype, device=like.device)
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    if not (value.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() == 0:
        return value.to(acc_dtype).expand(length).contiguous()
    if value.dim() == 1 and value.shape[0] == length:
        return value.to(acc_dtype).contiguous()
    raise ValueError(f"{name} must be a scalar or a ({length},) tensor, got shape {tuple(value.shape)}")


def unit_stride(t: Tensor) -> Tensor:
    """Kernels take a row stride but need unit stride along features; other layouts are copied once."""
    if t.stride(1) == 1 and (t.stride(0) >= t.shape[1] or t.shape[0] == 1):
        return t
    return t.contiguous()
