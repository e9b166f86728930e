"""Training entry point: ``train(cfg)`` runs one task or a sequence of tasks.

``train`` is a pure function of the config (tests and sweeps call it directly); ``main`` is
the Hydra wrapper that turns known user errors into a one-line message and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from piggyback.atomic import atomic_write_text
from piggyback.backbones import BackboneError
from piggyback.cl import cl_summary, format_cl_table
from piggyback.data.base import DataError, TaskDataModule
from piggyback.formats import ArtifactError, save_artifact
from piggyback.instantiate import build, build_all, to_dict
from piggyback.module import PiggybackModule
from piggyback.resolvers import fresh_subdir, register_resolvers
from piggyback.resume import InterruptCheckpoint, RNGStateCheckpoint
from piggyback.sweep import record_job_failure
from piggyback.task_report import check_task_inference, sequence_task_inference  # issue 16
from piggyback.validate import ConfigError, check_channels, check_config, check_resume

log = logging.getLogger(__name__)

CONF_DIR = os.environ.get("PIGGYBACK_CONF", str(Path(__file__).resolve().parents[2] / "conf"))
USER_ERRORS = (
    DataError,
    BackboneError,
    ArtifactError,
    ConfigError,
    FileExistsError,
    FileNotFoundError,
)


class Interrupted(Exception):
    """Training stopped by SIGTERM/SIGINT after saving ``checkpoint``; ``code`` is 143 or 130."""

    def __init__(self, code: int, checkpoint: Path) -> None:
        super().__init__(code, checkpoint)
        self.code = code
        self.checkpoint = checkpoint


def task_configs(data_cfg: DictConfig) -> list[DictConfig]:
    """A data config is one task, or a sequence of tasks under ``tasks``."""
    if "tasks" in data_cfg:
        return list(data_cfg.tasks.values())
    return [data_cfg]


def _loggers(cfg: DictConfig, task: str) -> list[Any]:
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


def _callbacks(cfg: DictConfig, task: str, has_logger: bool = True) -> list[Any]:
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


def _finish_loggers(loggers: list[Any]) -> None:
    """Close W&B runs so the next task (or multirun job) starts a fresh one."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb  # deferred: optional logger, ~1 s to import

            logger.finalize("success")
            wandb.finish()


def build_module(cfg: DictConfig, datamodule: TaskDataModule) -> PiggybackModule:
    return PiggybackModule(
        backbone=to_dict(cfg.backbone),
        task=datamodule.task_name,
        num_classes=datamodule.num_classes,
        method=to_dict(cfg.method),
        mask=to_dict(cfg.mask),
        channels_last=cfg.model.get("channels_last", False),
        log_layer_sparsity=cfg.model.get("log_layer_sparsity", True),
    )


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


