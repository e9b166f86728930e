"""The family table (issue 35): run it resumably, gather its records, render its pages.

    python benchmarks/family.py run --out runs/family paths.data_dir=../shared/data
    python benchmarks/family.py gather runs/family        # -> results/family.json + render
    python benchmarks/family.py render                    # docs/results.md, README.md, plots
    python benchmarks/family.py render --check            # exit 1 if a page is out of date
    python benchmarks/family.py --experiment text_family run paths.data_dir=../shared/data

``--experiment``: the protocol, ``conf/experiment/<name>.yaml`` (``family``, the default, or
``text_family``); another than ``family`` runs into ``runs/<name>``, gathers into
``results/<name>.json`` and renders docs/results.md's ``<!-- <name>:begin -->`` block only.

``run``: every method of ``conf/experiment/family.yaml`` (fine-tuning first), each at every
``method.lr_scale`` of its grid at the first seed, then the scale with the best mean
*validation* accuracy at the other seeds; CPG gets the fine-tuning run of its seed as its
reference (``method.reference``, the paper's goal). One ``train.py`` process per run, into
``<out>/<method>/lr<scale>/seed<seed>``; a folder that holds a finished run (its
``metrics.json``) is skipped, so running the command again resumes where it stopped. Extra
arguments go to every ``train.py`` as Hydra overrides.

``gather``: every finished run under the folders into ``results/family.json``
(``family_data``), then ``render`` unless ``--no-render``. ``render``: the README's headline
table, docs/results.md's generated section and the two plots in docs/, from the JSON alone
(``family_render``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import family_compare
import family_data
import family_render
import yaml

from piggyback.utils.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "conf" / "experiment" / "family.yaml"
RESULTS = REPO / "results" / "family.json"
README = REPO / "README.md"
DOCS = REPO / "docs" / "results.md"
FIRST = ("finetune",)
"""Run before the others: CPG's reference is the fine-tuning run of the same seed."""

Launch = Callable[[list[str], Path], int]
"""Runs one ``train.py`` command (overrides) into a run folder; returns its exit code."""


def sweep_params(path: Path = EXPERIMENT) -> tuple[list[str], list[str], list[str]]:
    """(methods, lr scales, seeds) of the experiment's sweep: the protocol's one source."""
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    methods, scales, seeds = (
        [v.strip() for v in str(params[key]).split(",")]
        for key in ("method", "method.lr_scale", "seed")
    )
    order = [m for m in FIRST if m in methods] + [m for m in methods if m not in FIRST]
    return order, scales, seeds


def grid_variants(path: Path = EXPERIMENT) -> dict[str, list[str]]:
    """Per method, the grid points beyond the lr scale (``family_grid`` of the experiment:
    ``{method: ["method.key=value", ...]}``; a point that sets several keys separates its
    overrides by spaces), each tried at the method's chosen scale."""
    grid = yaml.safe_load(path.read_text()).get("family_grid") or {}
    return {method: [str(v) for v in values] for method, values in grid.items()}


def run_dir(out: Path, method: str, scale: str, seed: str, variant: str = "") -> Path:
    """Where a run goes; the same layout as ``train.py -m experiment=family`` for the lr grid,
    ``lr<scale>_<key><value>`` for a variant (``method.prune=0.5``: ``lr10_prune0.5``), one
    ``_<key><value>`` per override of a variant that sets several, space-separated
    (``method.grow=0.1 method.max_grows=8``: ``lr1_grow0.1_max_grows8``)."""
    suffix = ""
    for override in variant.split():
        key, _, value = override.removeprefix("method.").partition("=")
        suffix += f"_{key}{value}"
    return out / method / f"lr{scale}{suffix}" / f"seed{seed}"


def finished(folder: Path) -> bool:
    """Whether ``folder`` holds a finished run (``metrics.json`` with its ``run`` block)."""
    try:
        return "run" in json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False


def experiment_file(experiment: str) -> Path:
    """``conf/experiment/<experiment>.yaml``: the protocol (sweep, grids, budget)."""
    return REPO / "conf" / "experiment" / f"{experiment}.yaml"


