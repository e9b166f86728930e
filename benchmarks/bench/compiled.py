"""Section ``compile``: eager and ``torch.compile``d training steps of both methods.

Compile times are only real with an empty Inductor cache, so the measuring happens in a
child process (``run.py --compile-child``, :func:`compile_child`) with its own cache folder;
:func:`bench_compile` starts it and prints the lines. Named ``compiled`` so that it does not
shadow the builtin ``compile``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.cli import RUN_PY
from bench.report import emit, note
from bench.timing import interleaved, med_ms, ratio
from bench.trainee import Trainee, batch
from piggyback.nn import threshold

COMPILED = ("piggyback", "finetune")


def count_saved_bools_as_float() -> None:
    """Diagnostic only (``--bool-saves-as-float``): AOTAutograd's min-cut partitioner weighs a
    saved bool tensor at 4 bytes per element instead of 1.

    The partitioner prefers saving a ReLU's bool mask ``y <= 0`` (1 byte) to saving ``y``
    (4 bytes). Inductor's CPU code stores bool vectors through a generic conversion: the
    stem's 2.4 M-value mask adds about 25 ms to a kernel that takes under 1 ms without it
    (``benchmarks/inductor_bool_store.py``; ResNet-18's stem at batch 16, 96 px: a 45 ms
    kernel that is 14 ms without the bool), so on CPU the cheaper-to-keep mask costs time.
    This patches a private torch function in the benchmark's child process only; the
    package never does.
    """
    import torch._functorch.partitioners as partitioners  # private torch: only when asked for

    nbytes = getattr(partitioners, "_tensor_nbytes", None)
    if nbytes is None:
        sys.exit(
            "--bool-saves-as-float: torch._functorch.partitioners._tensor_nbytes is gone in "
            f"torch {torch.__version__}; the diagnostic needs updating"
        )

    def as_float(numel: int, dtype: torch.dtype) -> int:
        return nbytes(numel, torch.float32 if dtype == torch.bool else dtype)

    partitioners._tensor_nbytes = as_float


def compile_child(args: argparse.Namespace) -> None:
    """Eager and compiled training steps of both methods, in one fresh process whose
    Inductor cache is empty (set by :func:`bench_compile`), so compile times are real."""
    if args.bool_saves_as_float:
        count_saved_bools_as_float()
    if args.compile_mask == "function":  # what the compiler would see without the STE ops
        threshold.traceable_masked_weight = lambda w, m, t, k, r: threshold._MaskedWeight.apply(
            w, m, t, k, r, False
        )
    x, y = batch(args)
    trainees, compile_s, losses = {}, {}, {}
    for method in COMPILED:
        trainees[method] = Trainee(method, args)
        trainees[f"compiled {method}"] = Trainee(method, args, compiled=True)
        losses[method] = float(trainees[method].forward(x, y))
        start = time.perf_counter()
        losses[f"compiled {method}"] = float(trainees[f"compiled {method}"].step(x, y))
        compile_s[method] = time.perf_counter() - start  # the first call compiles fwd + bwd
    fns = {k: (lambda t=t: t.step(x, y)) for k, t in trainees.items()}
    times = interleaved(fns, args.rounds, args.warmup, args.device)
    print(json.dumps({"times": times, "compile_s": compile_s, "losses": losses}))


def bench_compile(args: argparse.Namespace) -> None:
    """The ``compile`` section's lines (see benchmarks/README.md, "torch.compile")."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # no graph from an earlier run is reused
        cmd = [sys.executable, str(RUN_PY), "--compile-child", *args.child_argv]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        note(f"compile child failed: {out.stderr.strip()[-1500:]}")
        return
    result = json.loads(out.stdout.strip().splitlines()[-1])
    times, compile_s, losses = result["times"], result["compile_s"], result["losses"]
    shape = f"{args.arch}, batch {args.batch} at {args.size} px, {args.precision}"
    equal = all(
        abs(losses[f"compiled {m}"] - losses[m]) <= 1e-4 * max(1.0, abs(losses[m]))
        for m in COMPILED
    )
    emit(
        "compiled_piggyback_step / compiled_finetune_step",
        ratio(times, "compiled piggyback", "compiled finetune"),
        "target <= 1.05",
        f"{med_ms(times, 'compiled piggyback'):.1f} ms vs "
        f"{med_ms(times, 'compiled finetune'):.1f} ms; {shape}; torch.compile of the "
        f"LightningModule (model.compile=true), optimizer eager; first-step losses equal to "
        f"eager: {equal}; mask op: {args.compile_mask}; options: {args.compile_options or {}}"
        + ("; saved bools weighed as float (diagnostic)" if args.bool_saves_as_float else ""),
    )
    ft_compile = compile_s["finetune"] - statistics.median(times["compiled finetune"])
    pb_compile = compile_s["piggyback"] - statistics.median(times["compiled piggyback"])
    emit(
        "piggyback_compile_time / finetune_compile_time",
        pb_compile / ft_compile,
        "target <= 1.50",
        f"{pb_compile:.1f} s vs {ft_compile:.1f} s: first compiled step less a compiled step, "
        "empty Inductor cache",
    )
    for method in COMPILED:
        emit(
            f"compiled_{method}_step / {method}_step",
            ratio(times, f"compiled {method}", method),
            "info: what compiling buys on this device",
            f"{med_ms(times, f'compiled {method}'):.1f} ms vs {med_ms(times, method):.1f} ms",
        )
    emit(
        "piggyback_step / finetune_step (eager, same run)",
        ratio(times, "piggyback", "finetune"),
        "info: the eager ratio measured alongside",
        f"{med_ms(times, 'piggyback'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms",
    )
