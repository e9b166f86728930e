"""Evaluation entry point: every task artifact of one or more runs, on one shared backbone.

``evaluate(cfg)`` is a pure function of the config (tests call it directly); ``main`` is the
Hydra wrapper (``piggyback-eval`` / ``python evaluate.py``) that turns known user errors
into a one-line message and exit code 2.

Artifacts are grouped by *method label* (the method name, made unique per backbone and per
run when several runs hold the same task), and every group is loaded into one
:class:`~piggyback.multitask.MultiTaskModel`: what is evaluated is the deployed multi-task
model, not each training run's own module. Each task's test data is rebuilt from the
resolved config stored in its artifact, so evaluation uses the transforms the task was
trained with, not today's defaults. When that data cannot be rebuilt, the test accuracy
measured at training time (stored in the artifact) is reported instead and flagged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from piggyback.backbones import build_backbone
from piggyback.formats import ArtifactError, TaskArtifact, load_artifact
from piggyback.instantiate import build
from piggyback.masks.stats import total_sparsity
from piggyback.metrics import decathlon_domain_scores, decathlon_score, is_decathlon_task
from piggyback.multitask import MultiTaskModel, save_bundle
from piggyback.report import (
    SOURCE_NONE,
    SOURCE_STORED,
    SOURCE_TEST,
    TABLE_COLUMNS,
    comparison,
    format_comparison,
    format_report,
    log_to_loggers,
    method_key,
    safe_name,
    write_csv,
)
from piggyback.resolvers import register_resolvers
from piggyback.task_report import (  # task inference (issue 16)
    group_task_inference,
    report_task_inference,
    strategy_list,
)
from piggyback.train import CONF_DIR, USER_ERRORS

log = logging.getLogger(__name__)

__all__ = [
    "evaluate",
    "find_artifact_files",
    "load_entries",
    "main",
    "newest_run_artifacts",
    "run",
]


# ------------------------------------------------------------------------- finding artifacts
def _as_list(paths: Any) -> list[Any]:
    if isinstance(paths, ListConfig):
        paths = OmegaConf.to_container(paths, resolve=True)
    if isinstance(paths, str | os.PathLike):
        return [paths]
    return list(paths or [])


def find_artifact_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Artifact files from files, artifact folders, or (multi)run output folders.

    A folder contributes the ``*.safetensors`` directly in it plus every
    ``artifacts/*.safetensors`` below it, so a multirun folder yields all of its jobs.
    """
    found: dict[Path, None] = {}
    for raw in _as_list(paths):
        path = Path(raw).expanduser()
        if path.is_file():
            found.setdefault(path.resolve(), None)
        elif path.is_dir():
            direct = sorted(path.glob("*.safetensors"))
            nested = sorted(p for p in path.rglob("*.safetensors") if p.parent.name == "artifacts")
            for p in [*direct, *nested]:
                found.setdefault(p.resolve(), None)
        else:
            raise FileNotFoundError(
                f"{path} does not exist: pass artifact files or run folders with "
                "artifacts=<path> (a list works too: 'artifacts=[run1,run2]')"
            )
    if not found:
        where = ", ".join(str(p) for p in _as_list(paths)) or "(nothing given)"
        raise FileNotFoundError(
            f"no task artifacts (artifacts/*.safetensors) under {where}; run `python train.py` "
            "first, or point artifacts= at a run folder or artifact files"
        )
    return list(found)


