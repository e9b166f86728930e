"""The family table's pages, rendered from ``results/family.json`` and nothing else.

:func:`headline_table` is the README's table (between ``<!-- family-headline:begin -->`` and
``<!-- family-headline:end -->``), :func:`docs_block` the generated part of docs/results.md
(between ``<!-- family:begin -->`` and ``<!-- family:end -->``): the headline table, the
accuracy per task, how the numbers were made, and the two plots (:func:`plot_accuracy_bytes`,
:func:`plot_matrix`). Numbers are mean ± sample standard deviation over seeds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from family_claims import claims_for, claims_table
from family_data import method_stats, setting_label

from piggyback.utils.atomic import atomic_write_stream

README_MARKER = "family-headline"


def plot_names(experiment: str = "family") -> tuple[str, str]:
    """The two plots' file names in docs/ for an experiment's table (bytes, matrix)."""
    return f"{experiment}_accuracy_vs_bytes.png", f"{experiment}_accuracy_matrix.png"


MATRIX_METHODS = ("finetune_sequential", "piggyback")
"""The heat map shows the first of these that ran (forgetting, or its absence), at its
lowest seed."""


class MarkerError(Exception):
    """A page without the begin / end markers of its generated block."""


def pm(mean: float | None, std: float | None, scale: float = 100.0, fmt: str = ".1f") -> str:
    """``58.5 ± 1.2`` (``scale`` x the fractions), ``58.5`` for one seed, ``-`` for none."""
    if mean is None:
        return "-"
    text = format(scale * mean, fmt)
    return text if std is None else f"{text} ± {format(scale * std, fmt.lstrip('+'))}"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def ordered_stats(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method's row numbers, best mean accuracy over the domains first."""
    rows = [method_stats(results, m) for m in results["methods"]]
    return sorted(rows, key=lambda r: (r["mean"][0] is None, -(r["mean"][0] or 0.0)))


def _collapsed(row: dict[str, Any]) -> str:
    if not row["collapse_checked"]:
        return "-"
    if not row["collapsed"]:
        return "0"
    return f"{len(row['collapsed'])}: " + ", ".join(f"{t} s{s}" for s, t in row["collapsed"])


def _grid_edge(grid: dict[str, float], row: dict[str, Any]) -> str:
    """`` ↑`` (`` ↓``) when the chosen lr scale is the largest (smallest) of several tried:
    the best may lie beyond the grid."""
    scales = {float(label.split(", ", 1)[0]) for label in grid}
    if len(scales) < 2:
        return ""
    if row["lr_scale"] == max(scales):
        return " ↑"
    return " ↓" if row["lr_scale"] == min(scales) else ""


def _kind(results: dict[str, Any]) -> str:
    """What the tasks are called: image domains beside a near-ImageNet control, else tasks."""
    return "domains" if results["near"] else "tasks"


