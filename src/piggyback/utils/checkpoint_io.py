"""Lightning checkpoints written like every other piggyback file: atomically, in place.

Lightning's own writer (``_atomic_save``) serializes to a temporary file in ``/tmp`` and moves
it over; across file systems that move is a copy *into the final path*, so a disk that fills
up during the copy leaves a truncated ``last.ckpt`` where the good resume point was. This
``CheckpointIO`` writes through :func:`piggyback.utils.atomic.atomic_write_stream` instead (temp
file in the checkpoint's folder, fsync, ``os.replace``), so the epoch-end ``last.ckpt``, the
best checkpoints and the interrupt checkpoint are either whole or the previous version, and a
failure is a one-line :class:`~piggyback.utils.write_errors.WriteError`.

Every trainer config attaches it (``conf/trainer/default.yaml``, ``plugins:``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from piggyback.utils.atomic import atomic_write_stream
from piggyback.utils.write_errors import write_failure


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic in the checkpoint's own folder.

    ``root``: the run's output folder. If it has gone (deleted, unmounted) a save fails with
    that message instead of silently recreating the folder tree on whatever is there now.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.root = Path(root) if root is not None else None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if self.root is not None and not self.root.is_dir():
            gone = OSError(errno.ENOENT, "output folder gone", str(self.root))
            raise write_failure(gone, path, "checkpoint")
        atomic_write_stream(
            path, lambda handle: torch.save(checkpoint, handle), overwrite=True, what="checkpoint"
        )


__all__ = ["AtomicCheckpointIO"]
