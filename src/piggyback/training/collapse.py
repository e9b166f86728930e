"""Signs of a collapsed training run, logged every epoch and warned about while it happens.

A Piggyback run whose learning rate is a little too high does not diverge: it settles. The
first masks to reach the threshold switch off whole depthwise filters, the frozen BN
statistics stop fitting, a bounded activation saturates and the network computes the same
features for every image. From then on the training loss sits at the loss of a constant
prediction (``ln(num_classes)`` for balanced classes) and nothing moves again, so a sweep
reports chance accuracy with no error. Two numbers show it while it happens:

- ``masks/flipped``: the fraction of all masked weights whose 0/1 value changed during the
  epoch, and ``masks/flipped_max``: the largest such fraction in any one layer (a collapse
  flips a burst of one layer, often its whole filters, in a few steps);
- a warning when an epoch after the first ends with a mean training loss no better (within
  ``tolerance``) than the loss of an input-independent prediction: the entropy of the
  epoch's training labels, ``ln(num_classes)`` for balanced classes. A loss far above it
  (divergence) warns too. ``train/collapse`` logs it as 1.0 / 0.0.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from piggyback.masks import flips
from piggyback.nn import get_masks

log = logging.getLogger(__name__)


def label_entropy(counts: Mapping[Any, int]) -> float:
    """Entropy (nats) of a label histogram: the lowest cross-entropy any prediction that
    ignores its input can reach on these labels (predicting the label frequencies)."""
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values() if c) if total else 0.0


class CollapseMonitor(L.Callback):
    """Logs per-epoch mask flips and warns when the training loss sits at chance level.

    ``after_epochs``: epochs whose loss is not checked (a head at the paper's lr 1e-4 can
    still be near chance after one epoch of a healthy run). ``tolerance``: relative distance
    to the constant-prediction loss that still counts as "at chance".
    """

    def __init__(self, after_epochs: int = 1, tolerance: float = 0.02) -> None:
        if after_epochs < 0 or not 0 <= tolerance < 1:
            raise ValueError("after_epochs must be >= 0 and tolerance in [0, 1)")
        self.after_epochs = after_epochs
        self.tolerance = tolerance
        self._start: dict[str, torch.Tensor] = {}
        self._loss_sum = 0.0
        self._seen = 0
        self._labels: Counter[int] = Counter()
        self.collapsed_epochs: list[int] = []
        # the verdict of the last epoch checked (None: none was): a collapse settles and
        # stays, while a slow but healthy start can sit at chance for an early epoch and
        # recover, so the task's record (``collapsed``) follows the last epoch
        self.last_epoch_collapsed: bool | None = None

    @staticmethod
    def _masks(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        backbone = getattr(pl_module, "backbone", pl_module)
        return {name: mask.to(torch.int8) for name, mask in get_masks(backbone).items()}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._masks(pl_module)
        self._loss_sum, self._seen = 0.0, 0
        self._labels = Counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs  # the task's own loss where the step returns it (not a regulariser)
        if isinstance(outputs, Mapping):
            loss = outputs.get("task_loss", outputs.get("loss"))
        labels = batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else None
        if not isinstance(loss, torch.Tensor) or not isinstance(labels, torch.Tensor):
            return
        self._loss_sum += float(loss.detach()) * len(labels)
        self._seen += len(labels)
        self._labels.update(labels.tolist())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics: dict[str, float] = {}
        if self._start:
            overall, per_layer = flips(self._start, self._masks(pl_module))
            worst = max(per_layer, key=per_layer.__getitem__)
            metrics["masks/flipped"] = overall
            metrics["masks/flipped_max"] = per_layer[worst]
            log.info(
                "epoch %d: %.4f%% of mask values flipped, most in %s (%.2f%%)",
                trainer.current_epoch,
                100 * overall,
                worst,
                100 * per_layer[worst],
            )
        if self._seen:
            chance = label_entropy(self._labels)
            loss = self._loss_sum / self._seen
            collapsed = (
                trainer.current_epoch >= self.after_epochs
                and chance > 0
                and loss >= chance * (1 - self.tolerance)
            )
            metrics["train/collapse"] = float(collapsed)
            if trainer.current_epoch >= self.after_epochs and chance > 0:
                self.last_epoch_collapsed = collapsed
            if collapsed:
                self.collapsed_epochs.append(trainer.current_epoch)
                classes = getattr(getattr(pl_module, "head", None), "out_features", None)
                classes = classes or len(self._labels)
                rank_zero_warn(
                    f"training loss {loss:.3f} after epoch {trainer.current_epoch} is no better "
                    f"than a prediction that ignores the input ({chance:.3f}; ln({classes}) = "
                    f"{math.log(classes):.3f}): the network has collapsed to a constant output "
                    "or diverged. Lower method.lr_scale or method.lr.masks (the masks' lr sets "
                    "how soon they flip), or let the head learn first with method.warmup_epochs "
                    "(masks/flipped_max shows how much a layer flipped)."
                )
        if metrics:
            pl_module.log_dict(metrics)
