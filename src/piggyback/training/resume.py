"""Exact resume: carry the RNG state through ``last.ckpt``, and keep ``last.ckpt`` on disk.

Lightning's checkpoint restores weights, optimizer, scheduler and loop counters, but not the
global RNGs that random augmentation in the main process draws from (the shuffle order is a
function of seed and epoch, see ``piggyback.data.sampler``). Resuming from the epoch-end
``last.ckpt`` reproduces the uninterrupted run bit for bit when the loaders run in the main
process (``num_workers=0``); worker processes keep RNG streams no checkpoint can hold, so with
random augmentation in workers the resumed run sees the same images in the same order but
different crops. A checkpoint written mid-epoch by a signal resumes with the batches that
epoch had left (see ``RNGStateCheckpoint``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from piggyback.training.finite_loss import NonFiniteLoss  # issue 18
from piggyback.utils.write_errors import WriteError  # issue 18


class InterruptCheckpoint(L.pytorch.callbacks.Checkpoint):
    """Writes ``last.ckpt`` when training stops on an exception or a signal.

    Not Lightning's ``OnExceptionCheckpoint``: with one of those among the callbacks,
    ``fit(ckpt_path=None)`` silently resumes from any ``last*.ckpt`` in the checkpoint folders
    (a rerun into an earlier run's folder then continued, or crashed on, that run's state), and
    it deletes its file at teardown, which with the name ``last`` was the epoch-end
    ``last.ckpt``. Here a run resumes only when asked to, with ``resume=``.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exc: BaseException
    ) -> None:
        if isinstance(exc, NonFiniteLoss | WriteError):  # issue 18
            return  # weights a non-finite step made, or a disk that cannot take them: keep
            # the last good last.ckpt as it is
        trainer.save_checkpoint(self.path)


class RNGStateCheckpoint(L.Callback):
    """Carries what Lightning's checkpoint leaves out: the Python/NumPy/torch RNG states, and
    for a checkpoint written mid-epoch (SIGTERM) how many of that epoch's batches were done.

    After an epoch-end checkpoint the RNG states come back at the start of the next epoch,
    which is exact. After a mid-epoch one, the data module's next train loader skips the
    batches already done, so the epoch sees exactly the samples it had left, and the RNG
    states come back at ``on_train_start``. Lightning has fetched that epoch's first batch by
    then, so random augmentation drawn in the main process is one batch off.
    """

    KEY = "piggyback_epoch_position"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._mid_epoch = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if 0 < done < trainer.num_training_batches:
            checkpoint[self.KEY] = {"epoch": trainer.current_epoch, "batches": done}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        position = checkpoint.get(self.KEY)
        datamodule = trainer.datamodule
        if position and datamodule is not None and hasattr(datamodule, "resume_at"):
            datamodule.resume_at(position["epoch"], position["batches"])
            self._mid_epoch = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._mid_epoch:
            self._mid_epoch = False
            self._restore()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    """NumPy's state with plain types and a tensor: Lightning loads with ``weights_only``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    keys_t = torch.from_numpy(keys.astype(np.int64))
    return str(kind), keys_t, int(pos), int(has_gauss), float(gauss)
