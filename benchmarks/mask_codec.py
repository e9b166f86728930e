"""Benchmark the mask codec on a ResNet-50-shaped mask set (all 53 convs).

Prints bits per weight (raw 1-bit packing vs the ``rice`` codec, headers and checksums
included, vs stdlib ``lzma`` over the packed bits, which is what the codec has to beat to be
worth its code) and single-core encode / decode time for the whole set, for i.i.d. zeros at
2 / 5 / 10 % and a "realistic" set whose per-layer zero fraction grows from 1 % (stem) to 30 %
(last block), with zeros clustered by output filter inside each layer as trained Piggyback
masks are. ``--artifact`` adds the masks of real task artifacts.

    python benchmarks/mask_codec.py [--repeats 3] [--seed 0] [--artifact PATH.safetensors]
"""

from __future__ import annotations

import argparse
import lzma
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from piggyback.masks.codec import compress_mask, decompress_mask


def resnet50_conv_shapes() -> list[tuple[str, tuple[int, ...]]]:
    model = torchvision.models.resnet50(weights=None)
    return [
        (name, tuple(m.weight.shape))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]


def iid_masks(shapes, p_zero: float, rng: np.random.Generator) -> list[torch.Tensor]:
    return [torch.from_numpy(rng.random(shape) >= p_zero) for _, shape in shapes]


def realistic_masks(shapes, rng: np.random.Generator) -> list[torch.Tensor]:
    """Layer rate 1 % -> 30 % with depth; per-filter rates drawn around it (Beta, mean fixed)."""
    rates = np.linspace(0.01, 0.30, len(shapes))
    out = []
    for (_, shape), rate in zip(shapes, rates, strict=True):
        concentration = 4.0
        per_filter = rng.beta(rate * concentration, (1 - rate) * concentration, size=shape[0])
        p = per_filter.reshape((-1,) + (1,) * (len(shape) - 1))
        out.append(torch.from_numpy(rng.random(shape) >= p))
    return out


def entropy_bits(masks: list[torch.Tensor]) -> float:
    """Order-0 entropy per layer, weighted: what an ideal i.i.d. coder per layer would reach."""
    total = bits = 0.0
    for m in masks:
        p = 1.0 - m.float().mean().item()
        h = 0.0 if p in (0.0, 1.0) else -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        bits += h * m.numel()
        total += m.numel()
    return bits / total


def bench(label: str, masks: list[torch.Tensor], repeats: int) -> None:
    numel = sum(m.numel() for m in masks)
    zeros = sum(int((~m).sum()) for m in masks)
    raw_bytes = sum(-(-m.numel() // 8) for m in masks)
    enc_times, dec_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        streams = [compress_mask(m) for m in masks]
        t1 = time.perf_counter()
        decoded = [decompress_mask(s, m.shape) for s, m in zip(streams, masks, strict=True)]
        t2 = time.perf_counter()
        enc_times.append(t1 - t0)
        dec_times.append(t2 - t1)
    assert all(torch.equal(d, m) for d, m in zip(decoded, masks, strict=True)), "not lossless"
    coded = sum(len(s) for s in streams)
    t0 = time.perf_counter()
    xz = [lzma.compress(np.packbits(m.numpy().reshape(-1)).tobytes(), preset=9) for m in masks]
    t1 = time.perf_counter()
    xz_bytes = sum(len(x) for x in xz)
    print(
        f"{label:<26} zeros {100 * zeros / numel:5.2f}%  raw {8 * raw_bytes / numel:.4f} b/w "
        f"({raw_bytes / 1e6:.2f} MB)  rice {8 * coded / numel:.4f} b/w ({coded / 1e6:.3f} MB)  "
        f"lzma {8 * xz_bytes / numel:.4f} b/w  lzma/rice {xz_bytes / coded:.3f}  "
        f"entropy {entropy_bits(masks):.4f}  encode {min(enc_times):.3f}s "
        f"(lzma {t1 - t0:.3f}s)  decode {min(dec_times):.3f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", action="append", default=[], help="a task artifact")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = resnet50_conv_shapes()
    numel = sum(int(np.prod(s)) for _, s in shapes)
    print(f"ResNet-50 convs: {len(shapes)} layers, {numel:,} weights, torch threads = 1")
    rng = np.random.default_rng(args.seed)
    for p in (0.02, 0.05, 0.10):
        bench(f"iid {100 * p:.0f}% zeros", iid_masks(shapes, p, rng), args.repeats)
    bench("realistic 1%->30% by depth", realistic_masks(shapes, rng), args.repeats)
    for path in args.artifact:
        from piggyback.formats import load_artifact

        artifact = load_artifact(path)
        masks = [m.bool() for m in artifact.unpacked_masks().values()]
        run = Path(path).resolve().parents[1].name  # <run>/artifacts/<task>.safetensors
        bench(f"{run}/{artifact.task}"[:26], masks, args.repeats)


if __name__ == "__main__":
    main()
