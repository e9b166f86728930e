"""Visual Decathlon score and the paper's published numbers, kept as data.

The evaluator and the notebook compare our runs against these figures, so they live in one
place, typed and keyed by the same names the data modules use: devkit domain names for the
decathlon and dataset folder names for the fine-grained benchmark. Accuracies are percent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "DECATHLON_BASELINE_ACC",
    "DECATHLON_DOMAINS",
    "DECATHLON_METHODS",
    "FINE_GRAINED_DATASETS",
    "FINE_GRAINED_TABLE",
    "PIGGYBACK_DECATHLON_ACC",
    "PUBLISHED",
    "canonical_decathlon_domain",
    "decathlon_domain_scores",
    "decathlon_score",
    "is_decathlon_task",
    "scores_against_reference",
]

# devkit name -> number of classes, in the devkit's (alphabetical) order
DECATHLON_DOMAINS: Mapping[str, int] = MappingProxyType(
    {
        "aircraft": 100,
        "cifar100": 100,
        "daimlerpedcls": 2,
        "dtd": 47,
        "gtsrb": 43,
        "imagenet12": 1000,
        "omniglot": 1623,
        "svhn": 10,
        "ucf101": 101,
        "vgg-flowers": 102,
    }
)

# The challenge's reference baseline (fine-tuned ResNet); defines Emax_d = 2 x its error.
DECATHLON_BASELINE_ACC: Mapping[str, float] = MappingProxyType(
    {
        "aircraft": 60.34,
        "cifar100": 82.12,
        "daimlerpedcls": 92.82,
        "dtd": 55.53,
        "gtsrb": 97.53,
        "imagenet12": 59.87,
        "omniglot": 87.69,
        "svhn": 96.55,
        "ucf101": 51.20,
        "vgg-flowers": 81.41,
    }
)

PIGGYBACK_DECATHLON_ACC: Mapping[str, float] = MappingProxyType(
    {
        "aircraft": 65.29,
        "cifar100": 79.87,
        "daimlerpedcls": 96.99,
        "dtd": 57.45,
        "gtsrb": 97.27,
        "imagenet12": 57.69,
        "omniglot": 87.63,
        "svhn": 97.24,
        "ucf101": 47.48,
        "vgg-flowers": 79.09,
    }
)

# method -> {"params": x backbone (None if not published), "mean_acc": %, "score": S}
DECATHLON_METHODS: Mapping[str, Mapping[str, float | None]] = MappingProxyType(
    {
        "feature extractor": {"params": 1.0, "mean_acc": 54.28, "score": 544.0},
        "fine-tune": {"params": 10.0, "mean_acc": 76.51, "score": 2500.0},
        "piggyback": {"params": 1.28, "mean_acc": 76.60, "score": 2838.0},
        "parallel residual adapters": {"params": 2.0, "mean_acc": 78.07, "score": 3412.0},
        "nettailor": {"params": None, "mean_acc": 79.64, "score": 3744.0},
        "url + ra": {"params": 2.0, "mean_acc": 80.52, "score": 4005.0},
    }
)

# Fine-grained benchmark, ResNet-50 top-1 %, keyed by dataset folder name.
FINE_GRAINED_DATASETS: tuple[str, ...] = (
    "imagenet",
    "cubs_cropped",
    "stanford_cars_cropped",
    "flowers",
    "wikiart",
    "sketches",
)


def _row(*accs: float) -> Mapping[str, float]:
    return MappingProxyType(dict(zip(FINE_GRAINED_DATASETS, accs, strict=True)))


FINE_GRAINED_TABLE: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "classifier only": _row(76.16, 70.03, 52.80, 85.99, 55.60, 50.86),
        "individual fine-tuning": _row(76.16, 82.83, 91.83, 96.56, 75.60, 80.78),
        "packnet": _row(75.71, 80.41, 86.11, 93.04, 69.40, 76.17),
        "piggyback": _row(76.16, 81.59, 89.62, 94.77, 71.33, 79.91),
        "cpg": _row(75.81, 83.59, 92.80, 96.62, 77.15, 80.33),
    }
)

# Total storage for the 6 fine-grained tasks (MB), where the paper gives it.
FINE_GRAINED_SIZE_MB: Mapping[str, float] = MappingProxyType(
    {"individual fine-tuning": 551.0, "packnet": 115.0, "piggyback": 121.0, "cpg": 121.0}
)

# Reference-code README best single-run top-1 *errors* (%), fine-grained tasks.
REFERENCE_CODE_ERRORS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        arch: MappingProxyType(dict(zip(FINE_GRAINED_DATASETS[1:], errs, strict=True)))
        for arch, errs in {
            "resnet50": (18.23, 10.19, 4.77, 28.57, 19.75),
            "vgg16": (20.75, 11.78, 6.93, 29.80, 22.30),
            "densenet121": (19.24, 10.62, 4.91, 29.33, 20.05),
        }.items()
    }
)

PUBLISHED: Mapping[str, Any] = MappingProxyType(
    {
        "decathlon_piggyback": PIGGYBACK_DECATHLON_ACC,
        "decathlon_baseline": DECATHLON_BASELINE_ACC,
        "decathlon_methods": DECATHLON_METHODS,
        "fine_grained": FINE_GRAINED_TABLE,
        "fine_grained_size_mb": FINE_GRAINED_SIZE_MB,
        "reference_code_errors": REFERENCE_CODE_ERRORS,
    }
)

# Aliases seen in papers, tables and configs. "flowers" and "imagenet" also name
# fine-grained datasets, so they are accepted when scoring (the context is the decathlon) but
# do not make is_decathlon_task() true.
_AMBIGUOUS_ALIASES = {"flowers": "vgg-flowers", "imagenet": "imagenet12"}
_ALIASES = {
    "airc": "aircraft",
    "fgvc-aircraft": "aircraft",
    "c100": "cifar100",
    "cifar-100": "cifar100",
    "dped": "daimlerpedcls",
    "daimler": "daimlerpedcls",
    "daimlerped": "daimlerpedcls",
    "gtsr": "gtsrb",
    "imnet": "imagenet12",
    "imagenet-12": "imagenet12",
    "ilsvrc12": "imagenet12",
    "ilsvrc2012": "imagenet12",
    "oglt": "omniglot",
    "ucf": "ucf101",
    "ucf-101": "ucf101",
    "flwr": "vgg-flowers",
    "vggflowers": "vgg-flowers",
    "flowers102": "vgg-flowers",
    "flowers-102": "vgg-flowers",
}
_PREFIXES = ("decathlon/", "decathlon-", "decathlon_", "vd/", "vd-", "vd_")


def _normalise(name: str) -> tuple[str, bool]:
    """Lower-case, ``_``/space -> ``-``; strips a decathlon prefix and says whether it did."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    for prefix in _PREFIXES:
        prefix = prefix.replace("_", "-")
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix) :], True
    return key, False


