"""Evaluation reports: markdown, CSV, JSON-ready tables, W&B tables, the paper's comparison.

Kept apart from evaluation itself so a report can be rebuilt from a saved ``results.json``
and a new method only needs its name in :data:`METHOD_ORDER` to get its own column.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from piggyback.utils.atomic import atomic_write_text
from piggyback.utils.instantiate import build

# the paper's column order; packnet gets its column as soon as its artifacts exist
METHOD_ORDER = (
    "classifier_only",
    "finetune",
    "finetune_sequential",
    "packnet",
    "piggyback",
    "cpg",
)
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


def method_key(label: str) -> tuple[int, str]:
    base = label.split("/")[0].split("@")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)


def log_to_loggers(cfg: DictConfig, result: dict[str, Any]) -> None:
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
                import wandb  # deferred: optional logger, ~1 s to import

                logger.finalize("success")
                wandb.finish()
            else:
                logger.finalize("success")


def comparison(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any] | None:
    """The paper's layout: one row per task, one column per method (top-1 %)."""
    labels = sorted(summary, key=method_key)
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
    for label in sorted(summary, key=method_key):
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


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    atomic_write_text(path, buffer.getvalue(), overwrite=True)


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_") or "model"


__all__ = [
    "METHOD_ORDER",
    "SOURCE_NONE",
    "SOURCE_STORED",
    "SOURCE_TEST",
    "TABLE_COLUMNS",
    "comparison",
    "format_comparison",
    "format_report",
    "log_to_loggers",
    "method_key",
    "safe_name",
    "write_csv",
]
