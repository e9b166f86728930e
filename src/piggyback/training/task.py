"""One task of a run: prepare its data and module, fit, test, write its artifact.

The module carries over from the previous task unless the method trains a separate network
per task. Every check that can fail is done before fitting: the input channels of this task
and of every task still to come are compared with the backbone as soon as it exists, and a
``resume=`` checkpoint must belong to this task, method and backbone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.compile import from_compiled
from omegaconf import DictConfig

from piggyback.config.validate import check_channels, check_resume
from piggyback.data.base import TaskDataModule
from piggyback.formats import save_artifact
from piggyback.models.module import PiggybackModule
from piggyback.training.assembly import build_loggers, finish_loggers, task_trainer
from piggyback.training.collapse import CollapseMonitor
from piggyback.training.interrupt import fit_or_interrupt
from piggyback.training.run_folder import RunFolder
from piggyback.utils.instantiate import build, to_dict

__all__ = [
    "build_module",
    "collapse_record",
    "compile_module",
    "export_artifact",
    "prepare_task",
    "scalar_metrics",
    "train_task",
]


def build_module(cfg: DictConfig, datamodule: TaskDataModule) -> PiggybackModule:
    """A new module for the task of ``datamodule``, configured by the run's config.

    ``model.compile=true`` compiles it the Lightning way, ``torch.compile`` and then
    Lightning's ``from_compiled`` (what ``trainer.fit`` does with a compiled module), so that
    the rest of the run, and every later task of a sequence, keeps the LightningModule; the
    masks are traced as plain tensor ops (``piggyback.nn.traceable_masked_weight``).
    """
    module = PiggybackModule(
        backbone=to_dict(cfg.backbone),
        task=datamodule.task_name,
        num_classes=datamodule.num_classes,
        method=to_dict(cfg.method),
        mask=to_dict(cfg.mask),
        channels_last=cfg.model.get("channels_last", False),
        log_layer_sparsity=cfg.model.get("log_layer_sparsity", True),
        recompute_masked_weights=cfg.model.get("recompute_masked_weights", False),
    )
    if cfg.model.get("compile", False):
        module = compile_module(module, to_dict(cfg.model.get("compile_options")) or None)
    return module


def compile_module(
    module: PiggybackModule, options: dict[str, Any] | None = None
) -> PiggybackModule:
    """``torch.compile(module, options=options)`` kept a LightningModule (``from_compiled``).

    ``options`` are Inductor's (``model.compile_options``). On CPU Inductor's
    ``layout_optimization`` (on by default) runs convolutions channels-last and so transposes
    every masked weight ``W * M``, and a copy of ``W`` for the backward, at every step:
    ``layout_optimization: false`` took the compiled Piggyback step from 1.13-1.18x to
    1.05-1.10x the compiled fine-tuning step at batch 16, 96 px (benchmarks/README.md,
    "torch.compile").
    Unknown options are refused before any work starts (``piggyback.config.validate.check_config``).
    """
    return from_compiled(torch.compile(module, options=options))


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The one-number entries of a metrics dict (tensors and Python numbers), as floats."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


def prepare_task(
    cfg: DictConfig,
    datamodule: TaskDataModule,
    module: PiggybackModule | None,
    later: list[TaskDataModule],
) -> PiggybackModule:
    """The module that learns this task, with the data set up for fitting and checked."""
    task = datamodule.task_name
    datamodule.prepare_data()
    if module is None or module.method.separate_networks:
        module = build_module(cfg, datamodule)
    else:
        module.add_task(task, datamodule.num_classes)
    for other in [datamodule, *later]:
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
    return module


def export_artifact(
    cfg: DictConfig,
    module: PiggybackModule,
    task: str,
    metrics: dict[str, Any],
    folder: RunFolder,
) -> dict[str, Any]:
    """Write the artifact of ``task`` (the module's current task); returns the record fields
    that describe it."""
    artifact = module.export_task(
        config=to_dict(cfg),
        metrics=metrics,
        encoding=cfg.get("artifact_encoding", "bits"),
    )
    path = save_artifact(
        artifact,
        folder.artifact(task),
        overwrite=cfg.get("overwrite_artifacts", False),
    )
    return {
        "artifact": str(path),
        "artifact_bytes": path.stat().st_size,
        "task_bytes": artifact.task_bytes(),
        "bits_per_masked_weight": artifact.bits_per_masked_weight(),
    }


def collapse_record(trainer: Any) -> dict[str, Any]:
    """From the Trainer's :class:`CollapseMonitor`: ``collapsed``, whether the task ended
    collapsed (the warning fired for its last checked epoch; None if no epoch was checked),
    and ``collapse_epochs``, every epoch the warning fired for (a slow start that recovered
    shows here only). Nothing without a monitor (``callbacks=none``): unchecked."""
    monitors = [c for c in trainer.callbacks if isinstance(c, CollapseMonitor)]
    if not monitors:
        return {}
    last = [m.last_epoch_collapsed for m in monitors if m.last_epoch_collapsed is not None]
    epochs = sorted({e for m in monitors for e in m.collapsed_epochs})
    return {"collapsed": any(last) if last else None, "collapse_epochs": epochs}


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
    folder = RunFolder(Path(output_dir))
    datamodule = build(data) if isinstance(data, DictConfig) else data
    task = datamodule.task_name
    first_task = module is None
    module = prepare_task(cfg, datamodule, module, later or [])
    if ckpt_path:
        check_resume(ckpt_path, task, cfg.method.name, cfg.backbone.name)

    loggers = build_loggers(cfg, task)
    ckpt_dir = folder.checkpoints(task)
    trainer = task_trainer(cfg, task, loggers, ckpt_dir, model_summary=first_task)
    train_seconds = None
    try:
        if cfg.get("train", True):
            start = time.perf_counter()
            fit_or_interrupt(trainer, module, datamodule, ckpt_path, ckpt_dir)
            train_seconds = time.perf_counter() - start
        metrics = scalar_metrics(trainer.callback_metrics)
        if cfg.get("test", True):
            results = trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(scalar_metrics(results[0] if results else {}))
    finally:
        finish_loggers(loggers)

    record: dict[str, Any] = {"task": task, "method": module.method.name, **metrics}
    record["train_seconds"] = train_seconds
    if train_seconds is not None:  # fitted here: whether the loss sat at chance
        record.update(collapse_record(trainer))
    record["datamodule"] = datamodule  # for the continual-learning evaluation; not saved
    if "masks/zeros" in metrics:
        record["masked_off"] = metrics["masks/zeros"]
    if cfg.get("save_artifacts", True) and trainer.is_global_zero:
        record.update(export_artifact(cfg, module, task, metrics, folder))
    return module, record
