"""Where a training run's files go, inside its output folder and nowhere else.

One place for the layout docs/reliability.md documents: ``artifacts/<task>.safetensors`` (what
``evaluate.py`` reads), ``checkpoints/<task>/`` (Lightning checkpoints and the interrupt
checkpoint that ``resume=`` continues from) and ``metrics.json`` (the run's summary, written
atomically so a reader never sees half of it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piggyback.utils.atomic import atomic_write_text

__all__ = ["RunFolder"]


@dataclass(frozen=True)
class RunFolder:
    """The output folder of one run (``paths.output_dir``)."""

    root: Path

    @classmethod
    def create(cls, output_dir: str | os.PathLike) -> RunFolder:
        root = Path(output_dir)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def artifact(self, task: str) -> Path:
        return self.root / "artifacts" / f"{task}.safetensors"

    def checkpoints(self, task: str) -> Path:
        return self.root / "checkpoints" / task

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    def write_metrics(self, summary: dict[str, Any]) -> Path:
        """Replace ``metrics.json`` with ``summary`` (atomically)."""
        return atomic_write_text(self.metrics_file, json.dumps(summary, indent=2), overwrite=True)
