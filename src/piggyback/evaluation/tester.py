"""Testing one task of a deployed multi-task model under ``Trainer.test``.

Evaluation measures the :class:`~piggyback.models.multitask.MultiTaskModel` that would be shipped,
not each training run's own module; Lightning handles the device, precision and batch limit.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from piggyback.models.multitask import MultiTaskModel

__all__ = ["TaskTester", "choose_device", "test_accuracy"]


def choose_device(name: str) -> torch.device:
    """``device=auto`` is the GPU when there is one, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TaskTester(L.LightningModule):
    """Tests one task of a multi-task model under ``Trainer.test``: top-1 and top-5 accuracy.

    Evaluation runs the deployed :class:`MultiTaskModel`, not a training module; this wrapper
    only switches it to the task and feeds torchmetrics (top-k capped at the number of
    classes, as in training), so devices, precision and batch limits are Lightning's job.
    """

    def __init__(self, model: MultiTaskModel, task: str, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.count = SumMetric()

    def on_test_start(self) -> None:
        self.model.set_task(self.task)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        self.top1.update(logits, y)
        self.top5.update(logits, y)
        self.count.update(torch.tensor(float(len(y)), device=logits.device))

    def on_test_epoch_end(self) -> None:
        top1, top5, count = self.top1.compute(), self.top5.compute(), self.count.compute()
        self.results = (float(top1), float(top5), int(count))


def test_accuracy(
    model: MultiTaskModel,
    task: str,
    num_classes: int,
    loader: Any,
    device: torch.device,
    limit: int | None,
) -> tuple[float, float, int]:
    """(top-1, top-5, number of test samples) of one task through ``Trainer.test``."""
    tester = TaskTester(model, task, num_classes)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=limit,  # None: all batches (an explicit 1.0 makes Lightning say so)
    )
    trainer.test(tester, dataloaders=loader, verbose=False)
    top1, top5, n = tester.results
    if n == 0:
        raise ValueError(f"task {task!r}: the test split is empty")
    return top1, top5, n
