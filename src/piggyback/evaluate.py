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
import csv
import io
import json
import logging
import math
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from piggyback.backbones import build_backbone
from piggyback.instantiate import build
from piggyback.masks.artifact import ArtifactError, TaskArtifact, load_artifact
from piggyback.masks.stats import total_sparsity
from piggyback.metrics import decathlon_domain_scores, decathlon_score, is_decathlon_task
from piggyback.multitask import MultiTaskModel, save_bundle
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

METHOD_ORDER = ("classifier_only", "finetune", "piggyback")  # the paper's column order
TABLE_COLUMNS = (
    "task",
    "method",
    "top1_pct",
    "top5_pct",
    "masked_off_pct",
    "task_bytes",
    "bits_per_masked_weight",
    "source",
    "n_test",
    "backbone",
    "decathlon_points",
    "note",
    "artifact",
)
SOURCE_TEST = "test split"
SOURCE_STORED = "stored"
SOURCE_NONE = "missing"


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


def load_entries(
    paths: str | os.PathLike | Iterable[str | os.PathLike], *, latest_only: bool = False
) -> tuple[list[Entry], list[str]]:
    """Load and label every artifact; ``latest_only`` keeps the newest per method/backbone/task.

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


@torch.no_grad()
def _accuracy(
    model: MultiTaskModel, task: str, loader: Any, device: torch.device, limit: int | None
) -> tuple[float, float, int]:
    """Top-1 and top-5 (top-k capped at the number of classes, as in training) and count."""
    model.set_task(task)
    correct1 = correct5 = total = 0
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        logits = model(x)
        k = min(5, logits.shape[1])
        correct1 += int((logits.argmax(dim=1) == y).sum())
        correct5 += int((logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum())
        total += len(y)
    if total == 0:
        raise ValueError(f"task {task!r}: the test split is empty")
    return correct1 / total, correct5 / total, total


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
    masked = a.method == "piggyback" and bool(a.masks)
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


def _method_key(label: str) -> tuple[int, str]:
    base = label.split("/")[0].split("@")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)


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


def _log_to_loggers(cfg: DictConfig, result: dict[str, Any]) -> None:
    """Tables to W&B (offline unless configured otherwise), scalars to every logger."""
    nodes = [n for n in (cfg.get("logger") or {}).values() if n and "_target_" in n]
    if not nodes:
        return
    flat: dict[str, float] = {}
    for label, s in result["summary"].items():
        for key in ("mean_top1_pct", "mean_top5_pct", "decathlon_score"):
            if s[key] is not None:
                flat[f"eval/{label}/{key}"] = float(s[key])
        flat[f"eval/{label}/total_bytes"] = float(s["storage"]["total_bytes"])
    loggers = []
    try:
        for node in nodes:
            fill = {k: "eval" for k in ("name", "version", "job_type") if k in node}
            loggers.append(build(node, **fill))
        for logger in loggers:
            logger.log_metrics(flat)
            if type(logger).__name__ == "WandbLogger":
                cols = list(TABLE_COLUMNS)
                logger.log_table(
                    key="eval/results",
                    columns=cols,
                    data=[[r[c] for c in cols] for r in result["rows"]],
                )
                comp = result.get("comparison")
                if comp:
                    logger.log_table(
                        key="eval/comparison",
                        columns=comp["columns"],
                        data=[[row.get(c) for c in comp["columns"]] for row in comp["rows"]],
                    )
    finally:
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.finalize("success")
                wandb.finish()
            else:
                logger.finalize("success")


def _comparison(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any] | None:
    """The paper's layout: one row per task, one column per method (top-1 %)."""
    labels = sorted(summary, key=_method_key)
    if len(labels) < 2:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    acc = {(r["task"], r["method"]): r for r in rows}
    out_rows: list[dict[str, Any]] = []
    for task in tasks:
        row: dict[str, Any] = {"task": task}
        for label in labels:
            r = acc.get((task, label))
            row[label] = None if r is None else r["top1_pct"]
            row[f"{label}:source"] = None if r is None else r["source"]
        out_rows.append(row)
    out_rows.append({"task": "mean top-1", **{lb: summary[lb]["mean_top1_pct"] for lb in labels}})
    if any(summary[lb]["decathlon_score"] is not None for lb in labels):
        out_rows.append(
            {"task": "decathlon S", **{lb: summary[lb]["decathlon_score"] for lb in labels}}
        )
    out_rows.append(
        {"task": "total bytes", **{lb: summary[lb]["storage"]["total_bytes"] for lb in labels}}
    )
    return {"columns": ["task", *labels], "rows": out_rows}


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    sep = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    """The printed / ``results.md`` report: per task, per method, comparison, notes."""
    rows, summary = result["rows"], result["summary"]
    marks: list[str] = []
    dec = any(r["decathlon_points"] is not None for r in rows)

    def source(r: dict[str, Any]) -> str:
        if r["source"] == SOURCE_TEST:
            return f"test split (n={r['n_test']})"
        marks.append(f"- {r['task']} / {r['method']}: {r['note']}")
        return f"**{r['source']}** [{len(marks)}]"

    header = ["task", "method", "top-1 %", "top-5 %", "masked off %", "task bytes"]
    header += ["bits/masked weight"] + (["decathlon pts"] if dec else []) + ["source"]
    body = []
    for r in rows:
        line = [
            r["task"],
            r["method"],
            _fmt(r["top1_pct"]),
            _fmt(r["top5_pct"]),
            _fmt(r["masked_off_pct"]),
            _fmt_bytes(r["task_bytes"]),
            _fmt(r["bits_per_masked_weight"], 3),
        ]
        line += [_fmt(r["decathlon_points"], 1)] if dec else []
        body.append([*line, source(r)])
    parts = ["### Per task", _markdown(header, body, set(range(2, len(header) - 1)))]

    header = ["method", "backbone", "tasks", "mean top-1 %", "mean top-5 %"]
    header += (["decathlon S"] if dec else []) + ["multi-task model", "N separate networks"]
    header += ["x backbone"]
    body = []
    for label in sorted(summary, key=_method_key):
        s, st = summary[label], summary[label]["storage"]
        tasks = str(s["num_tasks"]) + (
            "" if s["num_scored"] == s["num_tasks"] else f" ({s['num_scored']} scored)"
        )
        line = [label, s["backbone"], tasks, _fmt(s["mean_top1_pct"]), _fmt(s["mean_top5_pct"])]
        if dec:
            score = s["decathlon_score"]
            line.append("-" if score is None else f"{score:.0f} ({s['decathlon_domains']}/10)")
        line += [
            f"{_fmt_bytes(st['total_bytes'])} (backbone {_fmt_bytes(st['backbone_bytes'])})",
            _fmt_bytes(st["separate_networks_bytes"]),
            f"{st['x_backbone']:.3f}",
        ]
        body.append(line)
    parts += ["### Per method (multi-task model = backbone once + every task)"]
    parts += [_markdown(header, body, set(range(2, len(header))))]

    comp = result.get("comparison")
    if comp:
        parts += ["### Comparison: top-1 % per task and method", format_comparison(comp)]
    notes = marks + [f"- {n}" for n in result.get("notes", [])]
    if notes:
        parts += ["Notes:\n" + "\n".join(notes)]
    return "\n\n".join(parts)