def train_task(
    cfg: DictConfig,
    data: DictConfig | TaskDataModule,
    module: PiggybackModule | None,
    output_dir: Path,
    ckpt_path: str | None = None,
    later: list[TaskDataModule] | None = None,
) -> tuple[PiggybackModule, dict[str, Any]]:
    """Fit and test one task, then write its artifact. Returns the module for the next task.

    ``later``: the tasks still to come, whose input channels are checked against the
    backbone as soon as it exists, so a sequence never fails after hours of training.
    """
    datamodule = build(data) if isinstance(data, DictConfig) else data
    task = datamodule.task_name
    datamodule.prepare_data()
    if module is None or module.method.separate_networks:
        module = build_module(cfg, datamodule)
    else:
        module.add_task(task, datamodule.num_classes)
    for other in [datamodule, *(later or [])]:
        channels = getattr(other, "input_channels", None)  # any LightningDataModule works
        if channels is not None:
            check_channels(module.backbone, channels, other.task_name)
    # The backbone's pretrained normalisation / input size, where the data config left them open.
    datamodule.adopt_backbone_config(module.backbone_data_config)
    datamodule.setup("fit")
    module.tasks[task].class_names = datamodule.class_names
    if datamodule.train_set is not None and len(datamodule.train_set) > 0:
        sample = datamodule.train_set[0][0]
        if isinstance(sample, torch.Tensor) and sample.dim() == 3:
            check_channels(module.backbone, sample.shape[0], task)

    if ckpt_path:
        check_resume(ckpt_path, task, cfg.method.name, cfg.backbone.name)
    loggers = _loggers(cfg, task)
    ckpt_dir = output_dir / "checkpoints" / task
    callbacks = _callbacks(cfg, task, has_logger=bool(loggers))
    callbacks.append(RNGStateCheckpoint())  # before the exception checkpoint saves its state
    callbacks.append(InterruptCheckpoint(ckpt_dir))
    trainer: L.Trainer = build(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    train_seconds = None
    try:
        if cfg.get("train", True):
            start = time.perf_counter()
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            except SIGTERMException:  # Lightning's SIGTERM handler, after on_exception
                raise Interrupted(143, ckpt_dir / "last.ckpt") from None
            except SystemExit:  # Lightning turns Ctrl+C into exit(1) after on_exception
                raise Interrupted(130, ckpt_dir / "last.ckpt") from None
            if trainer.received_sigterm:
                raise Interrupted(143, ckpt_dir / "last.ckpt")
            train_seconds = time.perf_counter() - start
        metrics = _scalar_metrics(trainer.callback_metrics)
        if cfg.get("test", True):
            results = trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(_scalar_metrics(results[0] if results else {}))
    finally:
        _finish_loggers(loggers)

    record: dict[str, Any] = {"task": task, "method": module.method.name, **metrics}
    record["train_seconds"] = train_seconds
    record["datamodule"] = datamodule  # for the continual-learning evaluation; not saved
    if "masks/zeros" in metrics:
        record["masked_off"] = metrics["masks/zeros"]
    if cfg.get("save_artifacts", True) and trainer.is_global_zero:
        artifact = module.export_task(
            config=to_dict(cfg),
            metrics=metrics,
            encoding=cfg.get("artifact_encoding", "bits"),
        )
        path = save_artifact(
            artifact,
            output_dir / "artifacts" / f"{task}.safetensors",
            overwrite=cfg.get("overwrite_artifacts", False),
        )
        record.update(
            artifact=str(path),
            artifact_bytes=path.stat().st_size,
            task_bytes=artifact.task_bytes(),
            bits_per_masked_weight=artifact.bits_per_masked_weight(),
        )
    return module, record


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
        trainer: L.Trainer = build(
            cfg.trainer,
            logger=False,
            callbacks=[],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        row.append(float(results[0]["test/acc"]))
    return row


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
    loggers = _loggers(cfg, "cl")
    scalars = {
        f"cl/{k}": float(summary[k])
        for k in ("average_accuracy", "bwt", "forgetting")
        if summary[k] is not None
    }
    for logger in loggers:
        logger.log_metrics(scalars, step=len(tasks))
        logger.save()  # outside a Trainer nothing else flushes (the CSV logger buffers)
    _finish_loggers(loggers)
    return summary


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat metrics: a single task's as they are; a sequence's as means plus per-task keys."""
    if len(records) == 1:
        return {k: v for k, v in records[0].items() if isinstance(v, float)}
    flat: dict[str, Any] = {}
    keys = {k for r in records for k, v in r.items() if isinstance(v, float)}
    for key in sorted(keys):
        values = [r[key] for r in records if key in r]
        flat[key] = sum(values) / len(values)
        for r in records:
            if key in r:
                flat[f"{r['task']}/{key}"] = r[key]
    return flat


def format_table(records: list[dict[str, Any]]) -> str:
    lines = [
        f"{'task':<18} {'method':<20} {'test acc':>9} {'masked off':>11} {'artifact':>10}",
        "-" * 72,
    ]
    for r in records:
        acc = f"{100 * r['test/acc']:.2f}%" if "test/acc" in r else "-"
        off = f"{100 * r['masked_off']:.2f}%" if "masked_off" in r else "-"
        size = f"{r['artifact_bytes'] / 1024:.1f} KB" if "artifact_bytes" in r else "-"
        lines.append(f"{r['task']:<18} {r['method']:<20} {acc:>9} {off:>11} {size:>10}")
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train every task of ``cfg.data`` on one backbone; returns flat metrics."""
    tasks = task_configs(cfg.data)
    check_config(cfg, tasks)
    check_task_inference(cfg)  # task inference: strategy names, oneshot needs masks
    L.seed_everything(cfg.get("seed", 0), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("resume") and len(tasks) > 1:
        raise ConfigError("resume= works for a single-task run; pick one task with data=...")
    module = None
    records: list[dict[str, Any]] = []
    learned: list[tuple[str, PiggybackModule, Any]] = []  # (task, its module, its data)
    matrix: list[list[float | None]] = []
    datamodules: list[TaskDataModule] = [build(data_cfg) for data_cfg in tasks]
    for i, datamodule in enumerate(datamodules):
        module, record = train_task(
            cfg, datamodule, module, output_dir, cfg.get("resume"), later=datamodules[i + 1 :]
        )
        records.append(record)
        learned.append((record["task"], module, record.pop("datamodule")))
        if cfg.get("test", True) and "test/acc" in record:
            # after each task, every task learned so far: the accuracy matrix's next row
            row = evaluate_learned(cfg, learned) if len(tasks) > 1 else [record["test/acc"]]
            matrix.append(row + [None] * (len(tasks) - len(row)))
    metrics = summarize(records)
    summary: dict[str, Any] = {
        "backbone": cfg.backbone.name,
        "method": cfg.method.name,
        "tasks": {r["task"]: r for r in records},
        "metrics": metrics,
    }
    if len(matrix) == len(tasks):
        summary["cl"] = continual_learning(cfg, records, matrix)
        inference = sequence_task_inference(cfg, learned)  # task inference, at the cl end
        if inference is not None:
            summary["cl"]["task_inference"] = inference
    if module is None or module.trainer is None or module.trainer.is_global_zero:
        atomic_write_text(
            output_dir / "metrics.json", json.dumps(summary, indent=2), overwrite=True
        )
    if cfg.get("print_table", True):
        print(format_table(records), flush=True)
        if "cl" in summary and len(tasks) > 1:
            print(format_cl_table(summary["cl"]), flush=True)
    return metrics


def _multirun_job() -> str | None:
    """``job N (overrides)`` inside a Hydra multirun, else None."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under @hydra.main (tests call train directly)
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"job {hydra_cfg.job.num} ({','.join(hydra_cfg.overrides.task)})"


def _user_error(exc: BaseException, output_dir: str) -> None:
    """One line and exit 2; in a multirun, the job's overrides and no exit, so the sibling
    jobs of a sweep still run (the basic and joblib launchers stop at a job's exception),
    and an ``error.txt`` that makes the whole sweep exit 2 at its end (``piggyback.sweep``)."""
    job = _multirun_job()
    if job is None:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    message = f"error: {job} failed, the other jobs go on: {exc}"
    print(message, file=sys.stderr, flush=True)
    record_job_failure(output_dir, message)


DEMO_CHOICES = {"backbone": ("small_cnn",), "data": ("demo", "digits/")}


def demo_recipe_note(choices: dict[str, Any], cfg: DictConfig) -> str | None:
    """A note when the default ``experiment=demo`` (piggyback_bn, 10 epochs) runs on other
    data or another backbone, where a user would expect the paper's recipe."""
    if choices.get("experiment") != "demo":
        return None
    foreign = [
        f"{group}={choices.get(group)}"
        for group, ours in DEMO_CHOICES.items()
        if not str(choices.get(group)).startswith(ours)
    ]
    if not foreign:
        return None
    return (
        f"note: {' '.join(foreign)} runs under experiment=demo (the default), the demo's "
        f"recipe (method={choices.get('method')}, {cfg.trainer.max_epochs} epochs), not the "
        "paper's; add experiment=paper for the paper's recipe"
    )


def _hydra_choices() -> dict[str, Any]:
    try:
        return dict(HydraConfig.get().runtime.choices)
    except ValueError:  # not under @hydra.main
        return {}


def run(cfg: DictConfig) -> float | None:
    """Hydra job body: train, then hand the sweeper its metric. Known user errors exit 2."""
    note = demo_recipe_note(_hydra_choices(), cfg)
    if note:
        print(note, file=sys.stderr, flush=True)
    try:
        metrics = train(cfg)
    except USER_ERRORS as exc:
        _user_error(exc, cfg.paths.output_dir)
        return None
    except InstantiationException as exc:  # Hydra wraps errors raised in a constructor
        if not isinstance(exc.__cause__, USER_ERRORS):
            raise
        _user_error(exc.__cause__, cfg.paths.output_dir)
        return None
    except SIGTERMException:
        exc = Interrupted(143, Path(cfg.paths.output_dir) / "checkpoints")
        _report_interrupt(cfg, exc)
    except Interrupted as exc:
        _report_interrupt(cfg, exc)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return None if value is None else float(value)


def _report_interrupt(cfg: DictConfig, exc: Interrupted) -> None:
    """One line saying what was saved and how to continue, then the shell's signal exit code."""
    name = "SIGTERM" if exc.code == 143 else "SIGINT"
    print(
        f"error: interrupted by {name}; checkpoint saved to {exc.checkpoint}; resume with: "
        f"python train.py <same overrides> resume={exc.checkpoint}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(exc.code) from None


def main() -> float | None:
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
    def _main(cfg: DictConfig) -> float | None:
        return run(cfg)

    return _main()


__all__ = ["main", "run", "train", "train_task", "build_module"]
