"""A method's first task against fine-tuning's as the budget grows (issue 32's diagnosis).

    python benchmarks/first_task_budget.py run --out runs/first_task paths.data_dir=../shared/data
    python benchmarks/first_task_budget.py gather runs/first_task

PackNet's first task fine-tunes every pretrained weight, prunes ``prune`` of each layer in one
shot and retrains; its schedule is the reference's 20 + 10 epochs scaled to the epochs given
(``conf/method/packnet.yaml``), so it trains at the full rate for a third of its steps and
retrains for the last third, where fine-tuning runs at the full rate for half. Whether its gap
to fine-tuning is the method or the budget shows when the budget grows: this runs the
experiment's first task alone (the other tasks dropped with ``~data.tasks.<name>``), each
setting at each epoch count (the experiment's batches per epoch, one lr scale and seed), with
the csv logger for the per-epoch validation, one ``train.py`` process per run into
``<out>/<setting>/e<epochs>/seed<seed>`` (a finished run is skipped: rerunning resumes).

``gather`` reads the runs into ``results/first_task_budget.json`` (test accuracy, the
validation curve, the epoch of the prune: the first epoch whose mask flips) and prints a
table: per budget each setting's test accuracy, its gap to fine-tuning and the validation just
before the prune, right after it and at the end, and fine-tuning at two thirds of the budget
(the steps PackNet trains before it prunes), where that run exists.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import family
import family_data
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from piggyback.utils.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "first_task_budget.json"
SETTINGS = ("finetune", "packnet:method.prune=0.5")
"""``method[:override,override]``: fine-tuning and PackNet at the family's chosen prune."""
REFERENCE = "finetune"


class BudgetError(ValueError):
    """Bad input to this tool; one line, exit code 2."""


def parse_setting(spec: str) -> tuple[str, str, list[str]]:
    """``packnet:method.prune=0.5`` -> (label ``packnet_prune0.5``, method, overrides)."""
    method, _, rest = spec.partition(":")
    overrides = [o for o in rest.split(",") if o] if rest else []
    if not method or any("=" not in o for o in overrides):
        raise BudgetError(f"setting {spec!r}: expected method[:key=value,key=value]")
    suffix = "".join(
        "_" + o.removeprefix("method.").replace("=", "").replace("/", "-") for o in overrides
    )
    return method + suffix, method, overrides


def experiment_tasks(experiment: str, overrides: Sequence[str] = ()) -> tuple[list[str], int]:
    """The experiment's task keys in order and its batches per epoch (``limit_train_batches``)."""
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base=None):
            cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
    except HydraException as exc:
        raise BudgetError(f"experiment {experiment!r}: {exc}".splitlines()[0]) from None
    tasks = list(cfg.data.tasks) if "tasks" in cfg.data else []
    if not tasks:
        raise BudgetError(f"experiment {experiment!r} has no data.tasks to take the first of")
    return tasks, int(cfg.trainer.get("limit_train_batches") or 0)