def train_command(
    method: str,
    scale: str,
    seed: str,
    folder: Path,
    overrides: Sequence[str],
    variant: str = "",
    experiment: str = "family",
) -> list[str]:
    """The overrides of one run (``overwrite_artifacts``: a killed run's artifacts are redone)."""
    return [
        f"experiment={experiment}",
        f"method={method}",
        f"method.lr_scale={scale}",
        *variant.split(),
        f"seed={seed}",
        f"hydra.run.dir={folder}",
        "overwrite_artifacts=true",
        *overrides,
    ]


def subprocess_launch(overrides: list[str], folder: Path, threads: int = 0) -> int:
    """``python train.py <overrides>``, its output on this console; ``threads`` > 0 sets the
    child's intra-op threads (``OMP_NUM_THREADS``)."""
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    prefix = f"OMP_NUM_THREADS={threads} " if threads > 0 else ""
    print(f"+ {prefix}python train.py " + " ".join(overrides), file=sys.stderr, flush=True)
    command = [sys.executable, str(REPO / "train.py"), *overrides]
    return subprocess.run(command, env=env).returncode


def chosen_point(
    out: Path, method: str, scales: Sequence[str], variants: Sequence[str], seed: str
) -> tuple[str, str] | None:
    """The grid point (scale, variant override) with the best mean validation accuracy at
    ``seed`` among the finished runs of the scales (defaults) and of the variants at any of
    them (None: no run)."""
    runs = []
    for scale in scales:
        for variant in ("", *variants):
            path = run_dir(out, method, scale, seed, variant) / "metrics.json"
            record = family_data.run_record(path) if path.is_file() else None
            if record is not None:
                runs.append({**record, "lr_scale": float(scale), "override": variant})
    if not runs:
        return None
    (best, label), _ = family_data.choose_scale(runs)
    scale = next(s for s in scales if float(s) == best)
    variant = next(r["override"] for r in runs if r["lr_scale"] == best and r["variant"] == label)
    return scale, variant


def run_family(
    out: Path,
    *,
    methods: Sequence[str],
    scales: Sequence[str],
    seeds: Sequence[str],
    variants: dict[str, list[str]] | None = None,
    overrides: Sequence[str] = (),
    launch: Launch = subprocess_launch,
    experiment: str = "family",
) -> list[str]:
    """Every run of the protocol not yet finished; returns the runs that failed.

    Per method: the lr grid at the first seed, then the method's variants (``variants``) at
    the best scale, then the other seeds at the best point."""
    failed: list[str] = []

    def ensure(method: str, scale: str, seed: str, variant: str = "") -> None:
        folder = run_dir(out, method, scale, seed, variant)
        if finished(folder):
            print(f"skip {folder}: finished", file=sys.stderr, flush=True)
            return
        extra = list(overrides)
        if method == "cpg" and "finetune" in chosen:
            ref_scale, ref_variant = chosen["finetune"]
            reference = run_dir(out, "finetune", ref_scale, seed, ref_variant) / "metrics.json"
            if reference.is_file():
                extra.append(f"method.reference={reference.resolve()}")
        command = train_command(method, scale, seed, folder.resolve(), extra, variant, experiment)
        if launch(command, folder) != 0:
            failed.append(str(folder))

    chosen: dict[str, tuple[str, str]] = {}
    if "finetune" not in methods:  # CPG's reference from runs made by an earlier call
        found = chosen_point(out, "finetune", scales, [], seeds[0])
        if found is not None:
            chosen["finetune"] = found
    for method in methods:
        mine = (variants or {}).get(method, [])
        for scale in scales:
            ensure(method, scale, seeds[0])
        best = chosen_point(out, method, scales, [], seeds[0])
        if best is None:
            print(f"{method}: no finished run at seed {seeds[0]}; its seeds wait", file=sys.stderr)
            continue
        for variant in mine:
            ensure(method, best[0], seeds[0], variant)
        if mine:
            best = chosen_point(out, method, scales, mine, seeds[0]) or best
        chosen[method] = best
        shown = f"lr_scale {best[0]}" + (f", {best[1]}" if best[1] else "")
        print(f"{method}: {shown} chosen on validation", file=sys.stderr, flush=True)
        for seed in seeds[1:]:
            ensure(method, best[0], seed, best[1])
    return failed


