"""Each task's loggers, callbacks and Trainer, built from the run's config.

Every task of a sequence gets its own logger set (null ``name``/``version`` become the
task's name, in a fresh folder) and its own checkpoint folder, so tasks never write over
each other or over an earlier run. Callbacks that cannot work in this run (the progress bar
when it is switched off, the LR monitor without a logger) are left out rather than failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from piggyback.training.finite_loss import FiniteLossCheck
from piggyback.training.resume import InterruptCheckpoint, RNGStateCheckpoint
from piggyback.utils.instantiate import build, build_all
from piggyback.utils.resolvers import fresh_subdir

__all__ = ["build_callbacks", "build_loggers", "finish_loggers", "quiet_trainer", "task_trainer"]


def build_loggers(cfg: DictConfig, task: str) -> list[Any]:
    """One logger set per task; null ``name``/``version`` fields get the task's name."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node or "_target_" not in node:
            continue
        fill = {k: task for k in ("name", "version") if k in node and node[k] is None}
        if "version" in fill and node.get("save_dir") and node.get("name"):
            # never write into an earlier run's log folder: task, else task_v1, task_v2, ...
            fill["version"] = fresh_subdir(str(Path(node.save_dir) / node.name), task)
        loggers.append(build(node, **fill))
    return loggers


def build_callbacks(cfg: DictConfig, task: str, has_logger: bool = True) -> list[Any]:
    """The configured callbacks, minus those this run cannot use; checkpoints per task."""
    callbacks = build_all(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # e.g. in logs: the bar goes too
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    if not has_logger:  # logger=none: the LR monitor has nowhere to write and would refuse
        callbacks = [
            c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)
        ]
    for callback in callbacks:
        if isinstance(callback, L.pytorch.callbacks.ModelCheckpoint) and callback.dirpath:
            callback.dirpath = str(Path(callback.dirpath) / task)
    return callbacks


def task_trainer(
    cfg: DictConfig,
    task: str,
    loggers: list[Any],
    ckpt_dir: Path,
    *,
    model_summary: bool = True,
) -> L.Trainer:
    """The Trainer that fits and tests one task; SIGTERM / Ctrl+C save into ``ckpt_dir``.

    ``model_summary=False`` (the later tasks of a sequence, on the same backbone) leaves out
    the model summary table, so a run prints it once."""
    callbacks = build_callbacks(cfg, task, has_logger=bool(loggers))
    callbacks.append(RNGStateCheckpoint())  # before the exception checkpoint saves its state
    callbacks.append(InterruptCheckpoint(ckpt_dir))
    callbacks.append(  # stop at the first non-finite training loss (nonfinite_loss=warn: warn)
        FiniteLossCheck(
            task,
            ckpt_dir / "last.ckpt",
            cfg.method.get("lr_scale", 1.0),
            cfg.get("nonfinite_loss", "stop"),
        )
    )
    quiet = {} if model_summary else {"enable_model_summary": False}
    return build(cfg.trainer, logger=loggers or False, callbacks=callbacks, **quiet)


def quiet_trainer(cfg: DictConfig) -> L.Trainer:
    """The run's device and precision with no loggers, callbacks, bars or checkpoints."""
    return build(
        cfg.trainer,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def finish_loggers(loggers: list[Any]) -> None:
    """Close W&B runs so the next task (or multirun job) starts a fresh one."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb  # deferred: optional logger, ~1 s to import

            logger.finalize("success")
            wandb.finish()
