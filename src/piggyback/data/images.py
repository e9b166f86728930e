"""Image files as training samples: cheap header checks, lazy decoding, seeded splits.

Shared by every DataModule that lists image files (ImageFolder trees, the decathlon devkit)
and by the torchvision sets that need a held-out split. Set-up only reads each file's first
bytes (:func:`check_image_file`); pixels are decoded once per sample per epoch, in
:class:`ImageListDataset`, which can skip files that still fail to decode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import folder

from piggyback.data.base import DataError

log = logging.getLogger(__name__)

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _has_image_magic(head: bytes) -> bool:
    """Recognise the formats PIL is asked to open here from their first bytes."""
    return (
        head.startswith(b"\xff\xd8\xff")  # JPEG
        or head.startswith(b"\x89PNG\r\n\x1a\n")
        or head[:2] in (b"BM", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")  # BMP, PNM
        or head.startswith((b"GIF87a", b"GIF89a"))
        or head.startswith((b"II*\x00", b"MM\x00*"))  # TIFF
        or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")
    )


def check_image_file(path: str, size: int, mode: Literal["header", "none"]) -> str | None:
    """Return why a file cannot be an image, or None. Never decodes pixels."""
    if size == 0:
        return "empty file"
    if mode == "header":
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as e:
            return f"cannot open: {e}"
        if not _has_image_magic(head):
            return "not a recognised image format (bad header)"
    return None


def load_image(path: str) -> Image.Image:
    """Decode one file fully, as RGB (torchvision's ``pil_loader``: errors surface here)."""
    return folder.pil_loader(path)


class ImageListDataset(Dataset):
    """(path, target) pairs decoded lazily; the only place images are opened during training.

    With ``skip_unreadable`` a file that fails to decode is logged once and replaced by the
    next readable sample of the list (so batch shapes stay fixed); ``num_skipped`` counts
    them in this process (each DataLoader worker keeps its own count).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[Image.Image], Any] | None,
        *,
        skip_unreadable: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self._bad: set[int] = set()

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    @property
    def num_skipped(self) -> int:
        return len(self._bad)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Image.Image | None:
        path = self.samples[index][0]
        try:
            return load_image(path)
        except FileNotFoundError as e:
            raise DataError(
                f"image file {path} does not exist (it was listed when the dataset was set "
                "up). Restore it or re-run so the file list is rebuilt."
            ) from e
        except _DECODE_ERRORS as e:
            if not self.skip_unreadable:
                raise DataError(
                    f"cannot decode image {path}: {e}. Replace or delete the file, or set "
                    "data.skip_unreadable=true to skip unreadable images."
                ) from e
            if index not in self._bad:
                self._bad.add(index)
                log.warning(
                    "skipping unreadable image %s (%s); %d skipped so far in this process",
                    path,
                    e,
                    len(self._bad),
                )
            return None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            img = self._load(i)
            if img is None:
                continue
            target = self.samples[i][1]
            return (self.transform(img) if self.transform is not None else img), target
        raise DataError(f"no readable image left in this split ({n} files, all unreadable)")


def split_indices(
    targets: Sequence[int], fraction: float, *, seed: int, stratified: bool = True
) -> tuple[list[int], list[int]]:
    """Deterministic disjoint (train, val) index lists; same inputs and seed -> same split.

    Stratified: each class gives ``round(fraction * n_c)`` samples to val but always keeps at
    least one for training, so no class disappears from train.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {fraction}")
    n = len(targets)
    if fraction == 0.0 or n == 0:
        return list(range(n)), []
    rng = np.random.default_rng(seed)
    val: list[int] = []
    if stratified:
        by_class: dict[int, list[int]] = {}
        for i, t in enumerate(targets):
            by_class.setdefault(int(t), []).append(i)
        for c in sorted(by_class):
            idx = by_class[c]
            k = min(len(idx) - 1, math.floor(fraction * len(idx) + 0.5))
            if k > 0:
                perm = rng.permutation(len(idx))[:k]
                val.extend(idx[j] for j in perm)
    else:
        k = min(n - 1, math.floor(fraction * n + 0.5))
        val = [int(j) for j in rng.permutation(n)[:k]]
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val_set)
