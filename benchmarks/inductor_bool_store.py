"""Standalone repro of the one kernel that keeps compiled Piggyback above compiled
fine-tuning on CPU (benchmarks/README.md, "torch.compile"): Inductor's CPU code storing a
bool tensor, here ReLU's mask ``y <= 0`` as AOTAutograd saves it for a ResNet stem.

    python benchmarks/inductor_bool_store.py [--threads 1]

Prints the compiled time of ``relu(x * a + b)`` alone, with its bool mask as a second
output, and with the mask as uint8, at the stem's shape (batch 16 at 96 px: 16x64x48x48).
No piggyback import: this is for an upstream report.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_ms(fn, x: torch.Tensor, rounds: int) -> float:
    for _ in range(3):  # compile and warm up
        fn(x)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn(x)
        times.append(time.perf_counter() - start)
        del out
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(16, 64, 48, 48)
    scale, shift = torch.randn(64, 1, 1), torch.randn(64, 1, 1)

    def relu(x):
        return torch.relu(x * scale + shift)

    def with_bool(x):
        y = relu(x)
        return y, y <= 0

    def with_uint8(x):
        y = relu(x)
        return y, (y <= 0).to(torch.uint8)

    alone = median_ms(torch.compile(relu), x, args.rounds)
    print(
        f"# torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} thread(s), x {tuple(x.shape)}"
    )
    print(f"relu = {alone:.2f} ms")
    for name, fn in (("relu_and_bool_mask", with_bool), ("relu_and_uint8_mask", with_uint8)):
        ms = median_ms(torch.compile(fn), x, args.rounds)
        print(f"{name} = {ms:.2f} ms  ({ms / alone:.1f}x relu alone)")


if __name__ == "__main__":
    main()
