"""Finding task artifacts on disk and choosing which runs to compare.

``artifacts=`` may name files, artifact folders or whole (multi)run folders; this module turns
that into :class:`Entry` objects, one per artifact, each labelled with the column it gets in
the comparison (the method, plus ``/backbone`` and ``@run`` only where needed to keep labels
unique). ``latest_only`` and ``best_by_val`` pick one run per method/backbone/task, and
every artifact left out is named in a note, never dropped silently.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import ListConfig, OmegaConf

from piggyback.formats import ArtifactError, TaskArtifact, load_artifact

__all__ = [
    "Entry",
    "as_list",
    "assign_labels",
    "find_artifact_files",
    "load_entries",
    "newest_run_artifacts",
    "run_name",
    "select_best_by_val",
]


def as_list(paths: Any) -> list[Any]:
    """``artifacts=``: one path, a list of paths, or a Hydra ListConfig of them."""
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
    for raw in as_list(paths):
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
        where = ", ".join(str(p) for p in as_list(paths)) or "(nothing given)"
        raise FileNotFoundError(
            f"no task artifacts (artifacts/*.safetensors) under {where}; run `python train.py` "
            "first, or point artifacts= at a run folder or artifact files"
        )
    return list(found)


def newest_run_artifacts(
    root: str | os.PathLike = "outputs/demo", *, method: str | None = None
) -> Path:
    """The ``artifacts`` folder of the newest run under ``root`` whose tasks learned masks
    (Piggyback, KSM, ...), or, with ``method``, the newest run of that method.

    What the notebook opens by default: the last demo run that learned masks.
    """
    root = Path(root)
    folders = sorted(
        (p for p in root.glob("*/artifacts") if any(p.glob("*.safetensors"))),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for folder in folders:
        for file in folder.glob("*.safetensors"):
            try:
                artifact = load_artifact(file)
            except ArtifactError:
                continue
            if artifact.method == method if method else bool(artifact.masks):
                return folder
    what = f"{method} " if method else "masked "
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


def run_name(path: Path, roots: Sequence[Path]) -> str:
    """The run folder of an artifact, relative to the folder it was found under."""
    run_dir = path.parent.parent if path.parent.name == "artifacts" else path.parent
    for root in roots:
        try:
            rel = run_dir.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        return str(rel) if str(rel) != "." else run_dir.name
    return run_dir.name


def assign_labels(entries: list[Entry]) -> None:
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
    roots = [Path(p).expanduser() for p in as_list(paths)]
    entries = [Entry(p, load_artifact(p), run_name(p, roots)) for p in find_artifact_files(paths)]
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
    assign_labels(entries)
    return entries, notes
