"""The README's comparison table from an `experiment=compare` multirun folder.

For each method it keeps the run (learning-rate scale) with the best mean *validation*
accuracy over the sequence's tasks, never test, and prints one markdown row: test accuracy
per task, mean, backward transfer and forgetting (from the ``cl`` block of metrics.json),
bytes added per task, and the chosen ``lr_scale``.

    python benchmarks/compare_table.py multirun/compare/<time>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def _runs(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.glob("*/metrics.json")):
        summary = json.loads(path.read_text())
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        options = dict(o.split("=", 1) for o in overrides if "=" in o)
        tasks = summary["tasks"]
        vals = [t["val/acc"] for t in tasks.values() if "val/acc" in t]
        runs.append(
            {
                # a mask-group sweep (mask=1s,kernel,filter) keeps one row per mask choice
                "method": options.get("method", summary["method"])
                + (f" (mask={options['mask']})" if "mask" in options else ""),
                "lr_scale": options.get("method.lr_scale", "1"),
                "val": sum(vals) / len(vals) if vals else float("-inf"),
                "summary": summary,
            }
        )
    return runs


def table(root: Path) -> str:
    best: dict[str, dict] = {}
    for run in _runs(root):
        if run["method"] not in best or run["val"] > best[run["method"]]["val"]:
            best[run["method"]] = run
    if not best:
        raise SystemExit(f"no */metrics.json under {root}")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the multirun folder (hydra.sweep.dir)")
    print(table(parser.parse_args().root))


if __name__ == "__main__":
    main()
