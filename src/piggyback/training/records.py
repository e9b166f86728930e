"""What a training run reports: flat metrics, ``metrics.json``'s summary, the task table.

A single task's metrics are its own; a sequence's are the mean over tasks plus one
``<task>/<metric>`` key per task, which is what a sweeper optimises (``optimized_metric``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from piggyback.scores.continual import format_cl_table

__all__ = ["format_table", "print_tables", "run_summary", "summarize"]


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
    """One line per task: test accuracy, share of weights masked off, artifact size."""
    lines = [
        f"{'task':<18} {'method':<20} {'test acc':>9} {'masked off':>11} {'artifact':>10}",
        "-" * 72,
    ]
    for r in records:
        acc = f"{100 * r['test/acc']:.2f}%" if "test/acc" in r else "-"
        off = f"{100 * r['masked_off']:.2f}%" if "masked_off" in r else "-"
        size = f"{r['artifact_bytes'] / 1024:.1f} KB" if "artifact_bytes" in r else "-"
        lines.append(f"{r['task']:<18} {r['method']:<20} {acc:>9} {off:>11} {size:>10}")
    return "\n".join(lines)


def print_tables(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The task table, and for a sequence the continual-learning table."""
    print(format_table(records), flush=True)
    if "cl" in summary and len(records) > 1:
        print(format_cl_table(summary["cl"]), flush=True)
