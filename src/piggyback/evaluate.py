"""Evaluation entry point: every task artifact of one or more runs, on one shared backbone.

``evaluate(cfg)`` is a pure function of the config (tests call it directly); ``main`` is the
Hydra wrapper (``piggyback-eval`` / ``python evaluate.py``) that turns known user errors
into a one-line message and exit code 2.

Artifacts are grouped by *method label* (the method name, made unique per backbone and per
run when several runs hold the same task), and every group is loaded into one
:class:`~piggyback.models.multitask.MultiTaskModel`: what is evaluated is the deployed multi-task
model, not each training run's own module. Each task's test data is rebuilt from the
resolved config stored in its artifact, so evaluation uses the transforms the task was
trained with, not today's defaults. When that data cannot be rebuilt, the test accuracy
measured at training time (stored in the artifact) is reported instead and flagged.

The steps live in :mod:`piggyback.evaluation` (one module each).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from piggyback.config.cli import CONF_DIR, USER_ERRORS, exit_with_error
from piggyback.evaluation.rebuild import build_model, test_loader
from piggyback.evaluation.report import (
    SOURCE_TEST,
    comparison,
    format_report,
    log_to_loggers,
    method_key,
    safe_name,
)
from piggyback.evaluation.rows import (
    add_decathlon_points,
    group_summary,
    new_row,
    use_stored_accuracy,
    write_report,
)
from piggyback.evaluation.runs import (
    Entry,
    as_list,
    find_artifact_files,
    load_entries,
    newest_run_artifacts,
    select_best_by_val,
)
from piggyback.evaluation.task_report import (
    group_task_inference,
    report_task_inference,
    strategy_list,
)
from piggyback.evaluation.tester import TaskTester, choose_device, test_accuracy
from piggyback.models.multitask import MultiTaskModel, save_bundle
from piggyback.utils.console import OncePerRun
from piggyback.utils.resolvers import register_resolvers
from piggyback.utils.run_lock import RunLock

log = logging.getLogger(__name__)

__all__ = [
    "Entry",
    "TaskTester",
    "evaluate",
    "find_artifact_files",
    "load_entries",
    "main",
    "newest_run_artifacts",
    "run",
    "select_best_by_val",
]


def evaluate_task(
    e: Entry,
    model: MultiTaskModel,
    cfg: DictConfig,
    device: torch.device,
    loaders: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One task's row: tested on rebuilt data, else the stored accuracy (when allowed).

    ``loaders`` collects each tested task's test loader (for the task-inference report)."""
    limit = cfg.get("limit_test_batches")
    row = new_row(e)
    loader, why = test_loader(e.artifact, cfg)
    if loader is not None and loaders is not None:
        loaders[e.artifact.task] = loader
    if loader is not None:
        top1, top5, n = test_accuracy(
            model, e.artifact.task, e.artifact.num_classes, loader, device, limit
        )
        row.update(top1_pct=100 * top1, top5_pct=100 * top5, n_test=n, source=SOURCE_TEST)
        if limit is not None:
            row["note"] = f"first {limit} test batches only (limit_test_batches)"
    elif cfg.get("fallback_to_stored", True):
        use_stored_accuracy(row, e.artifact, why)
    else:
        raise FileNotFoundError(
            f"task {e.artifact.task!r} ({e.path}): {why}. Fix paths.data_dir, or allow "
            "fallback_to_stored=true to report the accuracy stored at training time"
        )
    add_decathlon_points(row, e.artifact)
    return row


def group_storage(
    model: MultiTaskModel, label: str, cfg: DictConfig, output_dir: Path
) -> dict[str, Any]:
    """The group's storage figures; with ``save_bundles=true`` also its bundle file."""
    storage = model.storage()
    if cfg.get("save_bundles", False):
        path = save_bundle(
            model, output_dir / "bundles" / f"{safe_name(label)}.safetensors", overwrite=True
        )
        storage["bundle_file"] = str(path)
        storage["bundle_file_bytes"] = path.stat().st_size
    return storage


@OncePerRun()
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
    device = choose_device(str(cfg.get("device", "auto")))
    strategy_list(cfg.get("task_inference"))  # task inference: names checked up front

    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e.label].append(e)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    pristine: dict[str, Any] = {}  # backbones built so far, shared by the groups
    for label in sorted(groups, key=method_key):
        model = build_model(groups[label], cfg, pristine).to(device)
        loaders: dict[str, Any] = {}  # every tested task's loader, for task inference
        group_rows = [evaluate_task(e, model, cfg, device, loaders) for e in groups[label]]
        storage = group_storage(model, label, cfg, output_dir)
        summary[label] = group_summary(label, group_rows, storage)
        block = group_task_inference(cfg, model, loaders, device)
        if block is not None:
            summary[label]["task_inference"] = block
        rows.extend(group_rows)
        del model

    result: dict[str, Any] = {
        "artifacts": [str(p) for p in as_list(cfg.artifacts)],
        "rows": rows,
        "summary": summary,
        "comparison": comparison(rows, summary),
        "notes": notes,
        "output_dir": str(output_dir),
    }
    report = format_report(result)
    write_report(result, report, output_dir)
    log_to_loggers(cfg, result)
    if cfg.get("print_table", True):
        print(report, flush=True)
    report_task_inference(result, output_dir, cfg.get("print_table", True))
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra job body: known user errors become one line on stderr and exit code 2."""
    try:
        with RunLock(cfg.paths.output_dir):  # one run per output folder
            return evaluate(cfg)
    except USER_ERRORS as exc:
        exit_with_error(exc)


def main() -> None:
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()
