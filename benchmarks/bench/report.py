"""The one output format of ``run.py``: a figure line, a ``#`` note, a section's time.

Kept apart so that every section prints the same way, and ``gpu_check.sh`` and the README's
tables can rely on ``name = ratio  (target)  [details]``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


def emit(name: str, value: float, target: str, detail: str) -> None:
    """The one output format: ``name = value  (target ...)  [details]``."""
    print(f"{name} = {value:.3f}  ({target})  [{detail}]", flush=True)


def note(text: str) -> None:
    """A comment line, ``# text``: setup, a section's time, why something was skipped."""
    print(f"# {text}", flush=True)


def mib(nbytes: float) -> str:
    """Bytes as ``12.3 MiB``."""
    return f"{nbytes / 2**20:.1f} MiB"


@contextmanager
def section(name: str) -> Iterator[None]:
    """Notes ``# name: 1.2s`` once the section's body is done."""
    start = time.perf_counter()
    yield
    note(f"{name}: {time.perf_counter() - start:.1f}s")
