"""The evaluation report's rows (one per task and method) and summaries (one per method).

A row starts as what the artifact file says (sparsity, bytes) and gets its accuracy from the
tester or, flagged as such, from the accuracy stored at training time; the decathlon points
are added only for devkit domains. :func:`write_report` writes the tables next to each other
as Markdown, JSON and CSV.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from piggyback.evaluation.rebuild import task_data_config
from piggyback.evaluation.report import (
    SOURCE_NONE,
    SOURCE_STORED,
    TABLE_COLUMNS,
    format_comparison,
    write_csv,
)
from piggyback.evaluation.runs import Entry
from piggyback.formats import TaskArtifact
from piggyback.masks.stats import total_sparsity
from piggyback.scores.decathlon import decathlon_domain_scores, decathlon_score, is_decathlon_task
from piggyback.utils.atomic import atomic_write_text

__all__ = [
    "add_decathlon_points",
    "group_summary",
    "is_decathlon_entry",
    "new_row",
    "use_stored_accuracy",
    "write_report",
]


def is_decathlon_entry(artifact: TaskArtifact) -> bool:
    """Decathlon domain by name; a stored data config from another source (torchvision's
    full-resolution Aircraft, say) does not count, since S is defined on the devkit data."""
    if not is_decathlon_task(artifact.task):
        return False
    data = task_data_config(artifact) or {}
    target = str(data.get("_target_", ""))
    return not target or "Decathlon" in target


def new_row(e: Entry) -> dict[str, Any]:
    """A table row for one artifact: what the file says, accuracy still to be filled in."""
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
        "masked_off_pct": 100.0 * total_sparsity(a.weight_masks()) if masked else None,
        "task_bytes": a.task_bytes(),
        "bits_per_masked_weight": a.bits_per_masked_weight() if masked else None,
        "source": SOURCE_NONE,
        "decathlon_points": None,
        "note": "",
        "artifact": str(e.path),
        "run": e.run,
        "selection": e.selection,
    }


def use_stored_accuracy(row: dict[str, Any], artifact: TaskArtifact, why: str) -> None:
    """Fill ``row`` with the test accuracy measured at training time, and say why."""
    acc = artifact.metrics.get("test/acc")
    top5 = artifact.metrics.get("test/acc_top5")
    if acc is None:
        row["note"] = f"{why}; no test accuracy stored in the artifact either"
        return
    row["top1_pct"] = 100.0 * acc
    row["top5_pct"] = None if top5 is None else 100.0 * top5
    row["source"] = SOURCE_STORED
    row["note"] = f"{why}; accuracy is the training-time test result stored in the artifact"


def group_summary(
    label: str, rows: list[dict[str, Any]], storage: dict[str, Any]
) -> dict[str, Any]:
    """One method's line: mean accuracy over scored tasks, decathlon score, storage."""
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


def add_decathlon_points(row: dict[str, Any], artifact: TaskArtifact) -> None:
    """The domain's share of the decathlon score S, for devkit domains with an accuracy."""
    if is_decathlon_entry(artifact) and row["top1_pct"] is not None:
        points = decathlon_domain_scores({artifact.task: row["top1_pct"]})
        row["decathlon_points"] = next(iter(points.values()))


def write_report(result: dict[str, Any], report: str, output_dir: Path) -> None:
    """``results.md/json/csv`` and, when methods are compared, ``comparison.md/csv``."""
    # atomic: a full disk is one line and the previous report stays whole
    atomic_write_text(output_dir / "results.md", report + "\n", overwrite=True)
    results_json = json.dumps(result, indent=2, default=str)
    atomic_write_text(output_dir / "results.json", results_json, overwrite=True)
    write_csv(output_dir / "results.csv", TABLE_COLUMNS, result["rows"])
    if result["comparison"]:
        comp = result["comparison"]
        atomic_write_text(
            output_dir / "comparison.md", format_comparison(comp) + "\n", overwrite=True
        )
        write_csv(output_dir / "comparison.csv", comp["columns"], comp["rows"])
