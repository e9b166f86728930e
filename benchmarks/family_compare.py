"""One method under two settings of the family protocol, compared seed by seed.

For checks such as "bf16 autocast does not move accuracy beyond the seed spread" (issue 35):
gather the runs of each setting into its own results file, e.g.

    python benchmarks/family.py run --out runs/family_bf16 --methods piggyback --scales 1 \\
        trainer.precision=bf16-mixed paths.data_dir=../shared/data
    python benchmarks/family.py gather runs/family_bf16 --out results/family_bf16.json --no-render
    python benchmarks/family.py compare results/family.json results/family_bf16.json \\
        --method piggyback --labels fp32 bf16

and the table says, per shared seed, the mean final test accuracy over the domains of each,
their difference, and whether the difference stays within the seed spread of the first
setting (``|mean difference|`` at most the standard deviation over seeds of either).
"""

from __future__ import annotations

import statistics
from typing import Any

from family_claims import domain_mean


def compare(a: dict[str, Any], b: dict[str, Any], method: str) -> dict[str, Any]:
    """Per-seed domain means of ``method`` in results ``a`` and ``b`` (points), their paired
    differences, each side's spread and the verdict."""
    for name, results in (("first", a), ("second", b)):
        if method not in results["methods"]:
            raise KeyError(f"{method!r} has no runs in the {name} results")
    if a["tasks"] != b["tasks"]:
        raise ValueError(f"the two results learned different tasks: {a['tasks']} / {b['tasks']}")
    domains = [t for t in a["tasks"] if t not in a["near"]]
    side_a = {r["seed"]: 100 * domain_mean(r, domains) for r in a["methods"][method]["runs"]}
    side_b = {r["seed"]: 100 * domain_mean(r, domains) for r in b["methods"][method]["runs"]}
    seeds = sorted(set(side_a) & set(side_b), key=str)
    diffs = [side_b[s] - side_a[s] for s in seeds]
    spread = max(
        (statistics.stdev(v) for v in (list(side_a.values()), list(side_b.values())) if len(v) > 1),
        default=None,
    )
    if len(diffs) < 2 or spread is None:
        verdict = "fewer than two shared seeds: not judged"
    elif abs(statistics.fmean(diffs)) <= spread:
        verdict = "within the seed spread"
    else:
        verdict = "beyond the seed spread"
    return {"seeds": seeds, "a": side_a, "b": side_b, "diffs": diffs, "spread": spread,
            "verdict": verdict}  # fmt: skip


def compare_table(found: dict[str, Any], labels: tuple[str, str]) -> str:
    """Markdown: one row per shared seed, then the mean and the verdict."""
    la, lb = labels
    lines = [f"| seed | {la} | {lb} | {lb} − {la} |", "|---|---|---|---|"]
    for seed, diff in zip(found["seeds"], found["diffs"], strict=True):
        lines.append(f"| {seed} | {found['a'][seed]:.1f} | {found['b'][seed]:.1f} | {diff:+.1f} |")
    if found["diffs"]:
        mean = statistics.fmean(found["diffs"])
        spread = "-" if found["spread"] is None else f"{found['spread']:.1f}"
        lines.append(f"| mean | | | {mean:+.1f} (seed spread {spread}): {found['verdict']} |")
    return "\n".join(lines)