def render(
    results_path: Path, *, check: bool = False, plots: bool = True, experiment: str = "family"
) -> list[Path]:
    """Write (or with ``check`` compare) the README block, the docs block and the plots;
    returns the pages that differ from what the results render to. Another experiment than
    ``family`` renders into docs/results.md only, between ``<!-- <experiment>:begin -->`` and
    ``<!-- <experiment>:end -->``, with plots of its own name."""
    results = json.loads(results_path.read_text())
    stale = []
    pages = {DOCS: (experiment, family_render.docs_block(results, experiment))}
    if experiment == "family":
        pages = {
            README: (family_render.README_MARKER, family_render.readme_block(results)),
            **pages,
        }
    for page, (marker, body) in pages.items():
        text = page.read_text()
        new = family_render.replace_block(text, marker, body)
        if new != text:
            stale.append(page)
            if not check:
                atomic_write_text(page, new, overwrite=True)
    if plots and not check:
        bytes_plot, matrix_plot = family_render.plot_names(experiment)
        family_render.plot_accuracy_bytes(results, DOCS.parent / bytes_plot)
        family_render.plot_matrix(results, DOCS.parent / matrix_plot)
    return stale


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiment",
        default="family",
        help="the protocol, conf/experiment/<name>.yaml (default family; text_family: the "
        "three text tasks); its results go to results/<name>.json",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every unfinished run of the protocol")
    run.add_argument("--out", type=Path, help="default: runs/<experiment>")
    run.add_argument("--methods", type=lambda t: t.split(","), help="a subset, comma-separated")
    run.add_argument("--seeds", type=lambda t: t.split(","), help="default: the experiment's")
    run.add_argument("--scales", type=lambda t: t.split(","), help="default: the experiment's")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of each run (default 1: on a shared 2-core machine two OpenMP "
        "threads waited on each other, 2.5-13 s a step against 0.4-0.6; 0: torch's default)",
    )
    gather = sub.add_parser("gather", help="records -> results/family.json, then render")
    gather.add_argument("roots", type=Path, nargs="+", help="folders of runs (any depth)")
    gather.add_argument("--out", type=Path, help="default: results/<experiment>.json")
    gather.add_argument("--no-render", action="store_true")
    versus = sub.add_parser("compare", help="one method under two results files, by seed")
    versus.add_argument("first", type=Path)
    versus.add_argument("second", type=Path)
    versus.add_argument("--method", required=True)
    versus.add_argument("--labels", nargs=2, default=("first", "second"))
    show = sub.add_parser("render", help="results/family.json -> README, docs, plots")
    show.add_argument("results", type=Path, nargs="?", help="default: results/<experiment>.json")
    show.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.command == "compare":
        try:
            found = family_compare.compare(
                json.loads(args.first.read_text()), json.loads(args.second.read_text()),
                args.method,
            )  # fmt: skip
        except (OSError, ValueError, KeyError) as exc:
            fail(str(exc).strip("'\""))
        print(family_compare.compare_table(found, tuple(args.labels)))
        return
    name = args.experiment
    protocol = experiment_file(name)
    results_default = RESULTS if name == "family" else RESULTS.parent / f"{name}.json"
    try:
        if not protocol.is_file():
            raise family_data.FamilyError(f"no experiment {name!r}: {protocol} does not exist")
        if args.command == "run":
            methods, scales, seeds = sweep_params(protocol)
            failed = run_family(
                args.out or Path("runs") / name,
                methods=args.methods or methods,
                scales=args.scales or scales,
                seeds=args.seeds or seeds,
                variants=grid_variants(protocol),
                overrides=overrides,
                launch=functools.partial(subprocess_launch, threads=args.threads),
                experiment=name,
            )
            if failed:
                fail(f"{len(failed)} run(s) failed (see above): {', '.join(failed)}")
            return
        if args.command == "gather":
            results = family_data.gather(args.roots)
            path = family_data.write_results(results, args.out or results_default)
            print(f"wrote {path}", file=sys.stderr)
            if args.no_render:
                return
            args.results, args.check = path, False
        stale = render(args.results or results_default, check=args.check, experiment=name)
        if args.check and stale:
            print(
                f"out of date: {', '.join(map(str, stale))}; run python benchmarks/family.py "
                "render",
                file=sys.stderr,
            )
            raise SystemExit(1)
    except (family_data.FamilyError, family_render.MarkerError, OSError) as exc:
        fail(str(exc))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
