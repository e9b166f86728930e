"""The family table's data: run records gathered from run folders into ``results/family.json``.

A run folder is what ``train.py`` writes (``metrics.json`` with its ``run`` block, and Hydra's
``.hydra/config.yaml``). :func:`gather` reads every finished run under the given folders,
keeps one record per run (:func:`run_record`), chooses each method's learning-rate scale on
mean *validation* accuracy (:func:`choose_scale`, never test) and keeps that scale's runs,
one per seed. :func:`method_stats` turns a method's runs into the numbers of a table row:
mean and standard deviation over seeds.
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from piggyback.scores.decathlon import scores_against_reference
from piggyback.utils.atomic import atomic_write_text

FORMAT = 1
"""``results/family.json``'s format version."""
NEAR_IMAGENET = ("cifar10_small",)
REFERENCE = "finetune"
NOT_VARIANT = ("lr_scale", "reference")
"""``method.*`` overrides that are not a grid point: the lr scale (its own axis) and CPG's
reference run."""


class FamilyError(Exception):
    """Run folders that cannot make the table; the CLI prints it as ``error: ...``, exit 2."""


def run_record(path: Path) -> dict[str, Any] | None:
    """One finished run's record (``path``: its ``metrics.json``), or None if unfinished."""
    summary = json.loads(path.read_text())
    run, cl = summary.get("run"), summary.get("cl")
    if not run or not cl or "accuracy_matrix" not in cl:
        return None  # not a finished sequence run of this version
    tasks = list(cl["tasks"])
    records = summary["tasks"]
    final = dict(zip(tasks, cl["accuracy_matrix"][-1], strict=True))
    return {
        "method": run.get("method") or summary["method"],
        "seed": run.get("seed"),
        "lr_scale": run.get("lr_scale"),
        "variant": variant_of(run.get("command") or ""),
        "lr": run.get("lr"),
        "tasks": tasks,
        "val": {t: records[t].get("val/acc") for t in tasks},
        "test_after_task": {t: cl["accuracy_matrix"][i][i] for i, t in enumerate(tasks)},
        "test_final": final,
        "accuracy_matrix": cl["accuracy_matrix"],
        "bwt": cl.get("bwt"),
        "forgetting": cl.get("forgetting"),
        "masked_off": {t: records[t].get("masked_off") for t in tasks},
        "task_bytes": {t: (cl.get("task_bytes") or {}).get(t) for t in tasks},
        "train_seconds": {t: (cl.get("train_seconds") or {}).get(t) for t in tasks},
        "collapsed": {t: records[t].get("collapsed") for t in tasks},
        "budget": budget(path.parent / ".hydra" / "config.yaml"),
        "path": str(path.parent),
        **{k: run.get(k) for k in ("seconds", "commit", "dirty", "command", "torch")},
        **{k: run.get(k) for k in ("machine", "processor", "cpu_count", "threads", "date")},
    }


def variant_of(command: str) -> str:
    """The grid point beyond the lr scale that a run's command sets: its ``method.<key>=``
    overrides other than ``lr_scale`` and ``reference``, as ``"key=value,..."`` ("" for none:
    the method's YAML defaults)."""
    options = []
    for token in shlex.split(command):
        key, eq, value = token.partition("=")
        if eq and key.startswith("method.") and key.removeprefix("method.") not in NOT_VARIANT:
            options.append(f"{key.removeprefix('method.')}={value}")
    return ",".join(sorted(options))


def setting_label(scale: float, variant: str) -> str:
    """A grid point as the tables print it: ``"10"`` or ``"10, prune=0.5"``."""
    return f"{scale:g}" + (f", {variant}" if variant else "")


def budget(config: Path) -> dict[str, Any] | None:
    """Backbone, image size, epochs, batches per epoch and batch size, from the composed config."""
    if not config.is_file():
        return None
    cfg = yaml.safe_load(config.read_text()) or {}
    trainer, data = cfg.get("trainer") or {}, cfg.get("data") or {}
    return {
        "backbone": (cfg.get("backbone") or {}).get("name"),
        "image_size": data.get("image_size"),
        "batch_size": data.get("batch_size"),
        "max_epochs": trainer.get("max_epochs"),
        "limit_train_batches": trainer.get("limit_train_batches"),
        "precision": trainer.get("precision"),
        "channels_last": (cfg.get("model") or {}).get("channels_last"),
    }


def load_records(roots: Iterable[Path]) -> list[dict[str, Any]]:
    """Every finished run under ``roots`` (any depth), one record each."""
    records = []
    for root in roots:
        if not Path(root).is_dir():
            raise FamilyError(f"{root} is not a folder of runs")
        for path in sorted(Path(root).rglob("metrics.json")):
            record = run_record(path)
            if record is not None:
                records.append(record)
    if not records:
        raise FamilyError(
            f"no finished run (metrics.json with a 'run' block) under {', '.join(map(str, roots))}"
        )
    return records


def mean_val(record: dict[str, Any]) -> float:
    """Mean validation accuracy over the sequence's tasks (-inf if a task has none)."""
    values = list(record["val"].values())
    if not values or any(v is None for v in values):
        return float("-inf")
    return sum(values) / len(values)


