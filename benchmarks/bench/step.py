"""Section ``train``: the training step of each method, where its time goes, and its floor.

The issue's first figure (``piggyback_step / finetune_step``), with the variants that explain
it: fused optimizers, the forward / backward / optimizer split, the mask's own elementwise
passes timed alone, the lean setting's cost in time and, on CUDA, the fraction of the GPU's
bf16 peak.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.cli import LEAN_ARGV, parse_args
from bench.report import emit, note
from bench.timing import interleaved, med_ms, ratio
from bench.trainee import METHODS, Trainee, batch, fused_supported
from piggyback.nn.convert import masked_weights

# Dense bf16 tensor-core peaks (FLOP/s) for the "fraction of peak" line; --peak-tflops wins.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def mask_passes(trainee: Trainee, rounds: int) -> list[float]:
    """Seconds of the elementwise work a Piggyback step adds, alone, per round.

    Over every masked weight: the forward's ``W * M`` (``WeightMask.effective_weight``, the
    call the masked layers make, here without autograd) and the backward's ``dL/dW_eff * W``
    (into a preallocated buffer, the traffic of the in-place product the Function does).
    Memory-bound passes: their time is the part of the step ratio that no reordering of the
    same arithmetic removes.
    """
    layers = [m for _, m in masked_weights(trainee.module.backbone)]
    grads = [torch.randn_like(m.weight) for m in layers]
    outs = [torch.empty_like(m.weight) for m in layers]

    def run() -> None:
        with torch.no_grad():
            for m, g, out in zip(layers, grads, outs, strict=True):
                m.effective_weight()
                torch.mul(g, m.weight, out=out)

    return interleaved({"passes": run}, rounds, 1, trainee.device)["passes"]


def bench_training(args: argparse.Namespace) -> None:
    """The ``train`` section's lines (see benchmarks/README.md, "Training step")."""
    x, y = batch(args)
    shape = f"{args.arch}, batch {args.batch} at {args.size} px, {args.precision}"
    trainees = {m: Trainee(m, args) for m in METHODS}
    fused = fused_supported(args.device)
    if fused:
        trainees["piggyback[fused]"] = Trainee("piggyback", args, fused=True)
        trainees["finetune[fused]"] = Trainee("finetune", args, fused=True)
    lean = parse_args([*args.child_argv, *LEAN_ARGV])
    trainees["piggyback_lean"] = Trainee("piggyback", lean)
    fns = {k: (lambda t=t: t.step(x, y)) for k, t in trainees.items()}
    times = interleaved(fns, args.rounds, args.warmup, args.device)
    opt = {m: type(t.optimizer).__name__ for m, t in trainees.items()}
    emit(
        "piggyback_step / finetune_step",
        ratio(times, "piggyback", "finetune"),
        "target <= 1.10",
        f"{med_ms(times, 'piggyback'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms; "
        f"{shape}; optimizers as in conf/method: {opt['piggyback']} on masks+head vs "
        f"{opt['finetune']} on all weights",
    )
    emit(
        "classifier_only_step / finetune_step",
        ratio(times, "classifier_only", "finetune"),
        "info: lower bound, no backward through the backbone",
        f"{med_ms(times, 'classifier_only'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms",
    )
    if fused:
        emit(
            "piggyback_step[fused] / finetune_step[fused]",
            ratio(times, "piggyback[fused]", "finetune[fused]"),
            "target <= 1.10; both optimizers with fused=True",
            f"{med_ms(times, 'piggyback[fused]'):.1f} ms vs "
            f"{med_ms(times, 'finetune[fused]'):.1f} ms",
        )
        emit(
            "piggyback_step[fused Adam] / finetune_step",
            ratio(times, "piggyback[fused]", "finetune"),
            "info: only piggyback's Adam fused, finetune as configured",
            f"{med_ms(times, 'piggyback[fused]'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms",
        )
    emit(
        "piggyback_lean_step / finetune_step",
        ratio(times, "piggyback_lean", "finetune"),
        "info: method=piggyback_lean + model.recompute_masked_weights=true (memory, not speed)",
        f"{med_ms(times, 'piggyback_lean'):.1f} ms vs {med_ms(times, 'finetune'):.1f} ms",
    )
    # Where the difference goes: forward / backward / optimizer, medians of a few steps.
    split: dict[str, np.ndarray] = {}
    for key in ("piggyback", "finetune"):
        split[key] = np.median(
            [trainees[key].phases(x, y) for _ in range(max(3, args.rounds // 3))], axis=0
        )
    for i, phase in enumerate(("forward", "backward", "optimizer")):
        pb, ft = 1e3 * split["piggyback"][i], 1e3 * split["finetune"][i]
        emit(
            f"piggyback_{phase} / finetune_{phase}",
            pb / ft,
            "info: where the step time goes",
            f"{pb:.1f} ms vs {ft:.1f} ms",
        )
    # The floor: what Piggyback adds to a fine-tuning step if it cost exactly its arithmetic,
    # i.e. the W * M pass, the dL/dW_eff * W pass and Adam's extra optimizer work.
    passes = statistics.median(mask_passes(trainees["piggyback"], max(3, args.rounds // 3)))
    optimizer_extra = split["piggyback"][2] - split["finetune"][2]
    finetune_s = statistics.median(times["finetune"])
    emit(
        "piggyback_step_floor",
        (finetune_s + passes + optimizer_extra) / finetune_s,
        "info: finetune_step + the mask's elementwise passes + Adam's extra, over finetune_step",
        f"mask passes {1e3 * passes:.1f} ms, optimizer extra {1e3 * optimizer_extra:.1f} ms, "
        f"finetune step {1e3 * finetune_s:.1f} ms",
    )
    images_per_s = args.batch / statistics.median(times["piggyback"])
    emit(
        "piggyback_train_images_per_s / finetune_train_images_per_s",
        ratio(times, "finetune", "piggyback"),
        "info",
        f"{images_per_s:.1f} img/s vs "
        f"{args.batch / statistics.median(times['finetune']):.1f} img/s",
    )
    if args.device.type == "cuda":
        bench_peak_fraction(args, trainees["piggyback"], x, y, images_per_s)


def bench_peak_fraction(
    args: argparse.Namespace, trainee: Trainee, x: torch.Tensor, y: torch.Tensor, img_s: float
) -> None:
    """CUDA only: model FLOPs x images/s over the GPU's dense bf16 peak."""
    counter = FlopCounterMode(display=False)
    with counter:
        trainee.forward(x, y).backward()
    trainee.optimizer.zero_grad(set_to_none=True)
    flops_per_image = counter.get_total_flops() / args.batch
    name = torch.cuda.get_device_name(args.device)
    peak = 1e12 * args.peak_tflops if args.peak_tflops else None
    peak = peak or next((v for k, v in BF16_PEAK.items() if k in name), None)
    achieved = flops_per_image * img_s
    if peak is None:
        note(f"{name}: unknown bf16 peak, pass --peak-tflops; achieved {achieved / 1e12:.1f} TF/s")
        return
    emit(
        "piggyback_train_flops / bf16_peak",
        achieved / peak,
        "info: model FLOP utilisation",
        f"{img_s:.0f} img/s x {flops_per_image / 1e9:.1f} GFLOP/img = "
        f"{achieved / 1e12:.0f} TFLOP/s vs {peak / 1e12:.0f} TFLOP/s ({name})",
    )
