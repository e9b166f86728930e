"""Fine-grained benchmarks as ImageFolder trees (CUBS, Cars, Flowers, WikiArt, Sketch, ImageNet).

Layout: ``<root>/<name>/train/<class>/*`` and ``<root>/<name>/test/<class>/*`` (ImageNet:
``val/`` instead of ``test/``). Class indices come from the sorted train class folders, and
the test split reuses them, so a test tree with a missing class cannot shift the labels.

The reference code validated on the test split; that is available (``val_on_test``) to
reproduce it, but the default holds a seeded, deterministic part of train out, so model
selection never sees test images.

Every image is decoded exactly once per sample per epoch, in ``__getitem__``. Set-up only
lists the folders and, by default, reads each file's first bytes to reject files that are
not images at all (cheap: no decoding); files that still fail to decode are handled when
they are first loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Unpack

from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import folder

from piggyback.data.base import DataError, LoaderOptions, TaskDataModule
from piggyback.data.folders import check_data_folder
from piggyback.data.images import ImageListDataset, check_image_file, split_indices
from piggyback.data.transforms import IMAGENET_MEAN, IMAGENET_STD, finegrained_transform

log = logging.getLogger(__name__)

#: torchvision's ImageFolder extensions: the same files count as images everywhere.
IMG_EXTENSIONS: tuple[str, ...] = tuple(folder.IMG_EXTENSIONS)

#: The paper's folder names and their class counts (PAPER.md); other names work as generic
#: ImageFolder tasks.
FINEGRAINED_CLASSES: dict[str, int] = {
    "cubs_cropped": 200,
    "stanford_cars_cropped": 196,
    "flowers": 102,
    "wikiart": 195,
    "sketches": 250,
    "imagenet": 1000,
}
#: Datasets whose held-out split is not called ``test``.
TEST_SPLIT_NAME: dict[str, str] = {"imagenet": "val"}


def _layout(root: Path, name: str, test_split: str) -> str:
    return (
        f"expected layout: {root}/{name}/train/<class>/<image> and "
        f"{root}/{name}/{test_split}/<class>/<image>"
    )


class ImageFolderDataModule(TaskDataModule):
    """One task from any ImageFolder tree, with a held-out validation split.

    ``<root>/<name>/{train,test}/<class>/*`` (``name=""``: ``root`` itself holds train/ and
    test/). ``classes`` picks a subset of the class folders, labelled in the given order
    (Split-CIFAR style task sequences). ``mean``/``std``/``image_size`` left as None come
    from the backbone's pretrained data config (:meth:`adopt_backbone_config`), else ImageNet
    at 224 px.

    Attributes after ``setup``: ``class_names`` (sorted train folder names), ``class_to_idx``,
    ``train_set`` / ``val_set`` / ``test_set`` (``ImageListDataset``) and ``num_skipped``
    (files rejected at set-up, per split).
    """

    def __init__(
        self,
        task_name: str,
        num_classes: int,
        root: str | os.PathLike,
        name: str = "",
        *,
        classes: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        val_on_test: bool = False,
        stratified: bool = True,
        seed: int = 0,
        test_split: str | None = None,
        skip_unreadable: bool = False,
        check_images: Literal["header", "none"] = "header",
        extensions: Sequence[str] = IMG_EXTENSIONS,
        image_size: int | None = None,
        resize_size: int | None = None,
        cropped: bool | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(task_name=task_name, num_classes=num_classes, **loader)
        if check_images not in ("header", "none"):
            raise DataError(f"check_images must be 'header' or 'none', got {check_images!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root).expanduser()
        self.name = name
        self.val_fraction = float(val_fraction)
        self.val_on_test = bool(val_on_test)
        if self.val_on_test and self.val_fraction > 0:
            log.info(
                "%s: val_on_test=true, so all of train/ is used (val_fraction ignored)", task_name
            )
        self.stratified = bool(stratified)
        self.seed = int(seed)
        self.test_split = test_split or TEST_SPLIT_NAME.get(name, "test")
        self.skip_unreadable = bool(skip_unreadable)
        self.check_images = check_images
        self.extensions = tuple(e.lower() for e in extensions)
        self.classes = None if classes is None else [str(c) for c in classes]
        self.image_size = None if image_size is None else int(image_size)
        self.resize_size = None if resize_size is None else int(resize_size)
        self.cropped = cropped
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.class_to_idx: dict[str, int] | None = None
        self.num_skipped: dict[str, int] = {}
        self._samples: dict[str, list[tuple[str, int]]] = {}
        self.predict_set: Dataset | None = None

    # ------------------------------------------------------------------ discovery
    def adopt_backbone_config(self, config: dict[str, Any]) -> None:
        """Fill what the config left open from the backbone's pretrained data config."""
        if self.mean is None and config.get("mean"):
            self.mean, self.std = tuple(config["mean"]), tuple(config["std"])
        if self.image_size is None and config.get("input_size"):
            self.image_size = int(config["input_size"][-1])
            if self.resize_size is None and config.get("crop_pct"):
                self.resize_size = int(round(self.image_size / config["crop_pct"]))

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.name if self.name else self.root

    def _split_dir(self, split: str) -> Path:
        # issue 18: a file, a dangling link or an unreadable folder is named as such
        check_data_folder(
            self.dataset_dir,
            f"task {self.task_name!r}: dataset folder",
            "set data.root to the data set's folder",
        )
        if not self.dataset_dir.is_dir():
            raise DataError(
                f"task {self.task_name!r}: dataset folder {self.dataset_dir} not found; "
                f"{_layout(self.root, self.name, self.test_split)}. Set data.root to the folder "
                f"that contains {self.name}/."
            )
        d = self.dataset_dir / split
        if not d.is_dir():
            raise DataError(
                f"task {self.task_name!r}: split folder {d} not found; "
                f"{_layout(self.root, self.name, self.test_split)}."
            )
        return d

    def _list_classes(self, split_dir: Path) -> list[str]:
        try:
            return folder.find_classes(str(split_dir))[0]
        except FileNotFoundError:  # no class folder at all
            return []

    def _resolve_classes(self) -> dict[str, int]:
        """Class ids from the train folders only, so every split and run agrees on them."""
        if self.class_to_idx is None:
            train_dir = self._split_dir("train")
            layout = _layout(self.root, self.name, self.test_split)
            empty = f"no class folders in {train_dir}; {layout}."
            self.adopt_classes(self._list_classes(train_dir), str(train_dir), empty)
        return self.class_to_idx

    def _scan(self, split: str) -> list[tuple[str, int]]:
        """List (path, label) for a split, sorted by path so splits are reproducible."""
        if split in self._samples:
            return self._samples[split]
        class_to_idx = self._resolve_classes()
        split_dir = self._split_dir(split)
        classes = self._list_classes(split_dir)
        if self.classes is not None:  # a subset: other folders are other tasks' classes
            classes = [c for c in classes if c in class_to_idx]
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise DataError(
                f"task {self.task_name!r}: {split_dir} has class folders that train/ does not: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}. Both splits must use the "
                "same class folder names."
            )
        missing = sorted(set(class_to_idx) - set(classes))
        if missing:
            log.warning(
                "%s: %d classes of train/ have no folder in %s/ (e.g. %s)",
                self.task_name,
                len(missing),
                split,
                missing[:3],
            )
        samples: list[tuple[str, int]] = []
        rejected: list[tuple[str, str]] = []
        for cls in classes:
            cls_dir = split_dir / cls
            found = 0
            with os.scandir(cls_dir) as it:
                entries = sorted(
                    (e for e in it if e.is_file() and not e.name.startswith(".")),
                    key=lambda e: e.name,
                )
            for e in entries:
                if os.path.splitext(e.name)[1].lower() not in self.extensions:
                    continue
                why = check_image_file(e.path, e.stat().st_size, self.check_images)
                if why is not None:
                    if not self.skip_unreadable:
                        raise DataError(
                            f"task {self.task_name!r}: unreadable image {e.path} ({why}). "
                            "Replace or delete it, or set data.skip_unreadable=true to skip "
                            "unreadable images."
                        )
                    rejected.append((e.path, why))
                    continue
                samples.append((e.path, class_to_idx[cls]))
                found += 1
            if found == 0:
                raise DataError(
                    f"task {self.task_name!r}: class folder {cls_dir} has no readable images "
                    f"(extensions {', '.join(self.extensions)}). Remove the folder or add images."
                )
        if rejected:
            log.warning(
                "%s: skipped %d unreadable images in %s/ (first: %s: %s)",
                self.task_name,
                len(rejected),
                split,
                rejected[0][0],
                rejected[0][1],
            )
        self.num_skipped[split] = len(rejected)
        self._samples[split] = samples
        return samples

    # ------------------------------------------------------------------ datasets
    def _transform(self, train: bool) -> Callable:
        image_size = self.image_size or 224
        return finegrained_transform(
            self.name,
            train=train,
            image_size=image_size,
            resize_size=self.resize_size or round(image_size * 256 / 224),
            mean=self.mean or IMAGENET_MEAN,
            std=self.std or IMAGENET_STD,
            cropped=self.cropped,
        )

    def _dataset(self, samples: Sequence[tuple[str, int]], train: bool) -> ImageListDataset:
        return ImageListDataset(
            samples, self._transform(train), skip_unreadable=self.skip_unreadable
        )

    def train_val_samples(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """The train split cut into (train, held-out val); val is empty with ``val_on_test``."""
        samples = self._scan("train")
        if self.val_on_test:
            return samples, []
        tr, va = split_indices(
            [t for _, t in samples], self.val_fraction, seed=self.seed, stratified=self.stratified
        )
        return [samples[i] for i in tr], [samples[i] for i in va]

    def prepare_data(self) -> None:
        # Only checks that the folders exist, so a wrong path fails before any worker starts.
        self._split_dir("train")
        self._split_dir(self.test_split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            if self.train_set is None:
                train, val = self.train_val_samples()
                self.train_set = self._dataset(train, train=True)
                if self.val_on_test:
                    self.val_set = self._dataset(self._scan(self.test_split), train=False)
                elif val:
                    self.val_set = self._dataset(val, train=False)
                log.info(
                    "%s: %d train / %d val images (%s)",
                    self.task_name,
                    len(train),
                    len(self.val_set) if self.val_set is not None else 0,
                    f"val = {self.test_split}/" if self.val_on_test else "val held out of train",
                )
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset(self._scan(self.test_split), train=False)
            self.predict_set = self.test_set
        self._resolve_classes()

    def val_dataloader(self) -> DataLoader | list:
        # No held-out split (val_fraction=0 and val_on_test=false): Lightning skips validation.
        if self.val_set is None and self.train_set is not None:
            return []
        return super().val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, train=False)


class FineGrainedDataModule(ImageFolderDataModule):
    """The paper's fine-grained sets (CUBS, Cars, Flowers, WikiArt, Sketch, ImageNet).

    An :class:`ImageFolderDataModule` whose ``name`` decides the recipe: cropped CUBS / Cars
    are resized to a square, ImageNet tests on ``val/``.
    """
