"""A sequence of tasks: which tasks a data config holds, and the accuracy matrix.

After each task of a sequence, every task learned so far is tested again (each through the
module that holds it), which gives row ``i`` of the continual-learning accuracy matrix
``R[i][j]``; :mod:`piggyback.scores.continual` turns the matrix into average accuracy,
backward transfer and forgetting. A single task's row is its own test accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from piggyback.models.module import PiggybackModule
from piggyback.scores.continual import cl_summary
from piggyback.training.assembly import build_loggers, finish_loggers, quiet_trainer

__all__ = ["AccuracyMatrix", "continual_learning", "evaluate_learned", "task_configs"]


def task_configs(data_cfg: DictConfig) -> list[DictConfig]:
    """A data config is one task, or a sequence of tasks under ``tasks``."""
    if "tasks" in data_cfg:
        return list(data_cfg.tasks.values())
    return [data_cfg]


def evaluate_learned(
    cfg: DictConfig, learned: list[tuple[str, PiggybackModule, Any]]
) -> list[float]:
    """Test accuracy of every task learned so far, each through the module that holds it.

    One quiet Trainer (the run's device and precision, no loggers or callbacks) tests each
    task on its test split after switching the module to it.
    """
    row = []
    for task, module, datamodule in learned:
        module.set_task(task)
        trainer = quiet_trainer(cfg)
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        row.append(float(results[0]["test/acc"]))
    return row


@dataclass
class AccuracyMatrix:
    """Rows of ``R[i][j]`` (accuracy on task ``j`` after learning task ``i``), ``None``-padded."""

    cfg: DictConfig
    num_tasks: int
    learned: list[tuple[str, PiggybackModule, Any]] = field(default_factory=list)
    rows: list[list[float | None]] = field(default_factory=list)

    def add_task(self, record: dict[str, Any], module: PiggybackModule) -> None:
        """Record a task just trained (its record loses the DataModule) and add its row."""
        self.learned.append((record["task"], module, record.pop("datamodule")))
        if self.cfg.get("test", True) and "test/acc" in record:
            many = self.num_tasks > 1
            row = evaluate_learned(self.cfg, self.learned) if many else [record["test/acc"]]
            self.rows.append(row + [None] * (self.num_tasks - len(row)))

    @property
    def complete(self) -> bool:
        return len(self.rows) == self.num_tasks


def continual_learning(
    cfg: DictConfig, records: list[dict[str, Any]], matrix: list[list[float | None]]
) -> dict[str, Any]:
    """The ``cl`` block: accuracy matrix, average accuracy, BWT, forgetting, bytes, seconds."""
    tasks = [r["task"] for r in records]
    summary = cl_summary(
        tasks,
        matrix,
        task_bytes=[r.get("task_bytes") for r in records],
        train_seconds=[r.get("train_seconds") for r in records],
    )
    if len(tasks) < 2:  # one task: nothing beyond its own run to log
        return summary
    loggers = build_loggers(cfg, "cl")
    scalars = {
        f"cl/{k}": float(summary[k])
        for k in ("average_accuracy", "bwt", "forgetting")
        if summary[k] is not None
    }
    for logger in loggers:
        logger.log_metrics(scalars, step=len(tasks))
        logger.save()  # outside a Trainer nothing else flushes (the CSV logger buffers)
    finish_loggers(loggers)
    return summary
