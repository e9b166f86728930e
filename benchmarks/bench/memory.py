"""Section ``memory``: peak training memory of Piggyback, plain and lean, over fine-tuning's.

Each variant runs in a fresh process (``run.py --memory-child``, :func:`memory_child`) so
that one variant's freed pages cannot hide another's growth; this module holds both the
parent that starts the children and the child's measurement.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench.cli import LEAN_ARGV, RUN_PY
from bench.report import emit, mib, note
from bench.trainee import Trainee, batch

MEMORY_VARIANTS = {
    "piggyback": ("piggyback", ()),
    # method=piggyback_lean with model.recompute_masked_weights=true
    "piggyback_lean": ("piggyback", LEAN_ARGV),
    "piggyback_lean[factored]": ("piggyback", (*LEAN_ARGV, "--optimizer", "lean_factored")),
    "finetune": ("finetune", ()),
}
"""Each memory variant: the method its child trains and the flags added to its argv."""

MEMORY_LINES = {
    "piggyback": (
        "info: the paper's Adam",
        "mask, its gradient and 2 Adam moments are weight-sized",
    ),
    "piggyback_lean": (
        "<= 1.10 at 224 px, <= 1.15 at 96 px",
        "method=piggyback_lean (LeanAdam, bf16 moments, stepped in backward) "
        "+ model.recompute_masked_weights=true",
    ),
    "piggyback_lean[factored]": (
        "info: not Adam-like on masks",
        "piggyback_lean + method.optimizer.optimizer.second_moment=factored",
    ),
}
"""Each memory variant but finetune: its line's target and what it runs."""

MMAP_THRESHOLD = 1 << 20


def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return hwm, rss


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process so that one method's freed pages cannot hide another's."""
    trainee = Trainee(args.memory_child, args)
    x, y = batch(args)
    module = trainee.module
    static = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if args.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.memory_steps):
            trainee.step(x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        how = "torch.cuda.max_memory_allocated over the steps (params, state, activations)"
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: RSS = live memory
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        _, base = _rss_kib()
        for _ in range(args.memory_steps):
            trainee.step(x, y)
        hwm, _ = _rss_kib()
        peak = static + 1024 * (hwm - base)
        how = "param+buffer bytes + peak RSS growth over the steps"
    print(json.dumps({"peak": peak, "static": static, "how": how}))


def bench_memory(args: argparse.Namespace) -> None:
    """Peak training memory of the paper's Piggyback and of its lean setting, over
    fine-tuning's, each measured in a fresh process."""
    if args.device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        note("peak memory: needs Linux /proc/self/clear_refs on CPU; skipped")
        return
    # A fixed mmap threshold turns off glibc's dynamic one, which after the first freed
    # weight-sized tensor serves later ones from the heap, whose freed holes stay resident:
    # every tensor above 1 MiB is then its own mapping, unmapped when freed, so the peak RSS
    # follows live tensors instead of the heap's fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    result = {}
    for variant, (method, extra) in MEMORY_VARIANTS.items():
        cmd = [sys.executable, str(RUN_PY), "--memory-child", method, *args.child_argv, *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if out.returncode != 0:
            note(f"peak memory child for {variant} failed: {out.stderr.strip()[-500:]}")
            return
        result[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    ft = result["finetune"]
    where = f"{args.memory_steps} steps, {args.arch}, batch {args.batch} at {args.size} px"
    for variant, (target, what) in MEMORY_LINES.items():
        peak = result[variant]["peak"]
        emit(
            f"{variant}_peak_memory / finetune_peak_memory",
            peak / ft["peak"],
            target,
            f"{mib(peak)} vs {mib(ft['peak'])}; {what}; {result[variant]['how']}; {where}",
        )