def headline_table(results: dict[str, Any]) -> str:
    """The headline table: accuracy over the domains, the near-ImageNet task(s), S, bytes,
    BWT, weights masked off, collapsed tasks (markdown, no caption)."""
    tasks, near = results["tasks"], results["near"]
    n = len([t for t in tasks if t not in near])
    head = ["method", "lr ×", "seeds", f"mean ({n} {_kind(results)})", *near, "S", "bytes / task"]
    head += ["BWT", "masked off", "collapsed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ordered_stats(results):
        point = setting_label(row["lr_scale"], row.get("variant") or "")
        point += _grid_edge(results["methods"][row["method"]].get("grid_val") or {}, row)
        cells = [row["method"], point, str(len(row["seeds"]))]
        cells += [pm(*row["mean"]), *(pm(*row["per_task"][t]) for t in near)]
        cells += [pm(*row["score"], scale=1.0, fmt=".0f"), format_bytes(row["task_bytes"])]
        cells += [pm(*row["bwt"], fmt="+.1f")]
        off = row["masked_off"]
        cells += ["-" if off is None else f"{100 * off:.2f} %", _collapsed(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(results: dict[str, Any]) -> str:
    """Final test accuracy per task (``†``: the collapse warning fired on that task in at
    least one seed), training seconds per task and minutes per run."""
    tasks = results["tasks"]
    head = ["method", *tasks, "train s / task", "min / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ordered_stats(results):
        flagged = {t for _, t in row["collapsed"]}
        cells = [row["method"]]
        cells += [pm(*row["per_task"][t]) + (" †" if t in flagged else "") for t in tasks]
        seconds, run = row["train_seconds"], row["run_seconds"]
        cells += ["-" if seconds is None else f"{seconds:.0f}"]
        cells += ["-" if run is None else f"{run / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _distinct(runs: Sequence[dict[str, Any]], key: str) -> list[Any]:
    return sorted({str(r.get(key)) for r in runs if r.get(key) is not None})


def _budget_text(b: dict[str, Any]) -> str:
    """One budget in words; the image size and memory format only where there are images."""
    images = b.get("image_size") is not None
    size = f", {b['image_size']} px" if images else ""
    layout = f", channels_last {b['channels_last']}" if images else ""
    return (
        f"{b.get('backbone')}{size}, {b.get('max_epochs')} epochs per task of at most "
        f"{b.get('limit_train_batches')} batches of {b.get('batch_size')}, precision "
        f"{b.get('precision')}{layout}"
    )


def provenance(results: dict[str, Any]) -> str:
    """Budget, seeds, lr grid and choice, dates, machines, torch, commits of the runs."""
    runs = [r for m in results["methods"].values() for r in m["runs"]]
    budgets = {tuple(sorted((r.get("budget") or {}).items())) for r in runs}
    budget = "; ".join(_budget_text(b) for b in map(dict, sorted(budgets)) if b)
    dates = sorted({str(r.get("date"))[:10] for r in runs if r.get("date")})
    when = " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else "undated"
    machines = sorted(
        {
            f"{r.get('processor')}, {r.get('cpu_count')} cores, {r.get('threads')} thread(s)"
            for r in runs
            if r.get("processor")
        }
    )
    commits = [c[:10] for c in _distinct(runs, "commit")]
    dirty = any(r.get("dirty") for r in runs)
    grids = {m: e["grid_val"] for m, e in results["methods"].items()}
    per_method = {
        m: tuple(sorted({label.split(", ", 1)[0] for label in g}, key=float))
        for m, g in grids.items()
    }
    counts = list(per_method.values())
    common = max(sorted(set(counts)), key=counts.count, default=())  # ties: the first sorted
    scales = list(common)
    others = [f"{m}: {', '.join(v)}" for m, v in per_method.items() if v != common]
    if others:
        scales[-1] += f" ({'; '.join(others)})"
    variants = [
        f"{m} {', '.join(sorted({p.split(', ', 1)[1] for p in g if ', ' in p}))}"
        for m, g in grids.items()
        if any(", " in p for p in g)
    ]
    beyond = f"; beyond the lr (at the chosen scale): {'; '.join(variants)}" if variants else ""
    return (
        f"Budget: {budget or 'not recorded'}. Learning rate: {results['lr_choice']}; grid "
        f"`method.lr_scale` {', '.join(scales)}{beyond}. Runs: {len(runs)}, {when}, on "
        f"{'; '.join(machines) or 'an unrecorded machine'}, torch "
        f"{', '.join(_distinct(runs, 'torch')) or '?'}, commit(s) "
        f"{', '.join(commits) or 'unknown'}{' (with uncommitted changes)' if dirty else ''}."
    )


def caption(results: dict[str, Any]) -> str:
    """What the headline table's columns mean."""
    near = ", ".join(results["near"])
    apart = f", {near} (near ImageNet) is shown apart" if near else ""
    kind = _kind(results)
    return (
        f"Test accuracy (%) after the whole sequence, mean ± standard deviation over seeds; "
        f"the mean is over the {kind}{apart}. S: Visual "
        f"Decathlon score over the {kind} against `{results['reference']}`'s seed-mean "
        "accuracies (250 per domain for the reference's accuracy, 0 for twice its error). "
        f"Bytes / task: what a task adds to the backbone (task_bytes), mean over the {kind}. "
        "BWT: backward transfer (points). Masked off: weights a task's mask switches off, "
        "mean over tasks (- for methods without masks). Collapsed: tasks that ended with their "
        "training loss at chance (the collapse warning for their last epoch), as task and "
        "seed (- where it was not checked). lr × ↑ (↓): the chosen scale is the largest "
        "(smallest) of the method's grid, so a better one may lie beyond it."
    )


def readme_block(results: dict[str, Any]) -> str:
    """The README's generated block: the headline table and one line of provenance."""
    return (
        headline_table(results)
        + "\n\nRendered from `results/family.json` by `python benchmarks/family.py render`; "
        "budget, dates and machine: [docs/results.md](docs/results.md#the-family-table)."
    )


def docs_block(results: dict[str, Any], experiment: str = "family") -> str:
    """docs/results.md's generated block: both tables, caption, provenance, both plots."""
    method, seed = matrix_choice(results)
    bytes_plot, matrix_plot = plot_names(experiment)
    return "\n\n".join(
        [
            headline_table(results),
            caption(results) + " " + provenance(results),
            "Final test accuracy per task (%; † the collapse warning fired on that task in at "
            "least one seed), training seconds per task (mean over domains and seeds) and "
            "minutes per run (evaluations included):",
            task_table(results),
            f"![accuracy against bytes per task]({bytes_plot})",
            f"Accuracy matrix of `{method}`, seed {seed} (row: after training that task):",
            f"![accuracy matrix]({matrix_plot})",
            "The papers' orderings, checked seed by seed (a − b: difference of the mean over "
            "the domains, paired by seed; holds: every shared seed agrees, at least two; "
            "reversed: every seed says the opposite; `benchmarks/family_claims.py`):",
            claims_table(results, claims_for(experiment)),
        ]
    )


def replace_block(text: str, marker: str, body: str) -> str:
    """``text`` with everything between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``
    replaced by ``body``."""
    pattern = re.compile(
        rf"(<!-- {re.escape(marker)}:begin -->\n).*?(\n<!-- {re.escape(marker)}:end -->)", re.S
    )
    if not pattern.search(text):
        raise MarkerError(f"no <!-- {marker}:begin --> ... <!-- {marker}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text, count=1)


def block(text: str, marker: str) -> str:
    """What stands between a page's markers now."""
    found = re.search(
        rf"<!-- {re.escape(marker)}:begin -->\n(.*?)\n<!-- {re.escape(marker)}:end -->", text, re.S
    )
    if found is None:
        raise MarkerError(f"no <!-- {marker}:begin --> ... <!-- {marker}:end --> block")
    return found.group(1)


def matrix_choice(results: dict[str, Any]) -> tuple[str, Any]:
    """(method, seed) whose accuracy matrix the heat map shows."""
    methods = results["methods"]
    method = next((m for m in MATRIX_METHODS if m in methods), next(iter(methods)))
    return method, methods[method]["runs"][0]["seed"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> Path:
    """The figure as a PNG at ``out`` (atomic; no software tag, so a re-render is byte-stable)."""
    fig.tight_layout()
    atomic_write_stream(
        out,
        lambda f: fig.savefig(f, format="png", dpi=110, metadata={"Software": None}),
        overwrite=True,
    )
    plt.close(fig)
    return out


def plot_accuracy_bytes(results: dict[str, Any], out: Path) -> Path:
    """Mean accuracy over the domains against bytes per task (log), one point per method,
    the seeds' standard deviation as error bars."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in ordered_stats(results):
        mean, std = row["mean"]
        if mean is None or not row["task_bytes"]:
            continue
        ax.errorbar(row["task_bytes"], 100 * mean, yerr=100 * (std or 0), fmt="o", capsize=3)
        ax.annotate(row["method"], (row["task_bytes"], 100 * mean), xytext=(5, 4),
                    textcoords="offset points", fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("bytes per task (log)")
    n = len([t for t in results["tasks"] if t not in results["near"]])
    ax.set_ylabel(f"test accuracy, mean over the {n} domains (%)")
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, out)


def plot_matrix(results: dict[str, Any], out: Path) -> Path:
    """The accuracy matrix of one sequence as a heat map, cells annotated in %."""
    plt = _figure()
    method, seed = matrix_choice(results)
    run = next(r for r in results["methods"][method]["runs"] if r["seed"] == seed)
    tasks, matrix = run["tasks"], run["accuracy_matrix"]
    values = [[float("nan") if v is None else 100 * v for v in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 2, 0.8 * len(tasks) + 1.5))
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 60 else "black")  # fmt: skip
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
    ax.set_title(f"test accuracy (%): {method}, seed {seed}")
    fig.colorbar(image, ax=ax)
    return _save(plt, fig, out)
