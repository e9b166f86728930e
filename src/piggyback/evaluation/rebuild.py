"""Rebuilding what a task artifact was trained with: its backbone and its test data.

Evaluation loads every artifact of a method group into one multi-task model on the backbone
the tasks were trained on (the stored config, with ``backbone.*`` overrides), and rebuilds
each task's test DataModule from the data config stored in its artifact, so the transforms are
the ones the task was trained with. When the data cannot be rebuilt, :func:`test_loader`
says why instead of raising, so the caller can fall back to the stored accuracy.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from piggyback.backbones import build_backbone
from piggyback.evaluation.runs import Entry
from piggyback.formats import ArtifactError, TaskArtifact
from piggyback.models.multitask import MultiTaskModel
from piggyback.utils.instantiate import build

__all__ = [
    "backbone_config",
    "build_model",
    "error_text",
    "rebase",
    "task_data_config",
    "test_loader",
]


def backbone_config(artifact: TaskArtifact, cfg: DictConfig) -> dict[str, Any]:
    """The backbone the task was trained on (stored config), with ``backbone.*`` overrides."""
    stored = dict(((artifact.config or {}).get("backbone")) or {})
    conf: dict[str, Any] = {
        "name": stored.get("name", artifact.backbone),
        "weights": stored.get("weights", "DEFAULT"),
        "checkpoint": stored.get("checkpoint"),
        "cache_dir": stored.get("cache_dir"),
        "init_seed": stored.get("init_seed"),
    }
    if not conf["cache_dir"] or not Path(conf["cache_dir"]).is_dir():
        conf["cache_dir"] = cfg.paths.get("cache_dir")
    overrides = OmegaConf.to_container(cfg.get("backbone") or {}, resolve=True)
    conf.update({k: v for k, v in overrides.items() if v is not None})  # type: ignore[union-attr]
    return conf


def build_model(entries: list[Entry], cfg: DictConfig, pristine: dict[str, Any]) -> MultiTaskModel:
    """A multi-task model for one method group; ``pristine`` caches backbones across groups
    (the model masks its backbone in place, so every group gets its own copy)."""
    conf = backbone_config(entries[0].artifact, cfg)
    key = json.dumps(conf, sort_keys=True, default=str)
    if key not in pristine:
        pristine[key] = build_backbone(
            conf["name"],
            weights=conf["weights"],
            checkpoint=conf["checkpoint"],
            cache_dir=conf["cache_dir"],
            init_seed=conf["init_seed"],
        )
    built = pristine[key]
    model = MultiTaskModel(copy.deepcopy(built.model), built.name)
    for e in entries:
        try:
            model.add_task(e.artifact)
        except ArtifactError as exc:
            raise ArtifactError(
                f"{e.path}: {exc} Evaluation rebuilt the backbone as {conf}; point it at the "
                "weights the task was trained on with backbone.checkpoint=... or "
                "backbone.cache_dir=..."
            ) from None
    return model


def task_data_config(artifact: TaskArtifact) -> dict[str, Any] | None:
    """The task's own DataModule config from the run config stored in the artifact."""
    data = (artifact.config or {}).get("data")
    if not data:
        return None
    if "tasks" in data:
        for node in (data["tasks"] or {}).values():
            if node and node.get("task_name") == artifact.task:
                return dict(node)
        return None
    return dict(data)


def rebase(value: Any, old: str, new: str) -> Any:
    """Replace the data-root prefix ``old`` with ``new`` in every path string of a config."""
    if isinstance(value, dict):
        return {k: rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [rebase(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new.rstrip("/") + value[len(old.rstrip("/")) :]
    return value


def error_text(exc: BaseException) -> str:
    """The first line of the innermost cause: what went wrong, without Hydra's wrapping."""
    while exc.__cause__ is not None:  # hydra wraps constructor errors
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def test_loader(artifact: TaskArtifact, cfg: DictConfig) -> tuple[Any, str]:
    """(test DataLoader, "") or (None, why it could not be built)."""
    data = task_data_config(artifact)
    if data is None:
        return None, "the artifact stores no data config for this task"
    overrides = OmegaConf.to_container(cfg.get("data") or {}, resolve=True)
    data.update({k: v for k, v in overrides.items() if v is not None})  # type: ignore[union-attr]
    candidates = []
    old_root = ((artifact.config or {}).get("paths") or {}).get("data_dir")
    new_root = cfg.paths.get("data_dir")
    if old_root and new_root and str(old_root) != str(new_root):
        candidates.append(rebase(data, str(old_root), str(new_root)))
    candidates.append(data)
    errors = []
    for node in candidates:
        try:
            datamodule = build(node)
            if datamodule.num_classes != artifact.num_classes:
                raise ValueError(
                    f"data has {datamodule.num_classes} classes, the task's head "
                    f"{artifact.num_classes}"
                )
            datamodule.prepare_data()
            datamodule.setup("test")
            return datamodule.test_dataloader(), ""
        except Exception as exc:  # any failure to rebuild data falls back, with its reason
            errors.append(error_text(exc))
    why = f"test data unavailable: {errors[0]}"
    if len(errors) > 1:
        why += f" (the training run's own data_dir {old_root} failed too)"
    return None, why
