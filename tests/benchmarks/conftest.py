"""Shared by the benchmark tests: generated image folders in the real on-disk layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_tree(root: Path, classes: int, seed: int = 0) -> None:
    """``root/{train,test}/<class>/*.jpg``: 5 train (one held out for val), 2 test per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 5), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")


@pytest.fixture
def image_tree() -> Callable[..., None]:
    return write_tree
