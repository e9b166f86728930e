"""Section ``switch``: switching a ResNet-50 between tasks, and the size of a task artifact.

The issue's budget is 100 ms a switch and at most one bit per masked weight (half a bit with
the ``rice`` codec on mostly-ones masks); both depend on the mask's layout, so the masks are
trained-looking ones from :mod:`bench.masks`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.masks import set_realistic_masks
from bench.report import emit, mib
from bench.timing import interleaved, med_ms
from piggyback.formats import load_artifact, save_artifact
from piggyback.methods import apply_artifact
from piggyback.models.module import PiggybackModule
from piggyback.nn.convert import get_masks

SWITCH_BUDGET_S = 0.100


def bench_switch_and_artifacts(args: argparse.Namespace) -> None:
    """The ``switch`` section's lines (see benchmarks/README.md, "Task switch")."""
    device = torch.device("cpu") if args.switch_device == "cpu" else args.device
    torch.manual_seed(0)
    module = PiggybackModule(
        backbone={"name": "resnet50", "weights": None},
        task="a",
        num_classes=200,
        scheduler={},
        log_layer_sparsity=False,
    ).eval()
    zeros = set_realistic_masks(module.backbone, args.zeros, seed=1)
    module.add_task("b", 196)
    set_realistic_masks(module.backbone, args.zeros, seed=2)
    module.commit_task()
    module.to(device)
    n_weights = sum(m.numel() for m in get_masks(module.backbone).values())

    artifacts = {enc: module.export_task("a", encoding=enc) for enc in ("bits", "rice")}
    expected = {k: v.cpu() for k, v in get_masks(module.backbone).items()}
    order = iter(("b", "a") * (args.switches + 2))
    times = interleaved(
        {"set_task": lambda: module.set_task(next(order))}, args.switches, 1, device
    )
    # apply_artifact bypasses the module's task bookkeeping: time it after set_task.
    applies = {
        f"apply_artifact[{enc}]": lambda art=art: apply_artifact(
            module.backbone,
            art,
            backbone_fingerprint=module.backbone_fingerprint,
            pretrained_bn=module.pretrained_bn,
        )
        for enc, art in artifacts.items()
    }
    times.update(interleaved(applies, args.switches, 1, device))
    for key, detail in (
        ("set_task", "PiggybackModule.set_task: re-packs the outgoing task, unpacks the new one"),
        ("apply_artifact[bits]", "unpack 1-bit masks + load, precomputed fingerprint"),
        (
            "apply_artifact[rice]",
            "rice masks decoded on their first use, then read as 1-bit packing + load",
        ),
    ):
        emit(
            f"resnet50_switch[{key}] / 100ms",
            statistics.median(times[key]) / SWITCH_BUDGET_S,
            "target <= 1.00",
            f"{med_ms(times, key):.1f} ms on {device.type}; {n_weights / 1e6:.1f}M masked "
            f"weights; {detail}",
        )

    # The first switch to a rice task decodes it (a fresh artifact each round, not cached).
    first = []
    for _ in range(max(1, args.switches // 2)):
        fresh = module.export_task("a", encoding="rice")
        start = time.perf_counter()
        apply_artifact(
            module.backbone,
            fresh,
            backbone_fingerprint=module.backbone_fingerprint,
            pretrained_bn=module.pretrained_bn,
        )
        first.append(time.perf_counter() - start)
    emit(
        "resnet50_first_switch[apply_artifact[rice]] / 100ms",
        statistics.median(first) / SWITCH_BUDGET_S,
        "target: once per task and process",
        f"{1e3 * statistics.median(first):.1f} ms on {device.type}; decodes the rice masks",
    )

    # Artifact size: ResNet-50 task "a", realistic mask, raw 1-bit vs rice, files on disk.
    with tempfile.TemporaryDirectory() as tmp:
        sizes, lossless = {}, True
        for enc, art in artifacts.items():
            path = save_artifact(art, Path(tmp) / f"a_{enc}.safetensors")
            sizes[enc] = os.path.getsize(path)
            decoded = load_artifact(path).unpacked_masks()
            lossless &= all(torch.equal(decoded[n], expected[n]) for n in expected)
    raw, rice = artifacts["bits"], artifacts["rice"]
    emit(
        "raw_mask_bits / masked_weight",
        raw.bits_per_masked_weight(),
        "target <= 1.00",
        f"{mib(raw.mask_bytes())} masks for {n_weights / 1e6:.1f}M weights, "
        f"{100 * zeros:.1f}% zeros clustered by layer and filter; file {mib(sizes['bits'])}",
    )
    emit(
        "rice_mask_bits / masked_weight",
        rice.bits_per_masked_weight(),
        "target <= 0.50 at >= 90% ones",
        f"{mib(rice.mask_bytes())} masks; file {mib(sizes['rice'])} vs {mib(sizes['bits'])} raw "
        f"(head included); lossless after save/load: {lossless}",
    )