def newest_run_artifacts(
    root: str | os.PathLike = "outputs/demo", *, method: str | None = "piggyback"
) -> Path:
    """The ``artifacts`` folder of the newest run under ``root`` (optionally of one method).

    What the notebook opens by default: the last demo run that learned masks.
    """
    root = Path(root)
    folders = sorted(
        (p for p in root.glob("*/artifacts") if any(p.glob("*.safetensors"))),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for folder in folders:
        if method is None:
            return folder
        for file in folder.glob("*.safetensors"):
            try:
                if load_artifact(file).method == method:
                    return folder
            except ArtifactError:
                continue
    what = f"{method} " if method else ""
    raise FileNotFoundError(
        f"no {what}run with artifacts under {root.resolve()}: run the demo first "
        "(`python train.py` in the repository root) or give the artifacts folder explicitly"
    )


@dataclass
class Entry:
    """One artifact found on disk, with the run it came from and its comparison label."""

    path: Path
    artifact: TaskArtifact
    run: str
    label: str = ""
    selection: str = ""  # why this run was chosen over others (best_by_val), else empty


def _run_name(path: Path, roots: Sequence[Path]) -> str:
    run_dir = path.parent.parent if path.parent.name == "artifacts" else path.parent
    for root in roots:
        try:
            rel = run_dir.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        return str(rel) if str(rel) != "." else run_dir.name
    return run_dir.name


def _assign_labels(entries: list[Entry]) -> None:
    """Method name, plus ``/backbone`` and ``@run`` only where needed to keep labels unique.

    Two runs of one method on the same task (re-runs, sweep jobs) get one column each
    instead of one silently winning.
    """
    by_method: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_method[e.artifact.method].append(e)
    for method, group in by_method.items():
        backbones = {e.artifact.backbone for e in group}

        def base(e: Entry, method: str = method, many: bool = len(backbones) > 1) -> str:
            return f"{method}/{e.artifact.backbone}" if many else method

        tasks = Counter((base(e), e.artifact.task) for e in group)
        prints: dict[str, set[str]] = defaultdict(set)
        for e in group:
            prints[base(e)].add(e.artifact.fingerprint)
        split = {b for (b, _), n in tasks.items() if n > 1} | {
            b for b, fps in prints.items() if len(fps) > 1
        }
        for e in group:
            e.label = f"{base(e)}@{e.run}" if base(e) in split else base(e)
    seen: dict[tuple[str, str], Path] = {}
    for e in entries:
        key = (e.label, e.artifact.task)
        if key in seen:
            raise ArtifactError(
                f"{e.path} and {seen[key]} both hold task {e.artifact.task!r} of "
                f"{e.label!r}; pass only one of them"
            )
        seen[key] = e.path


def select_best_by_val(
    entries: list[Entry], metric: str = "val/acc"
) -> tuple[list[Entry], list[str]]:
    """One run per method/backbone/task: the highest ``metric`` stored at training time.

    For a learning-rate sweep (a multirun folder): runs are compared on the validation split
    only, never on test, so the reported test accuracy stays an unbiased estimate. Runs that
    stored no ``metric`` cannot be ranked; they are kept only when no run of the group has it.
    """
    groups: dict[tuple[str, str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        groups[(e.artifact.method, e.artifact.backbone, e.artifact.task)].append(e)
    keep: set[int] = set()
    notes: list[str] = []
    for (method, _, task), group in groups.items():
        ranked = [e for e in group if isinstance(e.artifact.metrics.get(metric), int | float)]
        if len(group) == 1 or not ranked:
            keep.update(id(e) for e in group)
            if len(group) > 1:
                notes.append(f"best_by_val: no {metric} stored for {method}/{task}; kept all runs")
            continue
        best = max(ranked, key=lambda e: (e.artifact.metrics[metric], e.run))
        others = ", ".join(
            f"{e.run} ({e.artifact.metrics.get(metric, '-')})" for e in group if e is not best
        )
        best.selection = f"{metric}={best.artifact.metrics[metric]:.4f} best of {len(group)} runs"
        notes.append(
            f"best_by_val: {method}/{task}: selected run {best.run} "
            f"({metric} {best.artifact.metrics[metric]:.4f}) over {others}"
        )
        keep.add(id(best))
    return [e for e in entries if id(e) in keep], notes


def load_entries(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    latest_only: bool = False,
    best_by_val: bool = False,
) -> tuple[list[Entry], list[str]]:
    """Load and label every artifact; ``latest_only`` keeps the newest per method/backbone/task,
    ``best_by_val`` the one with the best stored validation accuracy (a sweep's selection).

    Returns the entries and notes about anything left out (never silently).
    """
    roots = [Path(p).expanduser() for p in _as_list(paths)]
    entries = [Entry(p, load_artifact(p), _run_name(p, roots)) for p in find_artifact_files(paths)]
    notes: list[str] = []
    if latest_only:
        newest: dict[tuple[str, str, str], Entry] = {}
        for e in sorted(entries, key=lambda e: e.path.stat().st_mtime):
            key = (e.artifact.method, e.artifact.backbone, e.artifact.task)
            if key in newest:
                notes.append(f"latest_only: ignored {newest[key].path} (newer: {e.path})")
            newest[key] = e
        entries = [
            e
            for e in entries
            if newest[(e.artifact.method, e.artifact.backbone, e.artifact.task)] is e
        ]
    if best_by_val:
        entries, selected = select_best_by_val(entries)
        notes += selected
    # A run writes its artifacts as it finishes each task, so file times give the training
    # order (the stored config cannot: its JSON keys are sorted).
    entries.sort(key=lambda e: (e.path.stat().st_mtime, str(e.path)))
    _assign_labels(entries)
    return entries, notes


# ------------------------------------------------------------------------- rebuilding
def _backbone_config(artifact: TaskArtifact, cfg: DictConfig) -> dict[str, Any]:
    stored = dict(((artifact.config or {}).get("backbone")) or {})
    conf: dict[str, Any] = {
        "name": stored.get("name", artifact.backbone),
        "weights": stored.get("weights", "DEFAULT"),
        "checkpoint": stored.get("checkpoint"),
        "cache_dir": stored.get("cache_dir"),
    }
    if not conf["cache_dir"] or not Path(conf["cache_dir"]).is_dir():
        conf["cache_dir"] = cfg.paths.get("cache_dir")
    overrides = OmegaConf.to_container(cfg.get("backbone") or {}, resolve=True)
    conf.update({k: v for k, v in overrides.items() if v is not None})  # type: ignore[union-attr]
    return conf


def _build_model(entries: list[Entry], cfg: DictConfig, pristine: dict[str, Any]) -> MultiTaskModel:
    """A multi-task model for one method group; ``pristine`` caches backbones across groups
    (the model masks its backbone in place, so every group gets its own copy)."""
    conf = _backbone_config(entries[0].artifact, cfg)
    key = json.dumps(conf, sort_keys=True, default=str)
    if key not in pristine:
        pristine[key] = build_backbone(
            conf["name"],
            weights=conf["weights"],
            checkpoint=conf["checkpoint"],
            cache_dir=conf["cache_dir"],
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


def _task_data_config(artifact: TaskArtifact) -> dict[str, Any] | None:
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


def _rebase(value: Any, old: str, new: str) -> Any:
    """Replace the data-root prefix ``old`` with ``new`` in every path string of a config."""
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new.rstrip("/") + value[len(old.rstrip("/")) :]
    return value


def _error_text(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # hydra wraps constructor errors
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _test_loader(artifact: TaskArtifact, cfg: DictConfig) -> tuple[Any, str]:
    """(test DataLoader, "") or (None, why it could not be built)."""
    data = _task_data_config(artifact)
    if data is None:
        return None, "the artifact stores no data config for this task"
    overrides = OmegaConf.to_container(cfg.get("data") or {}, resolve=True)
    data.update({k: v for k, v in overrides.items() if v is not None})  # type: ignore[union-attr]
    candidates = []
    old_root = ((artifact.config or {}).get("paths") or {}).get("data_dir")
    new_root = cfg.paths.get("data_dir")
    if old_root and new_root and str(old_root) != str(new_root):
        candidates.append(_rebase(data, str(old_root), str(new_root)))
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
            errors.append(_error_text(exc))
    why = f"test data unavailable: {errors[0]}"
    if len(errors) > 1:
        why += f" (the training run's own data_dir {old_root} failed too)"
    return None, why


class TaskTester(L.LightningModule):
    """Tests one task of a multi-task model under ``Trainer.test``: top-1 and top-5 accuracy.

    Evaluation runs the deployed :class:`MultiTaskModel`, not a training module; this wrapper
    only switches it to the task and feeds torchmetrics (top-k capped at the number of
    classes, as in training), so devices, precision and batch limits are Lightning's job.
    """

    def __init__(self, model: MultiTaskModel, task: str, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.count = SumMetric()

    def on_test_start(self) -> None:
        self.model.set_task(self.task)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        self.top1.update(logits, y)
        self.top5.update(logits, y)
        self.count.update(torch.tensor(float(len(y)), device=logits.device))

    def on_test_epoch_end(self) -> None:
        top1, top5, count = self.top1.compute(), self.top5.compute(), self.count.compute()
        self.results = (float(top1), float(top5), int(count))


def _accuracy(
    model: MultiTaskModel,
    task: str,
    num_classes: int,
    loader: Any,
    device: torch.device,
    limit: int | None,
) -> tuple[float, float, int]:
    """(top-1, top-5, number of test samples) of one task through ``Trainer.test``."""
    tester = TaskTester(model, task, num_classes)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=1.0 if limit is None else limit,
    )
    trainer.test(tester, dataloaders=loader, verbose=False)
    top1, top5, n = tester.results
    if n == 0:
        raise ValueError(f"task {task!r}: the test split is empty")
    return top1, top5, n


# ------------------------------------------------------------------------- the report
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _is_decathlon(artifact: TaskArtifact) -> bool:
    """Decathlon domain by name; a stored data config from another source (torchvision's
    full-resolution Aircraft, say) does not count, since S is defined on the devkit data."""
    if not is_decathlon_task(artifact.task):
        return False
    data = _task_data_config(artifact) or {}
    target = str(data.get("_target_", ""))
    return not target or "Decathlon" in target


def _row(e: Entry) -> dict[str, Any]:
    a = e.artifact
    masked = bool(a.masks)  # methods that store masks report their sparsity
    return {
        "task": a.task,
        "method": e.label,
        "base_method": a.method,
        "backbone": a.backbone,
        "top1_pct": None,
        "top5_pct": None,
        "n_test": None,
        "masked_off_pct": 100.0 * total_sparsity(a.unpacked_masks()) if masked else None,
        "task_bytes": a.task_bytes(),
        "bits_per_masked_weight": a.bits_per_masked_weight() if masked else None,
        "source": SOURCE_NONE,
        "decathlon_points": None,
        "note": "",
        "artifact": str(e.path),
        "run": e.run,
        "selection": e.selection,
    }


def _stored(row: dict[str, Any], artifact: TaskArtifact, why: str) -> None:
    acc = artifact.metrics.get("test/acc")
    top5 = artifact.metrics.get("test/acc_top5")
    if acc is None:
        row["note"] = f"{why}; no test accuracy stored in the artifact either"
        return
    row["top1_pct"] = 100.0 * acc
    row["top5_pct"] = None if top5 is None else 100.0 * top5
    row["source"] = SOURCE_STORED
    row["note"] = f"{why}; accuracy is the training-time test result stored in the artifact"


def _summary(label: str, rows: list[dict[str, Any]], storage: dict[str, Any]) -> dict[str, Any]:
    scored = [r for r in rows if r["top1_pct"] is not None]
    top5 = [r["top5_pct"] for r in scored if r["top5_pct"] is not None]
    out: dict[str, Any] = {
        "method": label,
        "base_method": rows[0]["base_method"],
        "backbone": rows[0]["backbone"],
        "num_tasks": len(rows),
        "num_scored": len(scored),
        "mean_top1_pct": sum(r["top1_pct"] for r in scored) / len(scored) if scored else None,
        "mean_top5_pct": sum(top5) / len(top5) if top5 else None,
        "decathlon_score": None,
        "decathlon_domains": 0,
        "storage": storage,
    }
    dec = [r for r in scored if r["decathlon_points"] is not None]
    if dec:
        out["decathlon_score"] = decathlon_score({r["task"]: r["top1_pct"] for r in dec})
        out["decathlon_domains"] = len(dec)
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate every artifact under ``cfg.artifacts``; writes the report into the output dir.

    Returns what ``results.json`` holds: ``rows`` (one per task and method), ``summary``
    (per method: mean accuracy, decathlon score, storage), ``comparison`` (when several
    methods are given) and ``notes``.
    """
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries, notes = load_entries(
        cfg.artifacts,
        latest_only=cfg.get("latest_only", False),
        best_by_val=cfg.get("best_by_val", False),
    )
    device = _device(str(cfg.get("device", "auto")))
    limit = cfg.get("limit_test_batches")
    fallback = cfg.get("fallback_to_stored", True)
    strategy_list(cfg.get("task_inference"))  # task inference: names checked up front

    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e.label].append(e)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    pristine: dict[str, Any] = {}
    for label in sorted(groups, key=method_key):
        group = groups[label]
        model = _build_model(group, cfg, pristine).to(device)
        group_rows = []
        loaders = {}  # task inference: every task's test loader
        for e in group:
            row = _row(e)
            loader, why = _test_loader(e.artifact, cfg)
            if loader is not None:  # task inference
                loaders[e.artifact.task] = loader
            if loader is not None:
                top1, top5, n = _accuracy(
                    model, e.artifact.task, e.artifact.num_classes, loader, device, limit
                )
                row.update(top1_pct=100 * top1, top5_pct=100 * top5, n_test=n, source=SOURCE_TEST)
                if limit is not None:
                    row["note"] = f"first {limit} test batches only (limit_test_batches)"
            elif fallback:
                _stored(row, e.artifact, why)
            else:
                raise FileNotFoundError(
                    f"task {e.artifact.task!r} ({e.path}): {why}. Fix paths.data_dir, or allow "
                    "fallback_to_stored=true to report the accuracy stored at training time"
                )
            if _is_decathlon(e.artifact) and row["top1_pct"] is not None:
                points = decathlon_domain_scores({e.artifact.task: row["top1_pct"]})
                row["decathlon_points"] = next(iter(points.values()))
            group_rows.append(row)
        storage = model.storage()
        if cfg.get("save_bundles", False):
            path = save_bundle(
                model, output_dir / "bundles" / f"{safe_name(label)}.safetensors", overwrite=True
            )
            storage["bundle_file"] = str(path)
            storage["bundle_file_bytes"] = path.stat().st_size
        summary[label] = _summary(label, group_rows, storage)
        block = group_task_inference(cfg, model, loaders, device)  # task inference
        if block is not None:
            summary[label]["task_inference"] = block
        rows.extend(group_rows)
        del model

    result: dict[str, Any] = {
        "artifacts": [str(p) for p in _as_list(cfg.artifacts)],
        "rows": rows,
        "summary": summary,
        "comparison": comparison(rows, summary),
        "notes": notes,
        "output_dir": str(output_dir),
    }
    report = format_report(result)
    (output_dir / "results.md").write_text(report + "\n")
    (output_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    write_csv(output_dir / "results.csv", TABLE_COLUMNS, rows)
    if result["comparison"]:
        comp = result["comparison"]
        (output_dir / "comparison.md").write_text(format_comparison(comp) + "\n")
        write_csv(output_dir / "comparison.csv", comp["columns"], comp["rows"])
    log_to_loggers(cfg, result)
    if cfg.get("print_table", True):
        print(report, flush=True)
    report_task_inference(result, output_dir, cfg.get("print_table", True))  # task inference
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra job body: known user errors become one line on stderr and exit code 2."""
    try:
        return evaluate(cfg)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()
