"""Online alternative: tasks built from torchvision's dataset classes (opt-in downloads).

Useful when the curated Piggyback / decathlon folders are not at hand: torchvision knows
how to fetch and parse Flowers102, FGVC-Aircraft, DTD, GTSRB, SVHN, CIFAR-100, Omniglot
(and parse Stanford Cars, whose download URL is gone). Nothing is fetched unless
``download: true``; a missing dataset or an offline download becomes a ``DataError`` that
says what to do, instead of torchvision's bare RuntimeError / URLError.

Splits: a set's own validation split is used when it has one (Flowers102, Aircraft, DTD);
otherwise a seeded, stratified part of train is held out. Omniglot (background +
evaluation alphabets = 1623 characters, as in the decathlon) has no test split, so a seeded
per-character part of it is held out as test.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Unpack

from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from piggyback.data.base import DataError, LoaderOptions, TaskDataModule
from piggyback.data.images import split_indices
from piggyback.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decathlon_transform,
    finegrained_transform,
)

log = logging.getLogger(__name__)

#: Omniglot's background alphabets hold 964 characters; evaluation ids are offset by it.
OMNIGLOT_BACKGROUND_CLASSES = 964


@dataclass(frozen=True)
class _Spec:
    """How to build each split of one torchvision dataset."""

    cls_name: str
    num_classes: int
    splits: dict[str, dict[str, Any]]  # our split name -> constructor kwargs
    extra: dict[str, Any] = field(default_factory=dict)
    can_download: bool = True


TORCHVISION_SETS: dict[str, _Spec] = {
    "flowers102": _Spec(
        "Flowers102",
        102,
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    ),
    "aircraft": _Spec(
        "FGVCAircraft",
        100,
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
        extra={"annotation_level": "variant"},
    ),
    "dtd": _Spec(
        "DTD",
        47,
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
        extra={"partition": 1},
    ),
    "gtsrb": _Spec("GTSRB", 43, {"train": {"split": "train"}, "test": {"split": "test"}}),
    "svhn": _Spec("SVHN", 10, {"train": {"split": "train"}, "test": {"split": "test"}}),
    "cifar100": _Spec("CIFAR100", 100, {"train": {"train": True}, "test": {"train": False}}),
    "omniglot": _Spec("Omniglot", 1623, {"all": {}}),
    "stanford_cars": _Spec(
        "StanfordCars",
        196,
        {"train": {"split": "train"}, "test": {"split": "test"}},
        can_download=False,
    ),
}

#: Sets whose symbols change meaning when mirrored (decathlon preset never flips them).
_DECATHLON_DOMAIN = {"gtsrb": "gtsrb", "svhn": "svhn", "omniglot": "omniglot"}

_OFFLINE_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError)


class _Offset:
    """Picklable target transform (DataLoader workers) that shifts class ids."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, target: int) -> int:
        return target + self.offset


