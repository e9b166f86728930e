"""Section ``loader``: whether the fine-grained train loader keeps the model busy.

The loader is timed alone on synthetic photo-sized JPEGs (written by
``loader_throughput.write_dataset``, the standalone loader benchmark), the model's training
step alone at 224 px; the line is the ratio of their images per second.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from loader_throughput import write_dataset

from bench.report import emit
from bench.timing import interleaved
from bench.trainee import Trainee, batch
from piggyback.data import FineGrainedDataModule


def bench_loader(args: argparse.Namespace) -> None:
    """The ``loader`` section's line (see benchmarks/README.md, "Loader vs model")."""
    classes = 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        write_dataset(root, args.loader_images, classes)
        dm = FineGrainedDataModule(
            "bench",
            classes,
            root.parent,
            root.name,
            val_fraction=0.0,
            batch_size=args.loader_batch,
            num_workers=args.loader_workers,
            pin_memory=args.device.type == "cuda",
            persistent_workers=args.loader_workers > 0,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        rates = []
        for _ in range(2):  # the first pass includes worker start-up
            start, n = time.perf_counter(), 0
            for xb, _ in loader:
                n += xb.shape[0]
            rates.append(n / (time.perf_counter() - start))
        loader_rate = rates[-1]
        del loader, dm
    model_args = copy.copy(args)
    model_args.batch = args.loader_model_batch
    trainee = Trainee("piggyback", model_args)
    x, y = batch(model_args, size=224)
    times = interleaved(
        {"step": lambda: trainee.step(x, y)}, args.loader_model_rounds, 1, args.device
    )
    model_rate = model_args.batch / statistics.median(times["step"])
    emit(
        "loader_images_per_s / model_images_per_s",
        loader_rate / model_rate,
        "target >= 1.0: the loader keeps the model busy",
        f"{loader_rate:.1f} img/s vs {model_rate:.1f} img/s; loader: {args.loader_workers} "
        f"workers, JPEG ~500x375 -> resize 256, random-resized crop 224, flip; model: "
        f"piggyback {args.arch} train step at 224 px, batch {model_args.batch}, {args.precision}",
    )
