"""The comparison tables of docs/results.md from the run folders of a sweep (`experiment=compare`,
`experiment=domains`, or runs written side by side with ``hydra.run.dir=<root>/<name>``).

For each method it keeps the run (learning-rate scale) with the best mean *validation*
accuracy over the sequence's tasks, never test. ``--lr-from DIR`` takes that choice from
another sweep folder instead (e.g. a sweep on a subset of the domains) and uses this folder's
run at the chosen scale. Accuracies are those after the last task (the accuracy matrix's last
row in the ``cl`` block of metrics.json).

    python benchmarks/compare_table.py multirun/compare/<time>           # the compare table
    python benchmarks/compare_table.py runs/domains --paper              # issue 21's table
    python benchmarks/compare_table.py runs/domains --paper --lr-from runs/domains_lr
    python benchmarks/compare_table.py runs/domains_lr --print-lr        # the chosen overrides

The default table: test accuracy per task, mean, backward transfer, bytes added per task
(sum), the chosen ``lr_scale``. ``--paper``: the paper's layout (see ``paper_table``):
accuracy per domain, mean, the near-ImageNet task(s) apart, a Visual-Decathlon-style score S
against the fine-tuned networks, bytes per task and for all domains, training seconds, BWT.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from piggyback.scores.decathlon import scores_against_reference

NEAR_IMAGENET = ("cifar10_small",)


class TableError(Exception):
    """A run folder that cannot make the table; main() prints it as ``error: ...``, exit 2."""


def load_runs(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.glob("*/metrics.json")):
        summary = json.loads(path.read_text())
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        options = dict(o.split("=", 1) for o in overrides if "=" in o)
        tasks = summary["tasks"]
        vals = [t["val/acc"] for t in tasks.values() if "val/acc" in t]
        runs.append(
            {
                "method": _row_name(options, summary["method"]),
                "lr_scale": options.get("method.lr_scale", "1"),
                "val": sum(vals) / len(vals) if vals else float("-inf"),
                "summary": summary,
                "options": options,
                "budget": _budget(path.parent / ".hydra" / "config.yaml"),
            }
        )
    if not runs:
        raise TableError(f"no */metrics.json under {root}: give the sweep's hydra.sweep.dir")
    return runs


def _row_name(options: dict[str, str], method: str) -> str:
    """The method, plus the mask choice when the sweep varied it (one row per choice):
    ``mask=1s,kernel,filter`` or, for methods that own their mask options (KSM),
    ``method.mask.granularity=kernel,filter``."""
    name = options.get("method", method)
    for key in ("mask", "method.mask.granularity"):
        if key in options:
            name += f" ({key.removeprefix('method.')}={options[key]})"
    return name


def _budget(config: Path) -> str | None:
    """Backbone, image size, epochs (and batch limit) of a run, from its composed config."""
    if not config.is_file():
        return None
    cfg = yaml.safe_load(config.read_text()) or {}
    trainer, data = cfg.get("trainer") or {}, cfg.get("data") or {}
    text = f"{(cfg.get('backbone') or {}).get('name')}, {data.get('image_size')} px, "
    text += f"{trainer.get('max_epochs')} epoch(s) per task"
    limit = trainer.get("limit_train_batches")
    return text + (f" of at most {limit} batches" if limit is not None else "")


def best_by_val(runs: list[dict]) -> dict[str, dict]:
    """Each method's run with the best mean validation accuracy (first of equals)."""
    best: dict[str, dict] = {}
    for run in runs:
        if run["method"] not in best or run["val"] > best[run["method"]]["val"]:
            best[run["method"]] = run
    return best


def chosen_runs(root: Path, lr_from: Path | None = None) -> dict[str, dict]:
    """One run per method: best by validation here, or at the scale ``lr_from`` chose."""
    runs = load_runs(root)
    if lr_from is None:
        return best_by_val(runs)
    choice = best_by_val(load_runs(lr_from))
    chosen: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        if method not in choice:
            raise TableError(f"{lr_from} has no run of {method}: sweep it there or drop --lr-from")
        scale = float(choice[method]["lr_scale"])
        match = [r for r in runs if r["method"] == method and float(r["lr_scale"]) == scale]
        if not match:
            raise TableError(
                f"{root} has no run of {method} at method.lr_scale={choice[method]['lr_scale']} "
                f"(chosen in {lr_from})"
            )
        chosen[method] = best_by_val(match)[method]
    return chosen