def format_comparison(comp: dict[str, Any]) -> str:
    labels = comp["columns"][1:]
    body = []
    for row in comp["rows"]:
        line = [row["task"]]
        for label in labels:
            value = row.get(label)
            if row["task"] == "total bytes":
                line.append(_fmt_bytes(value))
            elif row["task"] == "decathlon S":
                line.append("-" if value is None else f"{value:.0f}")
            else:
                stored = row.get(f"{label}:source") == SOURCE_STORED
                line.append(_fmt(value) + ("*" if stored and value is not None else ""))
        body.append(line)
    text = _markdown(["task", *labels], body, set(range(1, len(labels) + 1)))
    if any(r.get(f"{lb}:source") == SOURCE_STORED for r in comp["rows"] for lb in labels):
        text += "\n\n\\* stored training-time test accuracy (test data could not be rebuilt)"
    return text


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    path.write_text(buffer.getvalue())


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_") or "model"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate every artifact under ``cfg.artifacts``; writes the report into the output dir.

    Returns what ``results.json`` holds: ``rows`` (one per task and method), ``summary``
    (per method: mean accuracy, decathlon score, storage), ``comparison`` (when several
    methods are given) and ``notes``.
    """
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries, notes = load_entries(cfg.artifacts, latest_only=cfg.get("latest_only", False))
    device = _device(str(cfg.get("device", "auto")))
    limit = cfg.get("limit_test_batches")
    fallback = cfg.get("fallback_to_stored", True)

    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e.label].append(e)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    pristine: dict[str, Any] = {}
    for label in sorted(groups, key=_method_key):
        group = groups[label]
        model = _build_model(group, cfg, pristine).to(device)
        group_rows = []
        for e in group:
            row = _row(e)
            loader, why = _test_loader(e.artifact, cfg)
            if loader is not None:
                top1, top5, n = _accuracy(model, e.artifact.task, loader, device, limit)
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
                model, output_dir / "bundles" / f"{_safe_name(label)}.safetensors", overwrite=True
            )
            storage["bundle_file"] = str(path)
            storage["bundle_file_bytes"] = path.stat().st_size
        summary[label] = _summary(label, group_rows, storage)
        rows.extend(group_rows)
        del model

    result: dict[str, Any] = {
        "artifacts": [str(p) for p in _as_list(cfg.artifacts)],
        "rows": rows,
        "summary": summary,
        "comparison": _comparison(rows, summary),
        "notes": notes,
        "output_dir": str(output_dir),
    }
    report = format_report(result)
    (output_dir / "results.md").write_text(report + "\n")
    (output_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    _write_csv(output_dir / "results.csv", TABLE_COLUMNS, rows)
    if result["comparison"]:
        comp = result["comparison"]
        (output_dir / "comparison.md").write_text(format_comparison(comp) + "\n")
        _write_csv(output_dir / "comparison.csv", comp["columns"], comp["rows"])
    _log_to_loggers(cfg, result)
    if cfg.get("print_table", True):
        print(report, flush=True)
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra job body: known user errors become one line on stderr and exit code 2."""
    try:
        return evaluate(cfg)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()
