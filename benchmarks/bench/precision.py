"""Section ``precision``: the CPU fast path, bf16 autocast and channels-last, against fp32.

One method's configured training step (``--method``, default piggyback) four ways, timed
interleaved in one process so that the machine's load hits every variant alike: fp32 (the
default), bf16 autocast (``trainer.precision=bf16-mixed``, what ``trainer=cpu_fast`` sets),
channels-last (``model.channels_last=true``) and both. Each line is a step-time ratio against
fp32 (below 1 is faster). Under autocast the masks, their gradients and the optimizer stay
float32 (``tests/test_precision.py``); only conv / linear compute drops to bf16.
Opt-in: runs only with ``--only precision``.
"""

from __future__ import annotations

import argparse
import copy

from bench.report import emit, note
from bench.timing import interleaved, med_ms, ratio
from bench.trainee import Trainee, batch

VARIANTS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "fp32+channels_last": ("fp32", True),
    "bf16+channels_last": ("bf16", True),
}
"""Variant -> (precision, channels_last)."""


def variant_args(args: argparse.Namespace, precision: str, channels_last: bool):
    """A copy of ``args`` with one variant's precision and memory format."""
    out = copy.copy(args)
    out.precision, out.channels_last = precision, channels_last
    return out


def bench_precision(args: argparse.Namespace) -> None:
    """The ``precision`` section's lines (see benchmarks/README.md, "CPU fast path")."""
    method = args.method
    inputs, trainees = {}, {}
    for key, (precision, channels_last) in VARIANTS.items():
        v = variant_args(args, precision, channels_last)
        trainees[key] = Trainee(method, v)
        inputs[key] = batch(v)
    fns = {k: (lambda k=k: trainees[k].step(*inputs[k])) for k in trainees}
    times = interleaved(fns, args.rounds, args.warmup, args.device)
    shape = f"{method}, {args.arch}, batch {args.batch} at {args.size} px"
    for key in VARIANTS:
        if key == "fp32":
            continue
        emit(
            f"{method}_step[{key}] / {method}_step[fp32]",
            ratio(times, key, "fp32"),
            "info: below 1 is faster",
            f"{med_ms(times, key):.1f} ms vs {med_ms(times, 'fp32'):.1f} ms; {shape}",
        )
    losses = {k: float(t.forward(*inputs[k]).detach()) for k, t in trainees.items()}
    note(
        "first-batch loss after the timed steps: "
        + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    )