def choose_scale(runs: Sequence[dict[str, Any]]) -> tuple[tuple[float, str], dict[str, float]]:
    """The grid point (lr scale, variant) with the best mean validation accuracy, and each
    point's value keyed by :func:`setting_label`.

    Points are compared on the seeds that every point has (the grid runs at the first seed);
    without a common seed, on all runs. A tie keeps the smaller scale, then the defaults."""
    by_point: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for run in runs:
        by_point.setdefault((float(run["lr_scale"]), run.get("variant") or ""), []).append(run)
    common = set.intersection(*({r["seed"] for r in rs} for rs in by_point.values()))
    vals = {}
    for point, rs in by_point.items():
        chosen = [r for r in rs if r["seed"] in common] or rs
        vals[point] = statistics.fmean(mean_val(r) for r in chosen)
    best = min(vals, key=lambda p: (-vals[p], p[0], p[1] != "", p[1]))
    return best, {setting_label(*p): vals[p] for p in sorted(vals)}


def gather(roots: Iterable[Path], *, near: Sequence[str] = NEAR_IMAGENET) -> dict[str, Any]:
    """``results/family.json``: per method the chosen grid point (lr scale and variant), the
    grid's validation accuracies and the chosen point's runs (one per seed, the latest if
    repeated)."""
    records = load_records(roots)
    methods: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        runs = [r for r in records if r["method"] == method]
        (scale, variant), grid = choose_scale(runs)
        by_seed: dict[Any, dict[str, Any]] = {}
        for run in sorted(runs, key=lambda r: r.get("date") or ""):
            if float(run["lr_scale"]) == scale and (run.get("variant") or "") == variant:
                by_seed[run["seed"]] = run
        chosen = [by_seed[s] for s in sorted(by_seed, key=lambda s: (s is None, s))]
        methods[method] = {
            "lr_scale": scale,
            "variant": variant,
            "grid_val": grid,
            "runs": chosen,
        }
    tasks = [list(m["runs"][0]["tasks"]) for m in methods.values()]
    if any(t != tasks[0] for t in tasks):
        raise FamilyError(f"the methods' runs learned different task sequences: {tasks}")
    return {
        "format": FORMAT,
        "tasks": tasks[0],
        "near": [t for t in near if t in tasks[0]],
        "reference": REFERENCE,
        "lr_choice": "each method's method.lr_scale (and, where its grid has one, the variant "
        "of another hyperparameter) with the best mean validation accuracy over the "
        "sequence's tasks (at the seed every grid point ran), never test",
        "methods": methods,
    }


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values or any(v is None for v in values):
        return None, None
    mean = statistics.fmean(values)  # type: ignore[arg-type]
    return mean, (statistics.stdev(values) if len(values) > 1 else None)  # type: ignore[arg-type]


def reference_accuracy(results: dict[str, Any]) -> dict[str, float] | None:
    """The reference method's final test accuracy per task, mean over its seeds."""
    ref = results["methods"].get(results["reference"])
    if not ref:
        return None
    tasks = results["tasks"]
    return {t: statistics.fmean(r["test_final"][t] for r in ref["runs"]) for t in tasks}


def method_stats(results: dict[str, Any], method: str) -> dict[str, Any]:
    """A table row's numbers for ``method``: (mean, std) over seeds of accuracy per task, the
    mean over the domains (tasks not in ``near``), S against the reference's seed-mean
    accuracies, BWT; means of bytes per task, weights masked off, training seconds; the
    collapsed tasks per seed. Accuracies and BWT as fractions."""
    entry = results["methods"][method]
    runs, tasks = entry["runs"], results["tasks"]
    domains = [t for t in tasks if t not in results["near"]]
    ref = reference_accuracy(results)
    per_task = {t: _mean_std([r["test_final"][t] for r in runs]) for t in tasks}
    means = [statistics.fmean(r["test_final"][t] for t in domains) for r in runs]
    scores = None
    if ref is not None:
        scores = [
            sum(scores_against_reference({t: r["test_final"][t] for t in domains}, ref).values())
            for r in runs
        ]
    off = [v for r in runs for v in r["masked_off"].values() if v is not None]
    sizes = [r["task_bytes"][t] for r in runs for t in domains]
    seconds = [r["train_seconds"][t] for r in runs for t in domains]
    collapsed = [(r["seed"], t) for r in runs for t in tasks if r["collapsed"].get(t)]
    checked = sum(v is not None for r in runs for v in r["collapsed"].values())
    return {
        "method": method,
        "lr_scale": entry["lr_scale"],
        "variant": entry.get("variant") or "",
        "seeds": [r["seed"] for r in runs],
        "per_task": per_task,
        "mean": _mean_std(means),
        "score": _mean_std(scores) if scores is not None else (None, None),
        "bwt": _mean_std([r["bwt"] for r in runs]),
        "task_bytes": None if None in sizes else statistics.fmean(sizes),
        "masked_off": statistics.fmean(off) if off else None,
        "train_seconds": None if None in seconds else statistics.fmean(seconds),
        "run_seconds": _mean_std([r["seconds"] for r in runs])[0],
        "collapsed": collapsed,
        "collapse_checked": checked,
    }


def write_results(results: dict[str, Any], out: Path) -> Path:
    """``results`` as indented JSON at ``out`` (written atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, json.dumps(results, indent=1) + "\n", overwrite=True)
