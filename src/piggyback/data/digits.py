"""Offline demo tasks built from scikit-learn's bundled handwritten digits.

The 8x8 digits stand in for a real benchmark so that the whole pipeline — pretraining a
backbone, then learning Piggyback masks for new tasks — runs on any machine without a
download. Each variant is a distinct task in the paper's sense: a new visual domain
(rotated, inverted, mirrored) or a new label space (digit mod 3) over the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Unpack

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from piggyback.data.base import DataError, LoaderOptions, TaskDataModule

IMAGE_SIZE = 32

# variant -> (image transform, label transform, number of classes)
_VARIANTS: dict[
    str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[np.ndarray], np.ndarray], int]
] = {
    "base": (lambda x: x, lambda y: y, 10),
    "rotated": (lambda x: torch.rot90(x, 1, dims=(-2, -1)), lambda y: y, 10),
    "inverted": (lambda x: 1.0 - x, lambda y: y, 10),
    "mirrored": (lambda x: torch.flip(x, dims=(-1,)), lambda y: y, 10),
    "mod3": (lambda x: x, lambda y: y % 3, 3),
}
DIGIT_VARIANTS: tuple[str, ...] = tuple(_VARIANTS)


def digits_variant_classes(variant: str) -> int:
    return _check_variant(variant)[2]


def _check_variant(variant: str):
    if variant not in _VARIANTS:
        raise DataError(f"unknown digits variant {variant!r}; choose one of {DIGIT_VARIANTS}")
    return _VARIANTS[variant]


def _split_indices(labels: np.ndarray, fractions: tuple[float, float], seed: int):
    """Stratified train/val/test indices: the same for every variant, so the base task never
    sees the test images of a target task."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(idx) * fractions[0])
        n_test = round(len(idx) * fractions[1])
        val.append(idx[:n_val])
        test.append(idx[n_val : n_val + n_test])
        train.append(idx[n_val + n_test :])
    return tuple(np.sort(np.concatenate(part)) for part in (train, val, test))


def load_digits_tensors(variant: str = "base", image_size: int = IMAGE_SIZE, seed: int = 0):
    """``{split: (images [N,1,S,S] in [0,1], labels)}`` for one digits variant."""
    from sklearn.datasets import load_digits  # deferred: sklearn costs ~1 s, demo data only

    image_fn, label_fn, _ = _check_variant(variant)
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    images = image_fn(images).contiguous()
    labels = torch.from_numpy(label_fn(bunch.target).astype(np.int64))
    splits = _split_indices(bunch.target, (0.15, 0.25), seed)
    return {
        name: (images[torch.from_numpy(idx)], labels[torch.from_numpy(idx)])
        for name, idx in zip(("train", "val", "test"), splits, strict=True)
    }


class DigitsDataModule(TaskDataModule):
    """One demo task: a digits variant, split 60/15/25 (stratified, seeded)."""

    input_channels = 1

    def __init__(
        self,
        variant: str = "rotated",
        task_name: str | None = None,
        num_classes: int | None = None,
        image_size: int = IMAGE_SIZE,
        seed: int = 0,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        expected = digits_variant_classes(variant)
        super().__init__(
            task_name=task_name or f"digits_{variant}",
            num_classes=expected if num_classes is None else num_classes,
            **loader,
        )
        self.check_num_classes(expected, f"digits variant {variant!r}")
        self.variant = variant
        self.image_size = image_size
        self.seed = seed
        self.class_names = [str(c) for c in range(expected)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = load_digits_tensors(self.variant, self.image_size, self.seed)
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(*splits[name]) for name in ("train", "val", "test")
        )