def _targets(ds: Any) -> list[int]:
    """Labels without decoding any image, from whichever attribute the class keeps them in."""
    if isinstance(ds, ConcatDataset):
        return [t for d in ds.datasets for t in _targets(d)]
    if hasattr(ds, "_flat_character_images"):  # Omniglot
        tt = ds.target_transform or (lambda t: t)
        return [int(tt(c)) for _, c in ds._flat_character_images]
    for attr in ("targets", "_labels", "labels"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    if hasattr(ds, "_samples"):  # GTSRB, StanfordCars
        return [int(t) for _, t in ds._samples]
    raise DataError(f"cannot read the labels of {type(ds).__name__}")


class TorchvisionDataModule(TaskDataModule):
    """A task from a torchvision dataset class; ``download`` must be asked for explicitly.

    Attributes after ``setup``: ``class_names`` (when the dataset names its classes) and
    ``train_set`` / ``val_set`` / ``test_set``.
    """

    def __init__(
        self,
        task_name: str,
        num_classes: int,
        root: str | os.PathLike,
        name: str,
        *,
        download: bool = False,
        val_fraction: float = 0.1,
        use_official_val: bool = True,
        test_fraction: float = 0.25,
        seed: int = 0,
        preset: Literal["finegrained", "decathlon"] = "finegrained",
        image_size: int | None = None,
        resize_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(task_name=task_name, num_classes=num_classes, **loader)
        if name not in TORCHVISION_SETS:
            raise DataError(
                f"unknown torchvision dataset {name!r}; expected one of "
                f"{', '.join(sorted(TORCHVISION_SETS))}"
            )
        if preset not in ("finegrained", "decathlon"):
            raise DataError(f"preset must be 'finegrained' or 'decathlon', got {preset!r}")
        self.root = Path(root).expanduser()
        self.name = name
        self.spec = TORCHVISION_SETS[name]
        self.download = bool(download)
        self.val_fraction = float(val_fraction)
        self.use_official_val = bool(use_official_val)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.preset = preset
        default_sizes = (224, 256) if preset == "finegrained" else (64, 72)
        self.image_size = int(image_size or default_sizes[0])
        self.resize_size = int(resize_size or default_sizes[1])
        self.mean = tuple(mean)
        self.std = tuple(std)

    # ------------------------------------------------------------------ construction
    def _transform(self, train: bool) -> Callable:
        if self.preset == "decathlon":
            return decathlon_transform(
                _DECATHLON_DOMAIN.get(self.name, self.name),
                train=train,
                mean=self.mean,
                std=self.std,
                image_size=self.image_size,
                resize_size=self.resize_size,
            )
        return finegrained_transform(
            self.name,
            train=train,
            image_size=self.image_size,
            resize_size=self.resize_size,
            mean=self.mean,
            std=self.std,
            cropped=False,
        )

    def _construct(self, cls: type, kwargs: dict[str, Any], transform: Callable) -> Dataset:
        """Call the torchvision class, turning its missing-data / offline errors into advice."""
        download = self.download and self.spec.can_download
        if self.download and not self.spec.can_download:
            raise DataError(
                f"torchvision cannot download {self.name!r} any more (its URL is gone). "
                f"Place the files under {self.root} as torchvision.datasets.{cls.__name__} "
                "expects, then set data.download=false."
            )
        try:
            return cls(str(self.root), transform=transform, download=download, **kwargs)
        except DataError:
            raise
        except (RuntimeError, OSError) as e:
            if download:
                offline = isinstance(e, _OFFLINE_ERRORS) and not isinstance(e, FileNotFoundError)
                hint = " This machine looks offline." if offline else ""
                raise DataError(
                    f"downloading {self.name!r} into {self.root} failed ({type(e).__name__}: "
                    f"{e}).{hint} Download the dataset on a machine with internet, copy it to "
                    f"{self.root} in the layout torchvision.datasets.{cls.__name__} expects, "
                    "and set data.download=false."
                ) from e
            raise DataError(
                f"{self.name!r} not found under {self.root} ({cls.__name__}: {e}). Set "
                "data.download=true to fetch it (needs internet), or copy the files there in "
                f"the layout torchvision.datasets.{cls.__name__} expects."
            ) from e

    def _build(self, split: str, *, train: bool) -> Dataset:
        import torchvision.datasets as tvd  # deferred: imports every dataset class

        cls = getattr(tvd, self.spec.cls_name)
        transform = self._transform(train)
        if self.name == "omniglot":
            background = self._construct(cls, {"background": True}, transform)
            evaluation = self._construct(
                cls,
                {"background": False, "target_transform": _Offset(OMNIGLOT_BACKGROUND_CLASSES)},
                transform,
            )
            return ConcatDataset([background, evaluation])
        return self._construct(cls, {**self.spec.splits[split], **self.spec.extra}, transform)

    def _check_classes(self, ds: Dataset, targets: Sequence[int]) -> None:
        classes = getattr(ds, "classes", None)
        found = len(classes) if classes else (max(targets) + 1 if targets else 0)
        self.check_num_classes(found, f"torchvision {self.spec.cls_name} at {self.root}")
        if classes and self.class_names is None:
            self.class_names = [str(c) for c in classes]

    # ------------------------------------------------------------------ splits
    def prepare_data(self) -> None:
        # One process downloads; the ranks then only read.
        for split in self.spec.splits:
            self._build(split, train=False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None and self.test_set is not None:
            return
        if self.name == "omniglot":
            pools = {t: self._build("all", train=t) for t in (True, False)}
            targets = _targets(pools[False])
            self._check_classes(pools[False], targets)
            rest, test_idx = split_indices(targets, self.test_fraction, seed=self.seed)
            rest_targets = [targets[i] for i in rest]
            tr, va = split_indices(rest_targets, self.val_fraction, seed=self.seed + 1)
            train_idx, val_idx = [rest[i] for i in tr], [rest[i] for i in va]
            self.train_set = Subset(pools[True], train_idx)
            self.val_set = Subset(pools[False], val_idx) if val_idx else None
            self.test_set = Subset(pools[False], test_idx)
            return
        train_aug = self._build("train", train=True)
        train_eval = self._build("train", train=False)
        targets = _targets(train_eval)
        self._check_classes(train_eval, targets)
        if "val" in self.spec.splits and self.use_official_val:
            self.train_set = train_aug
            self.val_set = self._build("val", train=False)
        else:
            tr, va = split_indices(targets, self.val_fraction, seed=self.seed)
            self.train_set = Subset(train_aug, tr)
            self.val_set = Subset(train_eval, va) if va else None
        self.test_set = self._build("test", train=False)
        log.info(
            "%s: %d train / %d val / %d test",
            self.task_name,
            len(self.train_set),
            len(self.val_set) if self.val_set is not None else 0,
            len(self.test_set),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None and self.train_set is not None:
            return []
        return super().val_dataloader()
