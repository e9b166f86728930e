"""The contract every task's DataModule honours, so the trainer never special-cases a dataset.

A Piggyback run learns one task at a time; the module only needs to know the task's name,
its number of classes (to size the head) and, when known, the class names (stored in the
task artifact so predictions can be read without the dataset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from piggyback.data.sampler import EpochSeededSampler, loader_generator


class DataError(ValueError):
    """The data on disk (or its config) is not what the run expects; the message says what to do."""


class LoaderOptions(TypedDict, total=False):
    """The DataLoader settings every task DataModule takes (``data.batch_size=...`` etc.).

    Subclasses accept them as ``**loader: Unpack[LoaderOptions]`` and pass them on to
    :class:`TaskDataModule`, so the list and its defaults are written once, here.
    """

    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    shuffle_seed: int | None


class TaskDataModule(L.LightningDataModule):
    """Base for all task DataModules: loader settings and task metadata live here."""

    input_channels: int | None = 3
    """Channels of the images this data module yields (image files are converted to RGB).
    Checked against the backbone for every task of a run before the first one trains;
    None (text) checks nothing."""

    collate_fn: Callable[[list[Any]], Any] | None = None
    """How the loaders join samples into a batch; None: PyTorch's default (text modules pad
    their sentences to the batch's longest)."""

    def __init__(
        self,
        task_name: str,
        num_classes: int,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise DataError(f"task {task_name!r}: num_classes must be >= 1, got {num_classes}")
        self.task_name = task_name
        self.num_classes = int(num_classes)
        self.class_names: list[str] | None = None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        # The training order is a function of (shuffle_seed, epoch); by default the run's seed,
        # which ``seed_everything`` made torch's initial seed.
        self.shuffle_seed = torch.initial_seed() if shuffle_seed is None else int(shuffle_seed)
        self._resume_at: tuple[int, int] | None = None  # (epoch, samples already seen)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next train loader starts ``epoch`` after its first ``batches_done`` batches:
        a checkpoint written mid-epoch (SIGTERM) resumes where that epoch stopped."""
        self._resume_at = (int(epoch), int(batches_done) * self.batch_size)

    def adopt_backbone_config(self, config: dict[str, Any]) -> None:
        """Take what the data config left open (mean, std, input size) from the backbone's
        pretrained data config; called before ``setup``. Fixed-recipe datasets ignore it."""

    def _loader(self, dataset: Dataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split yet")
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self._train_sampler(dataset) if train else None,
            generator=loader_generator(self.shuffle_seed),
            drop_last=False,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def _train_sampler(self, dataset: Dataset) -> EpochSeededSampler:
        skip, self._resume_at = self._resume_at, None
        return EpochSeededSampler(dataset, self.shuffle_seed, skip=skip)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def adopt_classes(self, found: list[str], where: str, empty: str) -> dict[str, int]:
        """Fix the task's class ids from the classes ``found`` in its train split (``where``
        says in what): ``data.classes`` when given (each must be found; their order is the
        ids'), else every class found. ``empty``: the error when there is none."""
        if self.classes is not None:
            missing = [c for c in self.classes if c not in found]
            if missing:
                raise DataError(
                    f"task {self.task_name!r}: data.classes {missing} are not in {where} "
                    f"(it has {found[:10]})"
                )
            found = list(self.classes)
        if not found:
            raise DataError(f"task {self.task_name!r}: {empty}")
        self.check_num_classes(len(found), where)
        self.class_to_idx = {c: i for i, c in enumerate(found)}
        self.class_names = found
        return self.class_to_idx

    def check_num_classes(self, found: int, where: str) -> None:
        """Fail early when the data disagrees with the config: a wrong head size trains silently."""
        if found != self.num_classes:
            raise DataError(
                f"task {self.task_name!r}: config says num_classes={self.num_classes} but {where} "
                f"has {found} classes. Fix the dataset or set data.num_classes={found}."
            )
