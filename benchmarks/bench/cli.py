"""``run.py``'s command line: flags, the defaults per device, and the argv a child re-runs.

Apart from ``run.py`` because sections need it too: the train section builds the lean
variant's arguments from the same parser, and the memory and compile sections re-run
``run.py`` in a child process with the argv given here (:data:`RUN_PY`, ``child_argv``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from bench.trainee import METHODS

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
"""The entry the memory and compile sections re-run in a fresh process."""
DESCRIPTION = (
    "Performance figures of issue 6, one line each, every line a ratio against its target."
)
SECTIONS = (
    "train",
    "compile",
    "inference",
    "switch",
    "memory",
    "loader",
    "faults",
    "precision",
)
"""``--only``'s choices, in the order ``run.py`` runs them."""
OPT_IN = ("precision",)
"""Sections that run only when ``--only`` names them (not part of the full run)."""
LEAN_ARGV = ("--optimizer", "lean", "--recompute", "--step-in-backward")
"""method=piggyback_lean (LeanAdam stepped in backward) + model.recompute_masked_weights"""


def _compile_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value where it parses (false, 3, "x"), else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        sys.exit(f"--compile-option {text!r}: expected KEY=VALUE, e.g. layout_optimization=false")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, then each setting's default for the device; sets torch's thread count."""
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="short smoke run (< 1 min on CPU)")
    p.add_argument("--arch", help="default: resnet18 on cpu, resnet50 on cuda")
    p.add_argument("--batch", type=int, help="training batch; default 16 cpu / 64 cuda")
    p.add_argument("--size", type=int, help="input px; default 96 cpu / 224 cuda")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default fp32 cpu / bf16 cuda")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, help="intra-op threads; default 1 on cpu")
    p.add_argument("--rounds", type=int, help="timed rounds per variant")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="piggyback",
        help="the method whose step the precision section times",
    )
    p.add_argument("--zeros", type=float, default=0.07, help="mask zero fraction")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak of the GPU, if not known")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--ckpt-dir", help="where the faults section writes checkpoints (a temp dir)")
    p.add_argument(
        "--compile-mask",
        choices=("ste", "function"),
        default="ste",
        help="what torch.compile traces for W*M: the plain-op straight-through form "
        "(default, what the package does) or the eager autograd Function (for comparison)",
    )
    p.add_argument(
        "--compile-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Inductor option for the compiled variants, as model.compile_options "
        "(e.g. layout_optimization=false); repeatable",
    )
    p.add_argument(
        "--bool-saves-as-float",
        action="store_true",
        help="diagnostic for the compile section: the partitioner weighs saved bool tensors "
        "as float, so it keeps ReLU outputs instead of their bool masks (whose stores are "
        "slow in Inductor's CPU code); patches a private torch function in the child only",
    )
    p.add_argument(
        "--step-in-backward",
        action="store_true",
        help="piggyback's optimizer wrapped in piggyback.optim.StepInBackward",
    )
    p.add_argument(
        "--optimizer",
        choices=("adam", "lean", "lean_factored"),
        default="adam",
        help="piggyback's optimizer: the paper's Adam, method=piggyback_lean's LeanAdam (bf16 "
        "moments), or that LeanAdam with a factored second moment",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="model.recompute_masked_weights=true: W*M rebuilt in backward, not saved",
    )
    p.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--memory-child" in child_argv:
        i = child_argv.index("--memory-child")
        del child_argv[i : i + 2]
    if "--compile-child" in child_argv:
        child_argv.remove("--compile-child")
    args.child_argv = child_argv
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(
            "--device cuda: torch.cuda.is_available() is False on this machine (no GPU or no "
            "CUDA build of torch); run with --device cpu"
        )
    args.device = torch.device(args.device)
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.batch = args.batch or (64 if cuda else (8 if args.quick else 16))
    args.size = args.size or (224 if cuda else (64 if args.quick else 96))
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.rounds = args.rounds or (3 if args.quick else (15 if not cuda else 30))
    args.compile_options = dict(_compile_option(o) for o in args.compile_option) or None
    args.warmup = 1 if args.quick else 3
    args.num_classes = 200
    args.infer_batch = args.batch
    args.switches = 4 if args.quick else 10
    args.switch_device = "cpu"
    args.memory_steps = 2 if args.quick else 3
    args.loader_images = 48 if args.quick else 256
    args.loader_batch = 16
    args.loader_workers = min(2 if not cuda else 8, os.cpu_count() or 1)
    args.loader_model_batch = (2 if args.quick else 8) if not cuda else args.batch
    args.loader_model_rounds = 2 if args.quick else 4
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if cuda:
        torch.backends.cudnn.benchmark = True
    return args
