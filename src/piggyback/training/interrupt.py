"""SIGTERM (a cluster's time limit) or Ctrl+C while fitting: a checkpoint, then a hint.

The :class:`~piggyback.training.resume.InterruptCheckpoint` callback saves ``last.ckpt`` when
Lightning sees the signal; here the fit's way of stopping (Lightning's ``SIGTERMException``,
or the ``SystemExit`` it makes of Ctrl+C) becomes :class:`Interrupted`, which the entry point
reports as one line naming the checkpoint and the ``resume=`` option, with the shell's signal
exit code (143 or 130).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["Interrupted", "fit_or_interrupt", "report_interrupt"]


class Interrupted(Exception):
    """Training stopped by SIGTERM/SIGINT after saving ``checkpoint``; ``code`` is 143 or 130."""

    def __init__(self, code: int, checkpoint: Path) -> None:
        super().__init__(code, checkpoint)
        self.code = code
        self.checkpoint = checkpoint


def fit_or_interrupt(
    trainer: L.Trainer, module: Any, datamodule: Any, ckpt_path: str | None, ckpt_dir: Path
) -> None:
    """``trainer.fit``; a signal during it raises :class:`Interrupted` (checkpoint saved)."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's SIGTERM handler, after on_exception
        raise Interrupted(143, ckpt_dir / "last.ckpt") from None
    except SystemExit:  # Lightning turns Ctrl+C into exit(1) after on_exception
        raise Interrupted(130, ckpt_dir / "last.ckpt") from None
    if trainer.received_sigterm:
        raise Interrupted(143, ckpt_dir / "last.ckpt")


def report_interrupt(exc: Interrupted) -> NoReturn:
    """One line saying what was saved and how to continue, then the shell's signal exit code."""
    name = "SIGTERM" if exc.code == 143 else "SIGINT"
    print(
        f"error: interrupted by {name}; checkpoint saved to {exc.checkpoint}; resume with: "
        f"python train.py <same overrides> resume={exc.checkpoint}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(exc.code) from None
