"""Cross-rank agreement: one exchange of sizes and configuration before any other collective.

Every distributed loss starts here. Each rank validates its own inputs, then all ranks all-gather one int64 row
each (sizes, dtype, device, grad flags, the loss configuration, the scale / bias values, the label ranges), and
every rank runs the same checks on the same table: a mismatch raises the same error on every rank before any
collective of the loss itself, so no rank is left waiting in one (a hang until the process-group timeout).

The exchange reads the table on the host (one device-to-host copy). With ``equal_batches=True`` the caller promises
the same local batch size on every rank and every call: then the exchange runs once per (group, shapes,
configuration) and later calls neither communicate nor synchronise before the loss's own collectives.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._numerics import accumulation_dtype
from .._validate import check_features, check_labels, check_scalar
from ..backends import resolve_backend
from ._transport import all_gather_into

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")
_BACKENDS = ("reference", "torch", "cpu", "triton")
_LOSSES = ("clip", "siglip")
_ALL_IMPLS = ("ring", "gather", "bidir", "shift", "reduce")

# one int64 per field, in this order
_FIELDS = ("ok", "n_image", "n_text", "dim", "dtype", "device", "grad_flags", "world_arg", "loss", "dist_impl",
           "local_loss", "backend", "labels", "label_smoothing", "logit_scale", "logit_bias", "image_label_min",
           "image_label_max", "text_label_min", "text_label_max", "equal_batches")
_F = {name: index for index, name in enumerate(_FIELDS)}
_GRAD_FLAG_NAMES = ("grad mode (torch.is_grad_enabled())", "image_features.requires_grad",
                    "text_features.requires_grad", "logit_scale.requires_grad", "logit_bias is not None",
                    "logit_bias.requires_grad")
_NO_BIAS = -(1 << 63)  # logit_bias field of a rank without a bias (no float64 has these bits)

# What every rank must agree on, in the order checked (the first difference is the error every rank raises):
# (field, error type, what the message calls it, how a value reads, what to do)
_AGREEMENT = (
    ("loss", ValueError, "the loss called", lambda c: _LOSSES[c], "every rank must call the same loss"),
    ("dist_impl", ValueError, "dist_impl", lambda c: _ALL_IMPLS[c], "every rank must pass the same dist_impl"),
    ("local_loss", ValueError, "local_loss", bool, "every rank must pass the same local_loss"),
    ("equal_batches", ValueError, "equal_batches", bool, "every rank must pass the same equal_batches"),
    ("dim", ValueError, "the feature size D", int, "every rank's image_features and text_features need the same D"),
    ("dtype", TypeError, "the feature dtype", lambda c: str(DTYPES[c]), "every rank needs the same dtype"),
    ("device", ValueError, "the feature device type", lambda c: (_DEVICE_TYPES + ("other",))[c],
     "every rank's features must be on the same kind of device"),
    ("backend", ValueError, "the resolved backend", lambda c: _BACKENDS[c],
     "pass the same backend (and install the same build) on every rank"),
    ("labels", ValueError, "which labels are given", lambda c: ("none", "image_labels", "text_labels", "both")[c],
     "pass image_labels / text_labels on every rank or on none"),
    ("label_smoothing", ValueError, "label_smoothing", lambda c: _bits_float(c), "pass the same value on every rank"),
    ("logit_scale", ValueError, "logit_scale", lambda c: _bits_float(c),
     "every rank must pass the same value (e.g. a DDP-replicated parameter), or the loss would silently mix scales"),
    ("logit_bias", ValueError, "logit_bias", lambda c: None if c == _NO_BIAS else _bits_float(c),
     "every rank must pass the same value"),
)
_CACHE_LIMIT = 64


@dataclass(frozen=True)
class Layout:
    """Who holds which rows: per-rank image and text counts of the concatenated batch, this rank and the world."""

    image_sizes: tuple
    text_sizes: tuple
    rank: int
    world: int

    @property
    def n_images(self) -> int:
        return sum(self.image_sizes)

    @property
    def n_texts(self) -> int:
        return sum(self.text_sizes)

    def image_offset(self, rank: int) -> int:
        return sum(self.image_sizes[:rank])

    def text_offset(self, rank: int) -> int:
        return sum(self.text_sizes[:rank])


@dataclass(frozen=True)
class Checked:
    """The validated inputs and what every rank agreed on."""

    logit_scale: object
    logit_bias: object
    image_labels: Tensor | None
    text_labels: Tensor | None
    layout: Layout
    backend: str  # the concrete backend, the same on every rank


_layouts: dict = {}  # equal_batches=True: (group, shapes, configuration) -> Layout


def as_scalar_tensor(value, like: Tensor) -> Tensor:
    """A checked scale / bias as a 0-d tensor: the tensor itself, or a float as a tensor of the accumulation dtype."""
    if isinstance(value, Tensor):
        return value
    acc = accumulation_dtype(like.dtype)
    return torch.tensor(float(value), dtype=acc, device=like.device)


def _host_value(value) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def _metadata_device(group, *candidates) -> torch.device:
    for value in candidates:
        if isinstance(value, Tensor):
            return value.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _label_range(labels: Tensor | None) -> tuple[int, int]:
    """(min, max) of labels read on the host, for CPU tensors only (on an accelerator a host read syncs: there the
    range is a device-side assert, see `_assert_label_range`)."""
    if labels is None or labels.device.type != "cpu":
        return 0, -1
    return int(labels.min()), int(labels.max())


def _assert_label_range(labels: Tensor | None, name: str, bound: int) -> None:
    if labels is not None and labels.device.type != "cpu" and not torch.compiler.is_compiling():
        torch._assert_async(((labels >= 0) & (labels < bound)).all(), f"{name} must lie in [0, {bound})")


def exchange_and_check(image_features, text_features, logit_scale, logit_bias, *, loss: str, dist_impl: str,
                       local_loss: bool = False, backend: str = "auto", image_labels=None, text_labels=None,
                       label_smoothing: float = 0.0, equal_batches: bool = False, rank_arg=None, world_arg=None,
                       group=None) -> Checked:
    """Validate locally, exchange one row of metadata per rank, and raise the same error on every rank if any rank's
    inputs are invalid or the ranks disagree (sizes aside, which may differ unless equal_batches)."""
    what = f"mmcl_fast.distributed.{loss}_loss"
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    meta = [0] * len(_FIELDS)
    meta[_F["ok"]], meta[_F["dtype"]], meta[_F["device"]] = 1, -1, -1
    meta[_F["world_arg"]] = world if world_arg is None else int(world_arg)
    meta[_F["logit_bias"]] = _NO_BIAS
    local_error = None
    resolved = None
    try:
        check_features(image_features, "image_features", text_features, "text_features")
        n, d = image_features.shape
        m = text_features.shape[0]
        if image_features.dtype not in DTYPES:
            raise TypeError(f"image_features must be float32/bfloat16/float16/float64, got {image_features.dtype}")
        if image_labels is not None:
            image_labels = check_labels(image_labels, "image_labels", n, None, image_features)
        if text_labels is not None:
            text_labels = check_labels(text_labels, "text_labels", m, None, image_features)
        if n != m and (image_labels is None or text_labels is None):
            labels_hint = ("unpaired local batches need both image_labels and text_labels (global indices); without "
                           "labels " if loss == "clip" else "")
            raise ValueError(f"image_features has {n} rows and text_features has {m} on rank {rank}: {labels_hint}"
                             "each rank needs paired (equal-size) local batches")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        logit_scale = check_scalar(logit_scale, "logit_scale", image_features)
        if logit_bias is not None:
            logit_bias = check_scalar(logit_bias, "logit_bias", image_features)
        if rank_arg is not None and int(rank_arg) != rank:
            raise ValueError(f"rank={rank_arg} was given but this process is rank {rank} of the process group")
        resolved = resolve_backend(backend, image_features.device, image_features.dtype)
        device_type = image_features.device.type
        flags = (torch.is_grad_enabled(), image_features.requires_grad, text_features.requires_grad,
                 isinstance(logit_scale, Tensor) and logit_scale.requires_grad, logit_bias is not None,
                 isinstance(logit_bias, Tensor) and logit_bias.requires_grad)
        meta[_F["n_image"]], meta[_F["n_text"]], meta[_F["dim"]] = n, m, d
        meta[_F["dtype"]] = DTYPES.index(image_features.dtype)
        meta[_F["device"]] = _DEVICE_TYPES.index(device_type) if device_type in _DEVICE_TYPES else len(_DEVICE_TYPES)
        meta[_F["grad_flags"]] = sum(int(bool(flag)) << bit for bit, flag in enumerate(flags))
        meta[_F["loss"]] = _LOSSES.index(loss)
        meta[_F["dist_impl"]] = _ALL_IMPLS.index(dist_impl)
        meta[_F["local_loss"]] = int(bool(local_loss))
        meta[_F["backend"]] = _BACKENDS.index(resolved)
        meta[_F["labels"]] = int(image_labels is not None) | int(text_labels is not None) << 1
        meta[_F["label_smoothing"]] = _float_bits(label_smoothing)
        meta[_F["equal_batches"]] = int(bool(equal_batches))
        key = (id(group), world, n, m, d, image_features.dtype, device_type, meta[_F["grad_flags"]], loss, dist_impl,
               bool(local_loss), resolved, meta[_F["labels"]], float(label_smoothing))
        if equal_batches and key in _layouts:
            # promised static sizes, checked once: no exchange, no host sync (labels still get the device assert)
            layout = _layouts[key]
            _assert_label_range(image_labels, "image_labels", layout.n_texts)
            _assert_label_range(text_labels, "text_labels", layout.n_images)
            return Checked(logit_scale, logit_bias, image_labels, text_labels, layout, resolved)
        # the values every rank must share (a host read of a 0-d tensor: only on this checking path)
        meta[_F["logit_scale"]] = _float_bits(_host_value(logit_scale))
        if logit_bias is not None:
            meta[_F["logit_bias"]] = _float_bits(_host_value(logit_bias))
        meta[_F["image_label_min"]], meta[_F["image_label_max"]] = _label_range(image_labels)
        meta[_F["text_label_min"]], meta[_F["text_label_max"]] = _label_range(text_labels)
    except (TypeError, ValueError) as err:
        local_error = err
        meta[_F["ok"]] = 0
        key = None

    device = _metadata_device(group, image_features, text_features)
    local_meta = torch.tensor(meta, dtype=torch.int64, device=device)
    all_meta = local_meta.new_empty((world * len(meta),))
    all_gather_into(all_meta, local_meta, group)
    table = all_meta.view(world, len(meta)).cpu().tolist()

    if local_error is not None:
        raise local_error
    bad = [q for q in range(world) if table[q][_F["ok"]] == 0]
    if bad:
        raise ValueError(f"{what}: invalid input on rank(s) {bad} (see the error raised there); every rank stops so "
                         "that none waits in a collective")
    layout = _agree(table, rank, world, what, equal_batches)
    _assert_label_range(image_labels, "image_labels", layout.n_texts)
    _assert_label_range(text_labels, "text_labels", layout.n_images)
    if equal_batches and key is not None:
        if len(_layouts) >= _CACHE_LIMIT:
            _layouts.clear()
        _layouts[key] = layout
    return Checked(logit_scale, logit_bias, image_labels, text_labels, layout, resolved)


def _agree(table: list, rank: int, world: int, what: str, equal_batches: bool) -> Layout:
    """The checks every rank runs on the same table (so they raise the same error everywhere)."""
    def column(field):
        return [row[_F[field]] for row in table]

    def differ(field):
        return len(set(column(field))) > 1

    ranks = f"ranks 0..{world - 1}"
    if any(value != world for value in column("world_arg")):
        raise ValueError(f"world_size={column('world_arg')} (per rank) was given but the process group has "
                         f"{world} ranks")
    for field, error, label, show, hint in _AGREEMENT:
        if differ(field):
            values = [show(code) for code in column(field)]
            raise error(f"{what}: {label} differs across ranks: {values} on {ranks}; {hint}")
    flags = column("grad_flags")
    if len(set(flags)) > 1:
        differing = [name for bit, name in enumerate(_GRAD_FLAG_NAMES) if len({f >> bit & 1 for f in flags}) > 1]
        raise ValueError(f"ranks disagree on {', '.join(differing)}: the backward's collectives would not match "
                         "(hang), so every rank must pass the same kind of inputs")
    image_sizes, text_sizes = tuple(column("n_image")), tuple(column("n_text"))
    if equal_batches and (len(set(image_sizes)) > 1 or len(set(text_sizes)) > 1):
        raise ValueError(f"{what}: equal_batches=True but the local batch sizes differ: images {list(image_sizes)},"
                         f" texts {list(text_sizes)} on {ranks}")
    layout = Layout(image_sizes, text_sizes, rank, world)
    labels = column("labels")[0]
    if not labels & 1 and image_sizes != text_sizes:
        raise ValueError(f"{what}: without image_labels image i's caption is global text i, which needs paired "
                         f"batches on every rank; got images {list(image_sizes)}, texts {list(text_sizes)}")
    if not labels & 2 and image_sizes != text_sizes:
        raise ValueError(f"{what}: without text_labels caption j's image is global image j, which needs paired "
                         f"batches on every rank; got images {list(image_sizes)}, texts {list(text_sizes)}")
    for name, low, high, bound in (("image_labels", "image_label_min", "image_label_max", layout.n_texts),
                                   ("text_labels", "text_label_min", "text_label_max", layout.n_images)):
        lows, highs = column(low), column(high)
        off = [q for q in range(world) if highs[q] >= lows[q] and (lows[q] < 0 or highs[q] >= bound)]
        if off:
            raise ValueError(f"{name} must be global indices in [0, {bound}) (the concatenated batch), got values in "
                             f"[{lows[off[0]]}, {highs[off[0]]}] on rank(s) {off}")
    return layout
