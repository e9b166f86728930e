"""Stop a run whose training loss stops being finite, before it writes anything from it.

A learning rate far too high (``method=finetune method.lr_scale=1e7``) sends the loss to NaN
within a few steps. Without a check the run trains on, writes NaN weights into ``last.ckpt``
(over the last good resume point), exports an artifact and exits 0 with chance accuracy.

:class:`FiniteLossCheck` looks at each training step's loss with ``torch.isfinite`` (no
``detect_anomaly``, no ``.item()``). On the CPU the answer is immediate. On an accelerator,
reading it forces a sync, so the step's flag is read one step later, when the device has
long finished it: the host never waits for the step it just queued. Pending flags are read
before any validation and before any checkpoint is written, so no checkpoint is written from
weights a non-finite step produced. The first non-finite loss raises :class:`NonFiniteLoss`
(a one-line message; exit 2 through ``train.py``); with ``nonfinite_loss=warn`` it is one
warning and the run goes on.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

MODES = ("stop", "warn")


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the message says where and what to do."""


class FiniteLossCheck(L.Callback):
    """Raise :class:`NonFiniteLoss` (``mode="stop"``) or warn once (``mode="warn"``) on the
    first non-finite training loss.

    ``last_checkpoint``: the epoch-end resume point of this task, named in the message when
    it exists; ``lr_scale``: the run's ``method.lr_scale``, for the suggested lower value;
    ``defer``: read each step's flag one step later (default: on any device but the CPU).
    """

    def __init__(
        self,
        task: str,
        last_checkpoint: str | Path | None = None,
        lr_scale: float = 1.0,
        mode: str = "stop",
        defer: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"nonfinite_loss={mode!r} is not valid; choose one of stop, warn")
        self.task = task
        self.last_checkpoint = Path(last_checkpoint) if last_checkpoint else None
        self.lr_scale = lr_scale
        self.mode = mode
        self.defer = defer
        self._pending: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        self._warned = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach()
        entry = (torch.isfinite(loss).all(), loss, trainer.current_epoch, idx)
        defer = loss.device.type != "cpu" if self.defer is None else self.defer
        if not defer:  # no sync to avoid: read it now
            self._check(trainer, entry)
            return
        previous, self._pending = self._pending, entry
        if previous is not None:
            self._check(trainer, previous)

    def flush(self, trainer: L.Trainer) -> None:
        """Read the flag still pending (called before validation and any checkpoint)."""
        previous, self._pending = self._pending, None
        if previous is not None:
            self._check(trainer, previous)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def _check(self, trainer: L.Trainer, entry: tuple[torch.Tensor, torch.Tensor, int, int]):
        finite, loss, epoch, step = entry
        if bool(finite) or self._warned:
            return
        where = self.where(trainer, loss, epoch, step)
        if self.mode == "warn":
            self._warned = True
            print(f"warning: {where}; training goes on (nonfinite_loss=warn)", file=sys.stderr)
            return
        raise NonFiniteLoss(f"{where}; {self.advice()}")

    def where(self, trainer: L.Trainer, loss: torch.Tensor, epoch: int, step: int) -> str:
        """``task 't': the training loss became nan at epoch E, step S (learning rates: ...)``;
        ``step`` is the batch index within epoch ``epoch`` (both from 0, as in epoch000.ckpt)."""
        kind = "nan" if bool(torch.isnan(loss).any()) else "inf"
        rates = ", ".join(
            f"{group.get('name', f'group{i}')}={group['lr']:.3g}"
            for optimizer in trainer.optimizers
            for i, group in enumerate(optimizer.param_groups)
        )
        return (
            f"task '{self.task}': the training loss became {kind} at epoch {epoch}, step {step} "
            f"(learning rates: {rates or 'none'})"
        )

    def advice(self) -> str:
        lower = f"lower the learning rate (method.lr_scale={_lower(self.lr_scale)})"
        last = self.last_checkpoint
        if last is not None and last.is_file():
            return f"{lower} or resume from {last}"
        return f"{lower}; no good checkpoint was written before it"


def _lower(lr_scale: float) -> str:
    """A tenth of ``lr_scale``, written as a user would type it (1e+06 -> 1e6)."""
    value = float(lr_scale) / 10
    exponent = math.floor(math.log10(value)) if value > 0 else 0
    if value == 10.0**exponent:
        return f"1e{exponent}" if abs(exponent) > 3 else f"{value:g}"
    return f"{value:g}"


__all__ = ["MODES", "FiniteLossCheck", "NonFiniteLoss"]
