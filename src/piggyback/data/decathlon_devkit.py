"""The decathlon devkit's own files: COCO-style annotations in, ``results.json`` out.

Kept apart from the DataModule (which turns annotations into datasets and normalisation)
because both ends are file formats with their own checks: annotation files are validated
with an error that names the expected fields, and a submission is written atomically and
never over an existing one unless asked.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from piggyback.data.base import DataError
from piggyback.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


class Annotations:
    """One parsed annotation file: image paths, optional labels by image id, categories."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"annotation file {path} is not valid JSON: {e}") from e
        try:
            self.images: list[tuple[int, str]] = sorted(
                (int(im["id"]), str(im["file_name"])) for im in raw["images"]
            )
            self.categories: list[tuple[int, str]] = sorted(
                (int(c["id"]), str(c.get("name", c["id"]))) for c in raw.get("categories", [])
            )
            self.labels: dict[int, int] = {}
            for ann in raw.get("annotations") or []:
                image_id = int(ann["image_id"])
                if image_id in self.labels:
                    raise DataError(
                        f"annotation file {path}: image {image_id} has more than one annotation"
                    )
                self.labels[image_id] = int(ann["category_id"])
        except (KeyError, TypeError) as e:
            raise DataError(
                f"annotation file {path} is not in the devkit's COCO format (missing {e}); "
                "expected images[{id, file_name}], annotations[{id, image_id, category_id}], "
                "categories[{id, name}]"
            ) from e


def check_files_exist(paths: Sequence[str], ids: Sequence[int], ann_path: Path) -> None:
    """One directory listing per folder instead of one stat per image (ImageNet: 1.2M files)."""
    listings: dict[str, set[str] | None] = {}
    missing: list[tuple[int, str]] = []
    for image_id, p in zip(ids, paths, strict=True):
        d, name = os.path.split(p)
        if d not in listings:
            try:
                listings[d] = set(os.listdir(d))
            except OSError:
                listings[d] = None
        names = listings[d]
        if names is None or name not in names:
            missing.append((image_id, p))
    if missing:
        image_id, p = missing[0]
        raise DataError(
            f"{ann_path} lists image {image_id} at {p}, which does not exist "
            f"({len(missing)} of {len(paths)} images missing). Extract the devkit's image "
            f"archives so that file_name 'data/...' resolves under {ann_path.parent.parent}/."
        )


def to_int(value: Any, what: str) -> int:
    """An integer id or label from a Python, NumPy or torch scalar; refuses bools and 1.5."""
    if isinstance(value, bool):
        raise DataError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.item()
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{what} must be an integer, got {value!r}")
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} must be an integer, got {value!r}") from e


def write_results_json(
    path: str | os.PathLike,
    predictions: Iterable[Mapping[str, Any]] | Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the challenge's ``results.json``: a list of ``{"image_id", "category_id"}``.

    ``predictions`` is one domain's list of dicts (global category ids, e.g. from
    ``DecathlonDataModule.to_results``) or a mapping ``domain -> list`` to merge all domains
    into one submission. An existing file is kept unless ``overwrite=True``: a submission is
    usually assembled from runs that took hours, and must not be clobbered by accident.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if isinstance(predictions, Mapping):
        groups = list(predictions.items())
    else:
        groups = [("", predictions)]
    results: list[dict[str, int]] = []
    seen: set[int] = set()
    for domain, preds in groups:
        for p in preds:
            image_id = to_int(p["image_id"], "image_id")
            category_id = to_int(p["category_id"], "category_id")
            if image_id in seen:
                where = f" (domain {domain})" if domain else ""
                raise DataError(f"image_id {image_id} appears twice in the predictions{where}")
            seen.add(image_id)
            results.append({"image_id": image_id, "category_id": category_id})
    try:
        atomic_write_text(path, json.dumps(results), overwrite=overwrite)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it") from None
    log.info("wrote %d predictions to %s", len(results), path)
    return path
