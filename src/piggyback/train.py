"""Training entry point: ``train(cfg)`` runs one task or a sequence of tasks.

``train`` is a pure function of the config (tests and sweeps call it directly); ``main`` is
the Hydra wrapper that turns known user errors into a one-line message and exit code 2.
The steps live in :mod:`piggyback.training` (one module each) and :mod:`piggyback.config.cli`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from piggyback.config.cli import CONF_DIR, USER_ERRORS, demo_recipe_note, hydra_choices, user_error
from piggyback.config.validate import ConfigError, check_config
from piggyback.data.base import TaskDataModule
from piggyback.evaluation.task_report import check_task_inference, sequence_task_inference
from piggyback.training.interrupt import Interrupted, report_interrupt
from piggyback.training.records import (
    finished_metrics,
    git_commit,
    print_tables,
    run_info,
    run_summary,
)
from piggyback.training.run_folder import RunFolder
from piggyback.training.sequence import AccuracyMatrix, continual_learning, task_configs
from piggyback.training.task import build_module, train_task
from piggyback.utils.console import OncePerRun
from piggyback.utils.instantiate import build
from piggyback.utils.resolvers import register_resolvers
from piggyback.utils.run_lock import RunLock

log = logging.getLogger(__name__)

__all__ = [
    "CONF_DIR",
    "USER_ERRORS",
    "Interrupted",
    "build_module",
    "demo_recipe_note",
    "main",
    "run",
    "task_configs",
    "train",
    "train_task",
]


@OncePerRun()
def train(cfg: DictConfig) -> dict[str, Any]:
    """Train every task of ``cfg.data`` on one backbone; returns flat metrics.

    One run per output folder: another run holding it is refused at once (``RunLocked``).
    ``skip_finished=true``: a folder that already holds a finished run's ``metrics.json`` is
    not run again (its metrics are returned), so a sweep run twice resumes."""
    with RunLock(cfg.paths.output_dir):  # before any work
        if cfg.get("skip_finished", False):
            finished = finished_metrics(Path(cfg.paths.output_dir))
            if finished is not None:
                print(
                    f"skipped: {cfg.paths.output_dir} holds a finished run (skip_finished=true; "
                    "delete its metrics.json to run it again)",
                    flush=True,
                )
                return finished
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    commit = git_commit()  # the code this process runs, whatever the checkout does meanwhile
    tasks = task_configs(cfg.data)
    check_config(cfg, tasks)
    check_task_inference(cfg)  # task inference: strategy names, oneshot needs masks
    L.seed_everything(cfg.get("seed", 0), workers=True)
    folder = RunFolder.create(cfg.paths.output_dir)
    if cfg.get("resume") and len(tasks) > 1:
        raise ConfigError("resume= works for a single-task run; pick one task with data=...")

    datamodules: list[TaskDataModule] = [build(data_cfg) for data_cfg in tasks]
    module = None
    records: list[dict[str, Any]] = []
    matrix = AccuracyMatrix(cfg, len(tasks))
    for i, datamodule in enumerate(datamodules):
        module, record = train_task(
            cfg, datamodule, module, folder.root, cfg.get("resume"), later=datamodules[i + 1 :]
        )
        records.append(record)
        matrix.add_task(record, module)  # after each task, every task learned so far

    summary = run_summary(cfg, records)
    if matrix.complete:
        summary["cl"] = continual_learning(cfg, records, matrix.rows)
        inference = sequence_task_inference(cfg, matrix.learned)  # at the end of the cl block
        if inference is not None:
            summary["cl"]["task_inference"] = inference
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    summary["run"] = run_info(
        cfg,
        lr=module.method.lr if module is not None else None,
        seconds=time.perf_counter() - start,
        overrides=list(hydra_cfg.overrides.task) if hydra_cfg else None,
        choices=dict(hydra_cfg.runtime.choices) if hydra_cfg else None,
        commit=commit,
    )
    if module is None or module.trainer is None or module.trainer.is_global_zero:
        folder.write_metrics(summary)
    if cfg.get("print_table", True):
        print_tables(records, summary)
    return summary["metrics"]


def run(cfg: DictConfig) -> float | None:
    """Hydra job body: train, then hand the sweeper its metric. Known user errors exit 2."""
    note = demo_recipe_note(hydra_choices(), cfg)
    if note:
        print(note, file=sys.stderr, flush=True)
    try:
        metrics = train(cfg)
    except USER_ERRORS as exc:
        user_error(exc, cfg.paths.output_dir)
        return None
    except InstantiationException as exc:  # Hydra wraps errors raised in a constructor
        if not isinstance(exc.__cause__, USER_ERRORS):
            raise
        user_error(exc.__cause__, cfg.paths.output_dir)
        return None
    except SIGTERMException:
        report_interrupt(Interrupted(143, Path(cfg.paths.output_dir) / "checkpoints"))
    except Interrupted as exc:
        report_interrupt(exc)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return None if value is None else float(value)


def main() -> float | None:
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
    def _main(cfg: DictConfig) -> float | None:
        return run(cfg)

    return _main()
