"""The papers' claims about the family, checked against ``results/family.json``.

Each claim is an ordering of two methods that a paper of the family reports ("a above b").
The check is paired by seed: for every seed both methods ran, the difference of their mean
final test accuracy over the domains; the claim *holds* when every seed agrees (at least two
seeds), is *reversed* when every seed says the opposite, and is *within the seed spread*
otherwise. One seed is not judged. Rendered into docs/results.md with the tables, so the
verdicts change with the data and never by hand.
"""

from __future__ import annotations

import statistics
from typing import Any, NamedTuple


class Claim(NamedTuple):
    above: str
    below: str
    source: str


CLAIMS = (
    Claim("piggyback", "classifier_only", "Mallya et al. 2018: Piggyback > classifier only"),
    Claim("finetune", "piggyback", "Mallya et al. 2018: Piggyback close to, below, fine-tuning"),
    Claim("piggyback", "packnet", "Mallya et al. 2018: Piggyback ≥ PackNet (5 of 6 tasks)"),
    Claim("cpg", "packnet", "Hung et al. 2019: CPG ≥ PackNet"),
    Claim("wsn", "packnet", "Kang et al. 2022: WSN ≥ PackNet"),
    Claim("piggyback_bn", "piggyback", "Mallya et al. 2018: task-specific BN helps far domains"),
    Claim("ksm", "piggyback", "Yang et al. 2021: KSM ≥ Piggyback"),
    Claim("hat", "finetune_sequential", "Serra et al. 2018: HAT > sequential fine-tuning"),
)


ZHAO = (
    Claim(
        "piggyback",
        "classifier_only",
        "Zhao et al. 2020: masks on a frozen BERT > its classifier only",
    ),
    Claim(
        "finetune",
        "piggyback",
        "Zhao et al. 2020: masks on par with (a little below) fine-tuning",
    ),
)
_ZHAO_PAIRS = {(z.above, z.below) for z in ZHAO}
TEXT_CLAIMS = ZHAO + tuple(
    c
    for c in CLAIMS
    if "piggyback_bn" not in (c.above, c.below) and (c.above, c.below) not in _ZHAO_PAIRS
)
"""The text protocol's claims: Zhao et al.'s (GLUE-style tasks on BERT/RoBERTa, no public
code: PAPER.md), then the family's orderings that apply to a transformer (no BatchNorm, so
no task-BN claim)."""

BY_EXPERIMENT = {"text_family": TEXT_CLAIMS}


def claims_for(experiment: str) -> tuple[Claim, ...]:
    """The claims a protocol's results are checked against (the image family's by default)."""
    return BY_EXPERIMENT.get(experiment, CLAIMS)


def domain_mean(run: dict[str, Any], domains: list[str]) -> float:
    """A run's mean final test accuracy over the domains (fraction)."""
    return statistics.fmean(run["test_final"][t] for t in domains)


def check(results: dict[str, Any], claim: Claim) -> dict[str, Any]:
    """The paired differences (points) of one claim and its verdict."""
    methods = results["methods"]
    if claim.above not in methods or claim.below not in methods:
        missing = [m for m in (claim.above, claim.below) if m not in methods]
        return {"diffs": [], "verdict": f"not in the table ({', '.join(missing)})"}
    domains = [t for t in results["tasks"] if t not in results["near"]]
    above = {r["seed"]: domain_mean(r, domains) for r in methods[claim.above]["runs"]}
    below = {r["seed"]: domain_mean(r, domains) for r in methods[claim.below]["runs"]}
    seeds = sorted(set(above) & set(below), key=str)
    diffs = [100 * (above[s] - below[s]) for s in seeds]
    if len(diffs) < 2:
        verdict = "one seed: not judged"
    elif all(d > 0 for d in diffs):
        verdict = "holds"
    elif all(d < 0 for d in diffs):
        verdict = "reversed"
    else:
        verdict = "within the seed spread"
    return {"diffs": diffs, "verdict": verdict}


def claims_table(results: dict[str, Any], claims: tuple[Claim, ...] = CLAIMS) -> str:
    """Markdown: claim, difference (points, mean ± std over the shared seeds), seeds that
    agree, verdict."""
    head = ["claim (paper)", "a − b (points)", "seeds a > b", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for claim in claims:
        found = check(results, claim)
        diffs = found["diffs"]
        if diffs:
            spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
            diff = f"{statistics.fmean(diffs):+.1f}{spread}"
            agree = f"{sum(d > 0 for d in diffs)} of {len(diffs)}"
        else:
            diff = agree = "-"
        pair = f"`{claim.above}` − `{claim.below}`"
        lines.append(f"| {claim.source} ({pair}) | {diff} | {agree} | {found['verdict']} |")
    return "\n".join(lines)
