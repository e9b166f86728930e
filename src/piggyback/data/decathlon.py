"""Visual Domain Decathlon (Rebuffi et al. 2017) domains, read from the official devkit.

Layout under ``root``::

    decathlon-1.0/annotations/<domain>_{train,val,test_stripped}.json   (COCO style)
    decathlon-1.0/data/<domain>/<split>/...                             (72 px images)

Category ids are unique across the whole decathlon, so each domain's labels are re-based:
its sorted category ids become 0..K-1 (``category_ids[label]`` maps back). The mapping is
taken from the train annotations so that every split and the exported ``results.json``
agree. Images are matched to labels through ``image_id`` (not list order).

Normalisation uses each domain's own mean/std: from the config when given, else measured
once on (a seeded sample of) the train split and cached in a small JSON file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from piggyback.data.base import DataError, LoaderOptions, TaskDataModule
from piggyback.data.decathlon_devkit import (
    Annotations,
    check_files_exist,
    to_int,
    write_results_json,
)
from piggyback.data.folders import check_data_folder
from piggyback.data.images import ImageListDataset
from piggyback.data.transforms import decathlon_geometry, decathlon_transform
from piggyback.scores.decathlon import DECATHLON_DOMAINS
from piggyback.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

DEVKIT_DIR = "decathlon-1.0"
STATS_FILE = "decathlon_mean_std.json"

#: Devkit domain names and their class counts (the one table: piggyback.scores.decathlon).
DECATHLON_CLASSES: dict[str, int] = dict(DECATHLON_DOMAINS)

_LAYOUT = (
    "expected layout: <root>/decathlon-1.0/annotations/<domain>_{train,val,test_stripped}.json "
    "and images under <root>/decathlon-1.0/data/<domain>/..."
)


class DecathlonDataset(ImageListDataset):
    """Images of one split; ``image_ids`` (same order) lets predictions be exported."""

    def __init__(self, samples, transform, image_ids: Sequence[int], **kwargs: Any) -> None:
        super().__init__(samples, transform, **kwargs)
        self.image_ids = [int(i) for i in image_ids]


class DecathlonDataModule(TaskDataModule):
    """One decathlon domain: train on ``train``, validate on ``val``, test on ``val``.

    ``test_stripped`` has no labels, so it is served by ``predict_dataloader`` (items are
    ``(image, image_id)``); ``to_results`` / ``export_results`` turn predicted local labels
    into the challenge's global category ids.

    Attributes after ``setup``: ``category_ids`` (local label -> global category id),
    ``class_names``, ``mean`` / ``std`` (the normalisation in use), the datasets
    (``DecathlonDataset`` with ``image_ids``) and ``predict_set``.
    """

    def __init__(
        self,
        task_name: str,
        num_classes: int,
        root: str | os.PathLike,
        domain: str | None = None,
        *,
        train_split: str | Sequence[str] = "train",
        val_split: str = "val",
        test_split: str = "val",
        predict_split: str = "test_stripped",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stats_cache_dir: str | os.PathLike | None = None,
        stats_max_images: int | None = 10000,
        seed: int = 0,
        verify_files: bool = True,
        skip_unreadable: bool = False,
        image_size: int = 64,
        resize_size: int = 72,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(task_name=task_name, num_classes=num_classes, **loader)
        self.domain = domain or task_name
        if self.domain not in DECATHLON_CLASSES:
            raise DataError(
                f"unknown decathlon domain {self.domain!r}; expected one of "
                f"{', '.join(sorted(DECATHLON_CLASSES))}"
            )
        if (mean is None) != (std is None):
            raise DataError("give both data.mean and data.std, or neither (then they are measured)")
        if test_split == predict_split or test_split == "test_stripped":
            raise DataError(
                f"test_split={test_split!r} has no labels; use predict (predict_split) for it "
                "and keep test_split=val"
            )
        self.root = Path(root).expanduser()
        self.train_splits = [train_split] if isinstance(train_split, str) else list(train_split)
        self.val_split = val_split
        self.test_split = test_split
        self.predict_split = predict_split
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        self.stats_cache_dir = (
            Path(stats_cache_dir).expanduser()
            if stats_cache_dir is not None
            else self.root / "cache"
        )
        self.stats_max_images = stats_max_images
        self.seed = int(seed)
        self.verify_files = bool(verify_files)
        self.skip_unreadable = bool(skip_unreadable)
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self.category_ids: list[int] | None = None
        self.predict_set: Dataset | None = None
        self._ann: dict[str, Annotations] = {}
        if self.val_split in self.train_splits:
            log.warning(
                "%s: validating on %r, which is also a training split", self.domain, val_split
            )

    # ------------------------------------------------------------------ annotations
    @property
    def devkit_dir(self) -> Path:
        return self.root / DEVKIT_DIR

    def annotation_path(self, split: str) -> Path:
        return self.devkit_dir / "annotations" / f"{self.domain}_{split}.json"

    def _annotations(self, split: str) -> Annotations:
        if split not in self._ann:
            # issue 18: a file, a dangling link or an unreadable folder is named as such
            check_data_folder(
                self.devkit_dir,
                f"task {self.task_name!r}: decathlon devkit folder",
                "set data.root to the folder that contains it",
            )
            if not self.devkit_dir.is_dir():
                raise DataError(
                    f"task {self.task_name!r}: decathlon devkit folder {self.devkit_dir} not "
                    f"found; {_LAYOUT}. Set data.root to the folder that contains "
                    f"{DEVKIT_DIR}/."
                )
            path = self.annotation_path(split)
            if not path.is_file():
                raise DataError(
                    f"task {self.task_name!r}: annotation file {path} not found; {_LAYOUT}."
                )
            self._ann[split] = Annotations(path)
        return self._ann[split]

    def _resolve_categories(self) -> list[int]:
        """Local label = rank of the global category id among the domain's (train) categories."""
        if self.category_ids is None:
            ann = self._annotations(self.train_splits[0])
            cats = ann.categories
            if not cats:  # tolerate files without a categories list
                ids = sorted(set(ann.labels.values()))
                cats = [(c, str(c)) for c in ids]
            self.check_num_classes(len(cats), str(ann.path))
            self.category_ids = [c for c, _ in cats]
            self.class_names = [name for _, name in cats]
        return self.category_ids

    def _split_samples(
        self, split: str, *, labelled: bool
    ) -> tuple[list[tuple[str, int]], list[int]]:
        ann = self._annotations(split)
        local = {c: i for i, c in enumerate(self._resolve_categories())}
        paths = [str(self.devkit_dir / file_name) for _, file_name in ann.images]
        ids = [image_id for image_id, _ in ann.images]
        if not ids:
            raise DataError(f"annotation file {ann.path} lists no images")
        if self.verify_files:
            check_files_exist(paths, ids, ann.path)
        if not labelled:
            return list(zip(paths, ids, strict=True)), ids
        samples = []
        for image_id, p in zip(ids, paths, strict=True):
            if image_id not in ann.labels:
                raise DataError(
                    f"annotation file {ann.path}: image {image_id} has no annotation; "
                    f"is this an unlabelled split? ({self.predict_split} is only for predict)"
                )
            category = ann.labels[image_id]
            if category not in local:
                raise DataError(
                    f"annotation file {ann.path}: image {image_id} has category_id {category}, "
                    f"which is not one of {self.domain}'s {len(local)} categories"
                )
            samples.append((p, local[category]))
        return samples, ids

    # ------------------------------------------------------------------ normalisation
    def _stats_file(self) -> Path:
        return self.stats_cache_dir / STATS_FILE

    def _stats_key(self) -> str:
        return f"{self.domain}@{self.image_size}/{self.resize_size}"

    def _read_cached_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        try:
            with open(self._stats_file()) as f:
                entry = json.load(f).get(self._stats_key())
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        if not entry or len(entry.get("mean", [])) != 3 or len(entry.get("std", [])) != 3:
            return None
        return tuple(entry["mean"]), tuple(entry["std"])

    def compute_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std of the train split, on the test-time pixels (no augmentation).

        At most ``stats_max_images`` seeded images are used: the estimate is stable long
        before ImageNet's 1.2M images.
        """
        samples, ids = self._split_samples(self.train_splits[0], labelled=False)
        geometry = decathlon_geometry(
            self.domain, train=False, image_size=self.image_size, resize_size=self.resize_size
        )
        ds: Dataset = DecathlonDataset(
            samples,
            T.Compose(geometry + [T.ToTensor()]),
            ids,
            skip_unreadable=self.skip_unreadable,
        )
        if self.stats_max_images is not None and len(ds) > self.stats_max_images:
            rng = np.random.default_rng(self.seed)
            idx = np.sort(rng.choice(len(ds), self.stats_max_images, replace=False))
            ds = Subset(ds, idx.tolist())
        loader = DataLoader(ds, batch_size=256, num_workers=self.num_workers)
        total = torch.zeros(3, dtype=torch.float64)
        total_sq = torch.zeros(3, dtype=torch.float64)
        count = 0
        for x, _ in loader:
            x = x.to(torch.float64)
            total += x.sum(dim=(0, 2, 3))
            total_sq += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
        return tuple(mean.tolist()), tuple(std.tolist())

    def _cache_stats(self, mean: Sequence[float], std: Sequence[float], n: int) -> None:
        path = self._stats_file()
        try:
            try:
                with open(path) as f:
                    data = json.load(f)
                if not isinstance(data, dict):
                    data = {}
            except (OSError, json.JSONDecodeError):
                data = {}
            data[self._stats_key()] = {"mean": list(mean), "std": list(std), "num_images": n}
            atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True), overwrite=True)
        except OSError as e:  # read-only dataset folder: still train, just measure again
            log.warning("could not cache decathlon mean/std in %s: %s", path, e)

    def resolve_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Config values, else the cache, else measure (and cache) them."""
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        cached = self._read_cached_stats()
        if cached is not None:
            self.mean, self.std = cached
        else:
            log.info("%s: measuring mean/std on the train split (cached afterwards)", self.domain)
            self.mean, self.std = self.compute_mean_std()
            n = len(self._annotations(self.train_splits[0]).images)
            if self.stats_max_images is not None:
                n = min(n, self.stats_max_images)
            self._cache_stats(self.mean, self.std, n)
        if any(not math.isfinite(s) or s <= 0 for s in self.std):
            raise DataError(f"{self.domain}: measured std {self.std} is not usable")
        return self.mean, self.std

    # ------------------------------------------------------------------ datasets
    def _dataset(self, splits: Sequence[str], *, train: bool, labelled: bool = True):
        mean, std = self.resolve_mean_std()
        samples: list[tuple[str, int]] = []
        ids: list[int] = []
        for split in splits:
            s, i = self._split_samples(split, labelled=labelled)
            samples += s
            ids += i
        transform = decathlon_transform(
            self.domain,
            train=train,
            mean=mean,
            std=std,
            image_size=self.image_size,
            resize_size=self.resize_size,
        )
        return DecathlonDataset(samples, transform, ids, skip_unreadable=self.skip_unreadable)

    def prepare_data(self) -> None:
        # Runs on one process: measure and cache the statistics before the ranks need them.
        self._resolve_categories()
        self.resolve_mean_std()

    def setup(self, stage: str | None = None) -> None:
        self._resolve_categories()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset(self.train_splits, train=True)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._dataset([self.val_split], train=False)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._dataset([self.test_split], train=False)
        if stage == "predict" and self.predict_set is None:
            self.predict_set = self._dataset([self.predict_split], train=False, labelled=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, train=False)

    # ------------------------------------------------------------------ submission
    def to_results(
        self, image_ids: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor
    ) -> list[dict[str, int]]:
        """Local predicted labels -> challenge entries with this domain's global category ids."""
        category_ids = self._resolve_categories()
        image_ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else image_ids
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else labels
        if len(image_ids) != len(labels):
            raise DataError(f"{len(image_ids)} image ids but {len(labels)} predicted labels")
        out = []
        for image_id, label in zip(image_ids, labels, strict=True):
            label = to_int(label, "predicted label")
            if not 0 <= label < len(category_ids):
                raise DataError(f"predicted label {label} outside 0..{len(category_ids) - 1}")
            out.append(
                {"image_id": to_int(image_id, "image_id"), "category_id": category_ids[label]}
            )
        return out

    def export_results(
        self,
        path: str | os.PathLike,
        image_ids: Sequence[int] | torch.Tensor,
        labels: Sequence[int] | torch.Tensor,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write this domain's predictions as a ``results.json`` (see ``write_results_json``)."""
        return write_results_json(path, self.to_results(image_ids, labels), overwrite=overwrite)
