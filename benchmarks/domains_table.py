"""Issue 21's table in one command: run the `experiment=domains` sweep, then print its table.

    python benchmarks/domains_table.py --out runs/domains paths.data_dir=../shared/data
    python benchmarks/domains_table.py --quick --out /tmp/domains_quick \\
        paths.data_dir=../shared/data                      # smoke check, minutes on a CPU
    python benchmarks/domains_table.py --out runs/domains --lr-from runs/domains_lr \\
        paths.data_dir=../shared/data       # each method once, at the lr chosen in domains_lr

Everything after the options goes to ``train.py -m`` as Hydra overrides (they win over the
experiment's and over ``--quick``'s). ``--quick`` is a smoke check of the whole pipeline, not
a measurement: one learning rate (``method.lr_scale=1``), 2 epochs of 2 batches per task,
one validation batch and two test batches, 32 px images, no checkpoints or loggers.
``--lr-from DIR`` runs each method once, at the ``method.lr_scale`` that DIR's validation
chose (DIR may be a sweep on a subset of the domains), and says so in the table's caption.
The jobs run one after another (so their training seconds compare); a sweep folder that
already holds runs is refused unless ``--table-only`` just reprints its table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import compare_table

REPO = Path(__file__).resolve().parents[1]

QUICK = (
    "debug=quick",  # 2 epochs of 2 batches, 1 val and 2 test batches, no logger / checkpoints
    "method.lr_scale=1",  # wins over the experiment's sweep of lr scales
    "data.image_size=32",
    "data.resize_size=36",
    "data.num_workers=0",
)
"""The overrides of ``--quick``."""


def sweep_commands(
    out: Path,
    *,
    quick: bool,
    methods: Sequence[str] | None,
    overrides: Sequence[str],
    lr_from: Path | None = None,
) -> list[list[str]]:
    """The ``train.py -m`` command lines of the sweep: one for the methods x learning rates,
    or with ``lr_from`` one per method at the scale chosen there."""
    command = [sys.executable, str(REPO / "train.py"), "-m", "experiment=domains"]
    if quick:  # with lr_from, each method's own scale replaces --quick's single one
        command += [o for o in QUICK if lr_from is None or not o.startswith("method.lr_scale=")]
    tail = [*overrides, f"hydra.sweep.dir={out.resolve()}"]
    if lr_from is None:
        return [command + (["method=" + ",".join(methods)] if methods else []) + tail]
    choice = compare_table.print_lr(compare_table.chosen_runs(lr_from)).splitlines()
    chosen = [line.split() for line in choice]
    if methods:
        chosen = [c for c in chosen if c[0].removeprefix("method=") in methods]
    return [command + c + tail for c in chosen]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the sweep folder to write")
    parser.add_argument("--quick", action="store_true", help="tiny budget: a smoke check")
    parser.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        help="a subset of the methods, comma-separated (default: all)",
    )
    parser.add_argument(
        "--lr-from", type=Path, help="run each method once, at the lr_scale chosen in this sweep"
    )
    parser.add_argument("--table-only", action="store_true", help="print the table, run nothing")
    args, overrides = parser.parse_known_args(argv)
    if not args.table_only:
        if any(args.out.glob("*/metrics.json")):
            fail(f"{args.out} already holds runs; choose a new --out, or add --table-only")
        try:
            commands = sweep_commands(
                args.out,
                quick=args.quick,
                methods=args.methods,
                overrides=overrides,
                lr_from=args.lr_from,
            )
        except compare_table.TableError as exc:
            fail(str(exc))
        for command in commands:
            print("+ " + " ".join(command[1:]), file=sys.stderr, flush=True)
            code = subprocess.run(command).returncode
            if code != 0:
                fail(f"the sweep exited {code} (see above); its finished runs stay in {args.out}")
    table = [str(args.out), "--paper"]
    compare_table.main([*table, "--lr-from", str(args.lr_from)] if args.lr_from else table)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
