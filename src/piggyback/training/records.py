"""What a training run reports: flat metrics, ``metrics.json``'s summary, the task table.

A single task's metrics are its own; a sequence's are the mean over tasks plus one
``<task>/<metric>`` key per task, which is what a sweeper optimises (``optimized_metric``).

``metrics.json``'s ``run`` block (:func:`run_info`) says how the run was made: seed,
learning-rate scale and the learning rates it trained with, commit, command, torch version,
machine, date and wall-clock seconds, so a results table can be rebuilt from the records
alone. A task whose training collapsed (``piggyback.training.collapse``) has
``collapsed: true`` in its record and a mark in the printed table.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning
import torch
from omegaconf import DictConfig

from piggyback.scores.continual import format_cl_table

__all__ = [
    "finished_metrics",
    "format_table",
    "print_tables",
    "run_info",
    "run_summary",
    "summarize",
]

SOURCE = Path(__file__).resolve().parents[1]
"""The package's folder: its git checkout (if any) gives the record's commit."""


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


def run_summary(cfg: DictConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``metrics.json`` holds (the ``cl`` block is added by the caller when complete)."""
    return {
        "backbone": cfg.backbone.name,
        "method": cfg.method.name,
        "tasks": {r["task"]: r for r in records},
        "metrics": summarize(records),
    }


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per task: test accuracy, share of weights masked off, artifact size, and
    ``COLLAPSED`` where the task ended collapsed (the collapse warning fired for its last
    epoch; followed by a line that names those tasks, so the warning does not scroll away
    unseen), ``recovered`` where it fired for earlier epochs only, ``-`` if unchecked."""
    lines = [
        f"{'task':<18} {'method':<20} {'test acc':>9} {'masked off':>11} {'artifact':>10}"
        f"  collapse",
        "-" * 82,
    ]
    for r in records:
        acc = f"{100 * r['test/acc']:.2f}%" if "test/acc" in r else "-"
        off = f"{100 * r['masked_off']:.2f}%" if "masked_off" in r else "-"
        size = f"{r['artifact_bytes'] / 1024:.1f} KB" if "artifact_bytes" in r else "-"
        flag = {True: "COLLAPSED", False: "no"}.get(r.get("collapsed"), "-")
        if r.get("collapsed") is False and r.get("collapse_epochs"):
            flag = f"recovered (warned: epoch {', '.join(map(str, r['collapse_epochs']))})"
        lines.append(f"{r['task']:<18} {r['method']:<20} {acc:>9} {off:>11} {size:>10}  {flag}")
    collapsed = [r for r in records if r.get("collapsed")]
    if collapsed:
        where = ", ".join(
            f"{r['task']} (epoch {', '.join(map(str, r.get('collapse_epochs', [])))})"
            for r in collapsed
        )
        lines.append(
            f"warning: training collapsed in {where}: the loss sat at chance (see the warning "
            "above; lower method.lr_scale). metrics.json marks these tasks collapsed: true."
        )
    return "\n".join(lines)


def print_tables(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The task table, and for a sequence the continual-learning table."""
    print(format_table(records), flush=True)
    if "cl" in summary and len(records) > 1:
        print(format_cl_table(summary["cl"]), flush=True)


def finished_metrics(output_dir: Path) -> dict[str, Any] | None:
    """The flat metrics of the finished run in ``output_dir``, or None if it holds none.

    A run writes ``metrics.json`` once, atomically, after its last task, with its ``run``
    block; a folder without one (never run, killed, failed) holds no finished run."""
    try:
        summary = json.loads((Path(output_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or "run" not in summary or "metrics" not in summary:
        return None
    return summary["metrics"]


def git_commit(folder: Path = SOURCE) -> tuple[str | None, bool | None]:
    """(``git rev-parse HEAD``, whether tracked files differ from it) of the checkout that
    holds ``folder``; ``(None, None)`` outside a git checkout or without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip() or None, dirty


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command(overrides: list[str] | None) -> str:
    """The command that repeats this run: ``python train.py <its overrides>`` when Hydra
    composed it (one job of a sweep included), else this process's own command line."""
    if overrides is not None:
        return shlex.join(["python", "train.py", *overrides])
    return shlex.join(["python", *sys.argv])


def run_info(
    cfg: DictConfig,
    *,
    lr: dict[str, float] | None,
    seconds: float,
    overrides: list[str] | None = None,
    choices: dict[str, Any] | None = None,
    commit: tuple[str | None, bool | None] | None = None,
) -> dict[str, Any]:
    """``metrics.json``'s ``run`` block: what a results table needs besides the accuracies.

    ``lr``: the learning rates the method trained with (``method.lr`` times ``lr_scale``),
    ``seconds``: the run's wall-clock time, evaluations included; ``overrides``: Hydra's
    task overrides of this job, ``choices``: its config group choices (``method``:
    ``piggyback_bn`` where the method's own name is ``piggyback``); None outside Hydra.
    ``commit``: :func:`git_commit` taken when the run started, the code it imported (a
    checkout that moves on during a long run would be misattributed); None: now."""
    commit, dirty = commit if commit is not None else git_commit()
    method = cfg.get("method") or {}
    return {
        "method": (choices or {}).get("method") or method.get("name"),
        "choices": {k: v for k, v in (choices or {}).items() if not str(k).startswith("hydra")},
        "seed": cfg.get("seed"),
        "lr_scale": float(method.get("lr_scale", 1.0)),
        "lr": dict(lr) if lr is not None else None,
        "precision": str(cfg.trainer.get("precision")) if "trainer" in cfg else None,
        "channels_last": bool((cfg.get("model") or {}).get("channels_last", False)),
        "seconds": seconds,
        "commit": commit,
        "dirty": dirty,
        "command": _command(overrides),
        "argv": list(sys.argv),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
