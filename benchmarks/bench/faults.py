"""Section ``faults``: what issue 18's guards cost, the finite-loss check and atomic saves.

Both run on every training run, so their price is measured against the step and the
checkpoint writer they wrap.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

from lightning.pytorch.plugins.io import TorchCheckpointIO

from bench.report import emit, mib
from bench.timing import interleaved, med_ms, ratio
from bench.trainee import Trainee, batch
from piggyback.training.finite_loss import FiniteLossCheck
from piggyback.utils.checkpoint_io import AtomicCheckpointIO


def bench_faults(args: argparse.Namespace) -> None:
    """Issue 18's costs: the per-step finiteness check, and the atomic checkpoint writer
    (temp file in the checkpoint's folder + fsync + rename) against Lightning's own."""
    x, y = batch(args)
    trainee = Trainee("piggyback", args)
    stub = SimpleNamespace(current_epoch=0, optimizers=[trainee.optimizer])
    check = FiniteLossCheck("bench")

    def checked() -> None:
        check.on_train_batch_end(stub, None, {"loss": trainee.step(x, y)}, None, 0)

    times = interleaved(
        {"plain": lambda: trainee.step(x, y), "checked": checked},
        args.rounds,
        args.warmup,
        args.device,
    )
    emit(
        "step_with_finite_loss_check / step",
        ratio(times, "checked", "plain"),
        "target: within noise (~1.00)",
        f"{med_ms(times, 'checked'):.1f} ms vs {med_ms(times, 'plain'):.1f} ms; piggyback, "
        f"{args.arch}, batch {args.batch} at {args.size} px",
    )
    step_ms = med_ms(times, "plain")
    checkpoint = {
        "state_dict": trainee.module.state_dict(),
        "optimizer_states": [trainee.optimizer.state_dict()],
        "epoch": 0,
    }
    with tempfile.TemporaryDirectory(dir=args.ckpt_dir) as d:
        folder = Path(d)
        writers = {"lightning": TorchCheckpointIO(), "atomic": AtomicCheckpointIO(folder)}
        saves = {
            k: (lambda w=w, k=k: w.save_checkpoint(checkpoint, folder / f"{k}.ckpt"))
            for k, w in writers.items()
        }
        times = interleaved(saves, max(3, args.rounds // 3), 1, args.device)
        size = (folder / "atomic.ckpt").stat().st_size
    emit(
        "atomic_checkpoint_save / lightning_checkpoint_save",
        ratio(times, "atomic", "lightning"),
        "info: once per epoch; fsync makes it durable",
        f"{med_ms(times, 'atomic'):.1f} ms vs {med_ms(times, 'lightning'):.1f} ms for "
        f"{mib(size)} in {folder.parent}; the difference is "
        f"{(med_ms(times, 'atomic') - med_ms(times, 'lightning')) / step_ms:.2f} training "
        "steps per epoch",
    )
