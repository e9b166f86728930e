"""Section ``inference``: a materialized task model against the plain network it came from.

``materialize()`` should make a Piggyback task cost nothing at inference; this section says
whether it does, and what skipping it (``W * M`` on every call) would cost.
"""

from __future__ import annotations

import argparse
import copy
from contextlib import nullcontext

import torch
import torchvision

from bench.masks import set_realistic_masks
from bench.report import emit
from bench.timing import interleaved, med_ms, ratio
from bench.trainee import batch
from piggyback.nn.convert import mask_model, materialize


def bench_inference(args: argparse.Namespace) -> None:
    """The ``inference`` section's lines (see benchmarks/README.md, "Inference")."""
    torch.manual_seed(0)
    plain = torchvision.models.get_model(args.arch, weights=None, num_classes=args.num_classes)
    masked = mask_model(copy.deepcopy(plain), exclude=["fc", "classifier*"])
    zeros = set_realistic_masks(masked, args.zeros, seed=1)
    task = materialize(masked)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {
        "plain": plain,
        "materialized": task,
        "masked": masked,
    }
    for model in models.values():
        model.to(args.device, memory_format=memory_format).eval()
    x, _ = batch(args, n=args.infer_batch)
    autocast = (
        torch.autocast(args.device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else nullcontext()
    )
    with torch.inference_mode(), autocast:
        same = torch.equal(task(x), masked(x))
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        times = interleaved(fns, args.rounds * 2, args.warmup, args.device)
    emit(
        "materialized_inference / plain_inference",
        ratio(times, "materialized", "plain"),
        "target <= 1.03",
        f"{med_ms(times, 'materialized'):.2f} ms vs {med_ms(times, 'plain'):.2f} ms; "
        f"{args.arch}, batch {args.infer_batch} at {args.size} px, {100 * zeros:.1f}% zeros; "
        f"outputs equal to the masked model: {same}",
    )
    emit(
        "masked_inference / plain_inference",
        ratio(times, "masked", "plain"),
        "info: W*M recomputed every call, why to materialize",
        f"{med_ms(times, 'masked'):.2f} ms vs {med_ms(times, 'plain'):.2f} ms",
    )