def _lookup(name: str, *, allow_ambiguous: bool) -> str | None:
    key, prefixed = _normalise(name)
    if key in DECATHLON_DOMAINS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    if (allow_ambiguous or prefixed) and key in _AMBIGUOUS_ALIASES:
        return _AMBIGUOUS_ALIASES[key]
    return None


def canonical_decathlon_domain(name: str) -> str:
    """Devkit name for a domain or one of its aliases (case, ``_``/``-`` and prefix tolerant)."""
    domain = _lookup(name, allow_ambiguous=True)
    if domain is None:
        raise ValueError(
            f"unknown Visual Decathlon domain {name!r}; expected one of "
            f"{', '.join(DECATHLON_DOMAINS)} (or an alias such as 'flowers', 'imagenet', 'c100')"
        )
    return domain


def is_decathlon_task(name: str) -> bool:
    """True for decathlon domain names and unambiguous aliases.

    "flowers" and "imagenet" return False because the fine-grained benchmark uses those exact
    names; ask for "vgg-flowers" / "imagenet12" (or prefix "decathlon_") to be explicit.
    """
    return _lookup(name, allow_ambiguous=False) is not None


def decathlon_domain_scores(
    acc_by_domain: Mapping[str, float], *, percent: bool = True
) -> dict[str, float]:
    """Per-domain contribution ``alpha_d * max(0, Emax_d - E_d)^2``, keyed by devkit name.

    Written as ``1000 * ((Emax - E) / Emax)^2`` (equal to the challenge formula since
    ``alpha_d = 1000 / Emax_d^2``) so that matching the baseline gives exactly 250.0.
    """
    scale = 100.0 if percent else 1.0
    out: dict[str, float] = {}
    for name, acc in acc_by_domain.items():
        domain = canonical_decathlon_domain(name)
        if domain in out:
            raise ValueError(f"domain {domain!r} given twice (as {name!r} and an alias)")
        acc = float(acc)
        if not math.isfinite(acc) or not 0.0 <= acc <= scale:
            unit = "percent (0-100)" if percent else "a fraction (0-1)"
            raise ValueError(
                f"accuracy for {name!r} must be {unit}, got {acc}"
                + ("; pass percent=False for fractions" if percent else "")
            )
        err = 1.0 - acc / scale
        out[domain] = _domain_score(err, 1.0 - DECATHLON_BASELINE_ACC[domain] / 100.0)
    return out


def _domain_score(err: float, reference_err: float) -> float:
    """``1000 * (max(0, Emax - E) / Emax)^2`` with ``Emax = 2 x reference_err``.

    A reference that makes no error leaves ``Emax = 0``: the formula's limit gives nothing to
    any error and a perfect domain is a tie with the reference, scored 250 like every tie.
    """
    e_max = 2.0 * reference_err
    if e_max <= 0.0:
        return 250.0 if err <= 0.0 else 0.0
    return 1000.0 * (max(0.0, e_max - err) / e_max) ** 2


def scores_against_reference(
    acc_by_task: Mapping[str, float], reference_acc: Mapping[str, float]
) -> dict[str, float]:
    """Decathlon-style per-task scores with another run as the baseline (Rebuffi et al. 2017).

    Accuracies are fractions (as in ``metrics.json``); ``Emax_t = 2 x`` the reference's error
    on task ``t``, so the reference itself scores exactly 250 per task, 1000 is a perfect task
    and 0 is twice the reference's error or worse. A reference with no error on a task gives
    250 to a method that is perfect there too and 0 to any other (see ``_domain_score``).
    """
    missing = [t for t in acc_by_task if t not in reference_acc]
    if missing:
        raise ValueError(f"no reference accuracy for {', '.join(missing)}")
    return {
        task: _domain_score(1.0 - float(acc), 1.0 - float(reference_acc[task]))
        for task, acc in acc_by_task.items()
    }


def decathlon_score(acc_by_domain: Mapping[str, float], *, percent: bool = True) -> float:
    """Visual Decathlon score S = sum_d alpha_d * max(0, Emax_d - E_d)^2 over the given domains.

    Errors are fractions, ``Emax_d`` is twice the baseline error, ``alpha_d = 1000 / Emax_d^2``:
    1000 for a perfect domain, 250 for matching the baseline, 0 at or beyond twice its error.
    A subset of domains scores only those, so partial runs can be tracked.
    """
    return float(sum(decathlon_domain_scores(acc_by_domain, percent=percent).values()))
