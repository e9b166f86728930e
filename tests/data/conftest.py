"""Tiny datasets in the real on-disk layouts, written to tmp_path (no network, a few KB)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Global decathlon category ids, deliberately not starting at 0 or 1 (re-basing must work).
DECATHLON_CATEGORIES = {10003: "zigzagged", 10001: "banded", 10002: "blotchy"}


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> None:
    """A small random image; JPEG/PNG/PPM chosen by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)
    img.save(path)


@pytest.fixture
def make_finegrained(tmp_path: Path) -> Callable[..., Path]:
    """Write ``<root>/<name>/{train,<test_split>}/<class>/*`` and return root."""

    def make(
        name: str = "cubs_cropped",
        classes: tuple[str, ...] = ("001.albatross", "002.auklet", "003.blackbird"),
        n_train: int = 6,
        n_test: int = 2,
        test_split: str = "test",
    ) -> Path:
        root = tmp_path / "finegrained"
        seed = 0
        for split, n in (("train", n_train), (test_split, n_test)):
            for c in classes:
                for i in range(n):
                    suffix = ".png" if i % 3 == 2 else ".jpg"  # mix formats as real sets do
                    mode = "L" if i == 1 else "RGB"  # and grayscale images
                    write_image(root / name / split / c / f"img_{i}{suffix}", seed, mode=mode)
                    seed += 1
        return root

    return make


@pytest.fixture
def make_decathlon(tmp_path: Path) -> Callable[..., Path]:
    """Write a devkit tree for one domain and return root (the folder holding decathlon-1.0/).

    train: 4 images per class, val: 2, test_stripped: 3 unlabelled images. Annotations are
    listed in a different order from images so label matching must go through image_id.
    """

    def make(domain: str = "dtd", n_train: int = 4, n_val: int = 2, n_test: int = 3) -> Path:
        root = tmp_path / "decathlon_root"
        devkit = root / "decathlon-1.0"
        (devkit / "annotations").mkdir(parents=True, exist_ok=True)
        cats = [{"id": cid, "name": name} for cid, name in DECATHLON_CATEGORIES.items()]
        image_id = 5_000_000
        for split, n in (("train", n_train), ("val", n_val), ("test_stripped", n_test)):
            images, anns = [], []
            if split == "test_stripped":
                for i in range(n):
                    file_name = f"data/{domain}/test/{i:05d}.jpg"
                    write_image(devkit / file_name, image_id, size=(30, 24))
                    images.append({"id": image_id, "file_name": file_name})
                    image_id += 1
            else:
                for cid, cname in DECATHLON_CATEGORIES.items():
                    for i in range(n):
                        file_name = f"data/{domain}/{split}/{cname}/{i:05d}.png"
                        write_image(devkit / file_name, image_id, size=(30, 24))
                        images.append({"id": image_id, "file_name": file_name})
                        anns.append({"id": image_id + 7, "image_id": image_id, "category_id": cid})
                        image_id += 1
            anns.reverse()
            doc = {"images": images, "annotations": anns, "categories": cats}
            if split == "test_stripped":
                del doc["annotations"]
            (devkit / "annotations" / f"{domain}_{split}.json").write_text(json.dumps(doc))
        return root

    return make
