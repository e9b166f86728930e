"""Interleaved timing: every variant measured in alternation, ratios as medians of rounds.

On a shared machine the load drifts; timing variants A, B, C, A, B, C, ... and taking the
median of per-round ratios lets the drift hit every variant alike. Every section times
through here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every ``fns`` entry, measured in alternation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median of per-round ratios: robust to slow drifts of machine load."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def med_ms(times: dict[str, list[float]], key: str) -> float:
    """Median milliseconds of one variant."""
    return 1e3 * statistics.median(times[key])