def final_accuracy(summary: dict) -> dict[str, float]:
    """Test accuracy (fraction) per task after the last task of the run."""
    cl = summary.get("cl") or {}
    if "accuracy_matrix" in cl:
        return dict(zip(cl["tasks"], cl["accuracy_matrix"][-1], strict=True))
    return {t: r["test/acc"] for t, r in summary["tasks"].items() if "test/acc" in r}


def _per_task(summary: dict, key: str) -> dict[str, float | None]:
    """``key`` (task_bytes, train_seconds) per task, from the cl block or the task records."""
    block = (summary.get("cl") or {}).get(key) or {}
    return {t: block.get(t, record.get(key)) for t, record in summary["tasks"].items()}


def table(root: Path, lr_from: Path | None = None) -> str:
    best = chosen_runs(root, lr_from)
    tasks = list(next(iter(best.values()))["summary"]["tasks"])
    head = ["method", "lr x", *tasks, "mean", "BWT", "task bytes (sum)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in sorted(best):
        run = best[method]
        summary = run["summary"]
        cl = summary.get("cl") or {}
        accs = [100 * summary["tasks"][t]["test/acc"] for t in tasks]
        final = cl.get("accuracy_matrix", [accs])[-1]
        final = [100 * v for v in final] if "accuracy_matrix" in cl else accs
        bwt = cl.get("bwt")
        size = sum(v or 0 for v in (cl.get("task_bytes") or {}).values())
        cells = [
            method,
            run["lr_scale"],
            *(f"{a:.1f}" for a in final),
            f"{sum(final) / len(final):.1f}",
            "-" if bwt is None else f"{100 * bwt:+.1f}",
            f"{size / 1e6:.2f} MB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def paper_table(
    best: dict[str, dict],
    *,
    reference: str = "finetune",
    near: Sequence[str] = NEAR_IMAGENET,
    lr_source: str = "this sweep",
) -> str:
    """Issue 21's table in the paper's layout, with its caption below it (markdown).

    Columns: test accuracy per domain (every task not in ``near``), their mean, the ``near``
    tasks, S, bytes per task (mean over the domains) and for all of them, training seconds
    per task (mean over the domains), BWT of the whole sequence. S is the Visual Decathlon
    score (Rebuffi et al. 2017) over the domains with ``reference``'s accuracies as the
    baseline (``piggyback.scores.decathlon.scores_against_reference``): the reference scores 250 per
    domain by construction.
    """
    order = [reference, *sorted(m for m in best if m != reference)]
    methods = [m for m in order if m in best]
    tasks = list(dict.fromkeys(t for m in methods for t in final_accuracy(best[m]["summary"])))
    domains = [t for t in tasks if t not in near]
    nears = [t for t in tasks if t in near]
    ref = final_accuracy(best[reference]["summary"]) if reference in best else None
    n = len(domains)
    head = ["method", "lr ×", *domains, f"mean ({n})", *nears, "S", "bytes / task"]
    head += [f"bytes ({n})", "train s / task", "BWT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        summary = best[method]["summary"]
        acc = final_accuracy(summary)
        accs = [acc.get(t) for t in domains]
        mean = _mean(accs)
        score = None
        if ref is not None and mean is not None and all(t in ref for t in domains):
            score = sum(scores_against_reference({t: acc[t] for t in domains}, ref).values())
        sizes = [_per_task(summary, "task_bytes").get(t) for t in domains]
        size = _mean(sizes)
        seconds = _mean([_per_task(summary, "train_seconds").get(t) for t in domains])
        bwt = (summary.get("cl") or {}).get("bwt")
        cells = [method, best[method]["lr_scale"]]
        cells += ["-" if a is None else f"{100 * a:.1f}" for a in accs]
        cells.append("-" if mean is None else f"{100 * mean:.1f}")
        cells += ["-" if acc.get(t) is None else f"{100 * acc[t]:.1f}" for t in nears]
        cells += ["-" if score is None else f"{score:.0f}", format_bytes(size)]
        cells += [format_bytes(None if size is None else size * n)]
        cells += ["-" if seconds is None else f"{seconds:.0f}"]
        cells += ["-" if bwt is None else f"{100 * bwt:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    caption = _caption(ref, reference, domains, nears, lr_source)
    budgets = sorted({best[m]["budget"] for m in methods if best[m]["budget"]})
    caption += f" Budget: {'; '.join(budgets)}." if budgets else ""
    return "\n".join(lines) + "\n\n" + caption


def _caption(
    ref: dict[str, float] | None,
    reference: str,
    domains: list[str],
    nears: list[str],
    lr_source: str,
) -> str:
    n = len(domains)
    apart = f"; {', '.join(nears)} (near ImageNet) is shown apart" if nears else ""
    text = (
        f"Test accuracy (%) on each task after the whole sequence; mean and S over the {n} "
        f"domains{apart}. S: Visual-Decathlon score (Rebuffi et al. 2017) with `{reference}` "
        "(a fine-tuned network per task) as the reference: per domain E_max = 2 × the "
        "reference's error, S = Σ 1000 · max(0, E_max − E)² / E_max², so the reference scores "
        f"250 per domain ({250 * n} in all) and 0 means twice its error or worse"
    )
    perfect = [t for t in domains if ref is not None and t in ref and ref[t] >= 1.0]
    if ref is None:
        text += f"; no `{reference}` run here, so no S"
    elif perfect:
        text += (
            f"; the reference makes no error on {', '.join(perfect)}: there E_max = 0, a "
            "method without error ties it (250) and any other scores 0"
        )
    return text + (
        f". Bytes: what a task adds to the backbone (its artifact's task_bytes; a fine-tuned "
        f"network stores all its weights), mean per domain and for all {n}. Train s: "
        "wall-clock seconds of fitting a task, mean over the domains (comparable only between "
        "runs made one after another on one machine). BWT: backward transfer over the "
        f"whole sequence (points). lr ×: `method.lr_scale`, chosen per method on the mean "
        f"validation accuracy of {lr_source}, never on test."
    )


def print_lr(best: dict[str, dict]) -> str:
    """One line of train.py overrides per method: its chosen mask and learning-rate scale."""
    lines = []
    for _, run in sorted(best.items()):
        options = run["options"]
        keep = {"method": options.get("method", run["summary"]["method"])}
        keep |= {"mask": options["mask"]} if "mask" in options else {}
        keep["method.lr_scale"] = run["lr_scale"]
        lines.append(" ".join(f"{k}={v}" for k, v in keep.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the sweep folder (hydra.sweep.dir)")
    parser.add_argument("--paper", action="store_true", help="issue 21's layout (S, bytes, s)")
    parser.add_argument(
        "--lr-from", type=Path, help="choose each method's lr_scale on this sweep's validation"
    )
    parser.add_argument("--reference", default="finetune", help="S's reference method")
    parser.add_argument(
        "--near",
        nargs="*",
        default=list(NEAR_IMAGENET),
        help="tasks shown apart, outside the mean and S",
    )
    parser.add_argument(
        "--print-lr", action="store_true", help="print each method's chosen overrides"
    )
    args = parser.parse_args(argv)
    try:
        if args.print_lr:
            print(print_lr(chosen_runs(args.root, args.lr_from)))
        elif args.paper:
            best = chosen_runs(args.root, args.lr_from)
            source = "this sweep"
            if args.lr_from:
                swept = dict.fromkeys(
                    t for r in load_runs(args.lr_from) for t in r["summary"]["tasks"]
                )
                source = (
                    f"another sweep, `{args.lr_from}` (tasks: {', '.join(swept)}), "
                    "whose choice is reused here"
                )
            print(
                paper_table(
                    best,
                    reference=args.reference,
                    near=args.near,
                    lr_source=source,
                )
            )
        else:
            print(table(args.root, args.lr_from))
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
