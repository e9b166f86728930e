"""Train-loader throughput of FineGrainedDataModule on a synthetic ImageFolder.

Writes ``--num-images`` JPEGs of about 500x375 (the size of CUBS / Cars photos) to a
temporary folder, then times full passes over the train loader (decode + resize 256 ->
random-resized crop 224 + flip + normalise + collate + pin) for each worker count. The
first pass includes worker start-up; the best later pass is the steady state.

    python benchmarks/loader_throughput.py [--num-images 512] [--workers 0 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from piggyback.data import FineGrainedDataModule


def write_dataset(root: Path, num_images: int, num_classes: int, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth gradients + mild noise), so decode cost is realistic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(num_images):
        c = i % num_classes
        w, h = int(rng.integers(440, 520)), int(rng.integers(330, 400))
        a, b, d = rng.uniform(0.2, 1.0, size=3)
        base = np.stack([xx * a / 2, yy * b / 1.5, (xx + yy) * d / 3.5], axis=-1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out = root / "train" / f"class_{c:03d}" / f"img_{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((w, h)).save(out, quality=90)
    for c in range(num_classes):  # one test image per class so the layout is complete
        out = root / "test" / f"class_{c:03d}" / "img.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (500, 375), (c, 2 * c, 3 * c)).save(out)


def measure(root: Path, num_classes: int, workers: int, epochs: int, batch_size: int) -> str:
    dm = FineGrainedDataModule(
        "bench",
        num_classes,
        root.parent,
        root.name,
        val_fraction=0.0,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=True,
        persistent_workers=True,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for x, _ in loader:
            n += x.shape[0]
        rates.append(n / (time.perf_counter() - start))
    pinned = "" if torch.cuda.is_available() else " (no-op: no GPU)"
    steady = max(rates[1:]) if len(rates) > 1 else rates[0]
    return (
        f"num_workers={workers} pin_memory=True{pinned} persistent_workers=True "
        f"batch_size={batch_size}: first epoch {rates[0]:.1f} img/s, steady {steady:.1f} img/s "
        f"({n} images/epoch)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="intra-op threads of the main process (workers always use 1); default: torch's",
    )
    args = p.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(f"torch intra-op threads in the main process: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        t0 = time.perf_counter()
        write_dataset(root, args.num_images, args.num_classes)
        print(f"wrote {args.num_images} JPEGs in {time.perf_counter() - t0:.1f}s")
        for w in args.workers:
            print(measure(root, args.num_classes, w, args.epochs, args.batch_size), flush=True)


if __name__ == "__main__":
    main()
