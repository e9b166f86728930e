"""Performance figures of issue 6, one line each, every line a ratio against its target.

    python benchmarks/run.py                 # CPU: ResNet-18 training at 96 px, ResNet-50 switch
    python benchmarks/run.py --quick         # smoke run, well under a minute on 2 cores
    python benchmarks/run.py --device cuda   # ResNet-50 at 224 px, bf16 autocast, channels_last

Every time is the median over interleaved rounds (variant A, B, C, A, B, C, ...) so that load
drifting on a shared machine hits all variants alike; every ratio is the median of the
per-round ratios. On CPU the default is one intra-op thread: with two threads on a loaded
two-core box, OpenMP barriers wait on descheduled threads and times triple and scatter. See
benchmarks/README.md for what each line measures.

This file is the entry only: the flags live in ``bench/cli.py``, each section in its own
module under ``bench/`` (see ``bench/__init__.py``). The memory and compile sections re-run
this file with a hidden ``--memory-child`` / ``--compile-child`` flag.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from bench.cli import OPT_IN, parse_args
from bench.compiled import bench_compile, compile_child
from bench.faults import bench_faults
from bench.inference import bench_inference
from bench.loader import bench_loader
from bench.memory import bench_memory, memory_child
from bench.precision import bench_precision
from bench.report import note, section
from bench.step import bench_training
from bench.switch import bench_switch_and_artifacts

SECTION_FNS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": bench_training,
    "compile": bench_compile,
    "inference": bench_inference,
    "switch": bench_switch_and_artifacts,
    "memory": bench_memory,
    "loader": bench_loader,
    "faults": bench_faults,
    "precision": bench_precision,
}
"""Every section, in the order they run; ``bench.cli.SECTIONS`` is ``--only``'s copy."""


def main(argv: list[str] | None = None) -> None:
    """Parses ``argv``, then runs a child's measurement or the sections asked for."""
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    if args.compile_child:
        compile_child(args)
        return
    device = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    note(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} intra-op "
        f"thread(s), {'quick' if args.quick else 'full'} run, {args.arch} {args.precision} "
        f"channels_last={args.channels_last}"
    )
    start = time.perf_counter()
    for name, fn in SECTION_FNS.items():
        if (args.only and name not in args.only) or (not args.only and name in OPT_IN):
            continue
        with section(name):
            fn(args)
    note(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
