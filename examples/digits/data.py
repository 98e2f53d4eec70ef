"""Image-caption data for the digits example: scikit-learn's digits with templated captions, or open_clip's CSV.

Every source yields float images (n, 3, S, S) in [0, 1] and, per image, a list of candidate captions (one is
drawn per use: the text side of the augmentation). Batches come from a per-epoch permutation seeded by
(seed, epoch) and augmentation of the whole global batch from a generator seeded by (seed, step), so a resumed
run, and a run over several ranks, sees exactly the data stream of one uninterrupted process.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {name}: the digit's word, {digit}: its numeral
CAPTION_TEMPLATES = (
    "a photo of the digit {name}",
    "handwritten {digit}",
    "a handwritten {name}",
    "the number {name}",
    "a drawing of the numeral {digit}",
    "a scan of a handwritten digit {digit}",
    "an image of a {name}",
    "digit {digit}",
)


def digit_captions(label: int) -> list[str]:
    return [template.format(name=DIGIT_NAMES[label], digit=label) for template in CAPTION_TEMPLATES]


@dataclass
class Split:
    images: Tensor            # (n, 3, S, S) float32 in [0, 1]
    captions: list[list[str]]  # candidate captions per image
    labels: Tensor | None     # (n,) class index where the source has classes (digits), else None


@dataclass
class Dataset:
    train: Split
    test: Split
    class_prompts: list[list[str]] | None  # per class, the prompts whose mean embedding is the class (zero-shot)
    name: str


def _held_out_split(n: int, test_fraction: float, labels: Tensor | None, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test); stratified by label where there are labels."""
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        order = torch.randperm(n, generator=generator)
        n_test = max(1, int(round(n * test_fraction)))
        return order[n_test:].sort().values, order[:n_test].sort().values
    train, test = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = max(1, int(round(len(members) * test_fraction)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _subset(images: Tensor, captions: list, labels: Tensor | None, index: Tensor) -> Split:
    return Split(images[index], [captions[i] for i in index.tolist()], None if labels is None else labels[index])


def load_digits_dataset(image_size: int, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits (0-16 grey levels), upsampled to image_size, 3 channels."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    grey = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    captions = [digit_captions(int(label)) for label in labels]
    train_index, test_index = _held_out_split(len(labels), test_fraction, labels, split_seed)
    return Dataset(_subset(images, captions, labels, train_index), _subset(images, captions, labels, test_index),
                   [digit_captions(label) for label in range(10)], "digits")


def load_csv_dataset(path: str, image_size: int, *, image_key: str = "filepath", caption_key: str = "title",
                     separator: str | None = None, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """open_clip's CSV format: one row per image, an image path column and a caption column (tab or comma)."""
    from PIL import Image
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data csv:PATH: no file at {path!r}")
    with open(path, newline="") as handle:
        text = handle.read()
    if separator is None:
        header = text.splitlines()[0] if text else ""
        separator = "\t" if "\t" in header else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=separator))
    if not rows:
        raise ValueError(f"--data csv:{path}: no data rows")
    missing = [key for key in (image_key, caption_key) if key not in rows[0]]
    if missing:
        raise ValueError(f"--data csv:{path}: expected columns {image_key!r} (image path) and {caption_key!r} "
                         f"(caption), missing {missing}; columns are {list(rows[0])}")
    if len(rows) < 2:
        raise ValueError(f"--data csv:{path}: need at least 2 rows (a train and a held-out image), got {len(rows)}")
    base = os.path.dirname(os.path.abspath(path))
    images, captions = [], []
    for row in rows:
        image_path = row[image_key]
        image_path = image_path if os.path.isabs(image_path) else os.path.join(base, image_path)
        with Image.open(image_path) as image:
            image = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
            images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
                          .view(image_size, image_size, 3).permute(2, 0, 1))
        captions.append([row[caption_key]])
    images = torch.stack(images).float() / 255.0
    train_index, test_index = _held_out_split(len(rows), test_fraction, None, split_seed)
    return Dataset(_subset(images, captions, None, train_index), _subset(images, captions, None, test_index), None,
                   f"csv:{path}")


def augment(images: Tensor, generator: torch.Generator, max_shift: float = 0.1, max_degrees: float = 10.0,
            scale_range: tuple[float, float] = (0.9, 1.1)) -> Tensor:
    """Random affine per image (rotation, scale, shift as a fraction of the size) and a contrast jitter."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    scale = torch.empty(n).uniform_(*scale_range, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
    return (out * contrast).clamp(0, 1)


def normalize(images: Tensor) -> Tensor:
    return (images - 0.5) / 0.5


class EpochSampler:
    """Global batches from a permutation per epoch (seed, epoch); rank r takes its contiguous share of each."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"--batch-size {batch_size} is larger than the training set ({n} images)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.batches_per_epoch = n // batch_size  # the last partial batch of an epoch is dropped

    def global_batch(self, step: int) -> Tensor:
        epoch, position = divmod(step, self.batches_per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return order[position * self.batch_size:(position + 1) * self.batch_size]