def run_overrides(
    experiment: str,
    tasks: Sequence[str],
    method: str,
    setting: Sequence[str],
    epochs: int,
    scale: str,
    seed: str,
    folder: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """One run: the first task alone, ``epochs`` epochs, the csv logger, into ``folder``."""
    return [
        f"experiment={experiment}",
        *(f"~data.tasks.{task}" for task in tasks[1:]),
        f"method={method}",
        f"method.lr_scale={scale}",
        *setting,
        f"trainer.max_epochs={epochs}",
        f"seed={seed}",
        "logger=csv",
        f"hydra.run.dir={folder}",
        "overwrite_artifacts=true",
        *extra,
    ]


def run_all(
    out: Path,
    *,
    experiment: str,
    settings: Sequence[str],
    epochs: Sequence[int],
    scale: str,
    seed: str,
    extra: Sequence[str] = (),
    launch: family.Launch = family.subprocess_launch,
) -> list[str]:
    """Every unfinished run, budgets in increasing order; returns the runs that failed."""
    tasks, _ = experiment_tasks(experiment, extra)
    parsed = [parse_setting(s) for s in settings]
    failed = []
    for count in sorted(epochs):
        for label, method, overrides in parsed:
            folder = out / label / f"e{count}" / f"seed{seed}"
            if family.finished(folder):
                print(f"skip {folder}: finished", file=sys.stderr, flush=True)
                continue
            command = run_overrides(
                experiment, tasks, method, overrides, count, scale, seed, folder.resolve(), extra
            )
            if launch(command, folder) != 0:
                failed.append(str(folder))
    return failed


def read_run(folder: Path) -> dict[str, Any] | None:
    """One finished single-task run (``family_data.run_record``, the family's reader of
    metrics.json) with its validation curve and prune epoch from the csv logger."""
    try:
        record = family_data.run_record(folder / "metrics.json")
    except (OSError, ValueError):
        return None
    if record is None or len(record["tasks"]) != 1:
        return None
    (task,) = record["tasks"]
    curve, flips = [], []
    for path in sorted((folder / "csv").glob("*/metrics.csv")):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/acc"):
                    curve.append(float(row["val/acc"]))
                if row.get("masks/flipped"):
                    flips.append(float(row["masks/flipped"]))
    return {
        "setting": folder.parents[1].name,
        "method": record["method"],
        "task": task,
        "epochs": int(folder.parent.name.removeprefix("e")),
        "seed": record["seed"],
        "lr_scale": record["lr_scale"],
        "test": record["test_final"][task],
        "val_curve": curve,
        "prune_epoch": next((i for i, f in enumerate(flips) if f > 0), None),
        "task_bytes": record["task_bytes"][task],
        "train_seconds": record["train_seconds"][task],
        "date": record["date"],
        "commit": record["commit"],
        "machine": f"{record['processor']}, {record['cpu_count']} cores, "
        f"{record['threads']} thread(s)",
        "path": str(folder),
    }


def gather(root: Path) -> list[dict[str, Any]]:
    """Every finished run under ``root/<setting>/e<epochs>/seed<seed>``, by setting and budget."""
    runs = [read_run(f) for f in sorted(root.glob("*/e*/seed*")) if f.is_dir()]
    found = [r for r in runs if r is not None]
    if not found:
        raise BudgetError(f"no finished run under {root}/<setting>/e<epochs>/seed<seed>")
    return sorted(found, key=lambda r: (r["epochs"], r["setting"], r["seed"]))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(runs: Sequence[dict[str, Any]], batches: int) -> str:
    """Markdown: a row per budget and seed; per setting its test accuracy, its gap to
    fine-tuning and, where it pruned, its validation just before the prune, right after it and
    at the end; last, fine-tuning at 2/3 of the budget (the steps PackNet trains unpruned)."""
    settings = sorted({r["setting"] for r in runs} - {REFERENCE})
    by = {(r["setting"], r["epochs"], r["seed"]): r for r in runs}
    head = ["epochs", "steps", REFERENCE, *settings, f"{REFERENCE} at 2/3 budget"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for epochs, seed in sorted({(r["epochs"], r["seed"]) for r in runs}):
        ref = by.get((REFERENCE, epochs, seed))
        cells = [str(epochs), str(epochs * batches) if batches else "-", _pct(ref and ref["test"])]
        for setting in settings:
            run = by.get((setting, epochs, seed))
            if run is None:
                cells.append("-")
                continue
            notes = [f"{100 * (run['test'] - ref['test']):+.1f}"] if ref else []
            at, curve = run["prune_epoch"], run["val_curve"]
            if at and at < len(curve):
                notes.append(f"val {_pct(curve[at - 1])} → {_pct(curve[at])} → {_pct(curve[-1])}")
            cells.append(_pct(run["test"]) + (f" ({'; '.join(notes)})" if notes else ""))
        two_thirds = by.get((REFERENCE, round(epochs * 2 / 3), seed))
        cells.append(_pct(two_thirds and two_thirds["test"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="family", help="the protocol (default family)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every unfinished (setting, budget)")
    run.add_argument("--out", type=Path, default=Path("runs/first_task"))
    run.add_argument("--settings", nargs="+", default=list(SETTINGS), help="method[:key=value,...]")
    run.add_argument(
        "--epochs",
        type=lambda t: [int(e) for e in t.split(",")],
        default=[10, 20, 30, 60],
        help="comma-separated (default 10,20,30,60)",
    )
    run.add_argument("--scale", default="10", help="method.lr_scale (default 10: both's choice)")
    run.add_argument("--seed", default="0")
    run.add_argument("--threads", type=int, default=1, help="intra-op threads of each run")
    show = sub.add_parser("gather", help="runs -> results/first_task_budget.json and a table")
    show.add_argument("root", type=Path)
    show.add_argument("--out", type=Path, default=RESULTS)
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        if args.command == "run":
            if any(e < 1 for e in args.epochs):
                raise BudgetError(f"--epochs must be positive, got {args.epochs}")
            for spec in args.settings:
                parse_setting(spec)
            failed = run_all(
                args.out,
                experiment=args.experiment,
                settings=args.settings,
                epochs=args.epochs,
                scale=args.scale,
                seed=args.seed,
                extra=overrides,
                launch=functools.partial(family.subprocess_launch, threads=args.threads),
            )
            if failed:
                raise BudgetError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
            return
        runs = gather(args.root)
        _, batches = experiment_tasks(args.experiment)
        document = {
            "format": 1,
            "experiment": args.experiment,
            "batches_per_epoch": batches,
            "gathered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "runs": runs,
        }
        atomic_write_text(args.out, json.dumps(document, indent=1) + "\n", overwrite=True)
        print(f"wrote {args.out}", file=sys.stderr)
        print(table(runs, batches))
    except (BudgetError, OSError) as exc:
        family.fail(str(exc))


if __name__ == "__main__":
    main()
