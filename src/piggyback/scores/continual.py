"""Continual-learning measures over an accuracy matrix (PAPER.md, "Continual-learning measures").

``R[i][j]`` is the accuracy on task ``j`` after training task ``i`` (``None`` for ``j > i``).
With ``T`` tasks: average accuracy = mean_j R[T-1][j]; backward transfer
BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]); forgetting of task j = max_{i<T-1} R[i][j] -
R[T-1][j], averaged over j < T-1. With one task there is no earlier task: BWT and
forgetting are ``None`` (undefined), not 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Matrix = Sequence[Sequence[float | None]]


def _check(matrix: Matrix) -> int:
    tasks = len(matrix)
    for i, row in enumerate(matrix):
        if len(row) != tasks:
            raise ValueError(f"accuracy matrix row {i} has {len(row)} entries, expected {tasks}")
        if any(row[j] is None for j in range(i + 1)):
            raise ValueError(f"accuracy matrix row {i} lacks a task learned by then")
    return tasks


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy over all tasks after the last one was learned."""
    tasks = _check(matrix)
    return sum(matrix[-1][j] for j in range(tasks)) / tasks  # type: ignore[misc]


def backward_transfer(matrix: Matrix) -> float | None:
    """How much learning later tasks changed earlier ones (negative = forgetting)."""
    tasks = _check(matrix)
    if tasks < 2:
        return None
    deltas = [matrix[-1][j] - matrix[j][j] for j in range(tasks - 1)]  # type: ignore[operator]
    return sum(deltas) / len(deltas)


def forgetting(matrix: Matrix) -> float | None:
    """Mean drop from each earlier task's best accuracy to its final accuracy."""
    tasks = _check(matrix)
    if tasks < 2:
        return None
    drops = [
        max(matrix[i][j] for i in range(j, tasks - 1)) - matrix[-1][j]  # type: ignore[operator]
        for j in range(tasks - 1)
    ]
    return sum(drops) / len(drops)


def cl_summary(
    tasks: Sequence[str],
    matrix: Matrix,
    *,
    task_bytes: Sequence[int | None] | None = None,
    train_seconds: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """The ``cl`` block of ``metrics.json``."""
    if len(tasks) != _check(matrix):
        raise ValueError(f"{len(tasks)} task names for a {len(matrix)}-task accuracy matrix")
    return {
        "tasks": list(tasks),
        "accuracy_matrix": [list(row) for row in matrix],
        "average_accuracy": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
        "task_bytes": dict(zip(tasks, task_bytes or [None] * len(tasks), strict=True)),
        "train_seconds": dict(zip(tasks, train_seconds or [None] * len(tasks), strict=True)),
    }


def format_cl_table(summary: dict[str, Any]) -> str:
    """The accuracy matrix as text: one row per "after training task i", accuracies in %."""
    tasks = summary["tasks"]
    width = max(12, *(len(t) for t in tasks)) + 1
    lines = [
        "accuracy (%) on each task (columns) after training each task (rows)",
        " " * width + "".join(f"{t[: width - 1]:>{width}}" for t in tasks),
    ]
    for task, row in zip(tasks, summary["accuracy_matrix"], strict=True):
        cells = "".join(
            f"{100 * v:>{width}.2f}" if v is not None else f"{'':>{width}}" for v in row
        )
        lines.append(f"{task[: width - 1]:<{width}}{cells}")

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:+.2f}"

    lines.append(
        f"average accuracy {100 * summary['average_accuracy']:.2f}%   "
        f"BWT {pct(summary['bwt'])}   forgetting {pct(summary['forgetting'])}"
    )
    return "\n".join(lines)
