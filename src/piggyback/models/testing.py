"""Quick builders on the offline demo backbone, for tests and notebooks.

What the unit tests of the module and of every method need: a module on the pretrained small
CNN, a quiet CPU Trainer that runs a few batches, and a split's logits in one tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from piggyback.data.base import TaskDataModule
from piggyback.models.module import PiggybackModule

TINY_RUN = (
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=2",
    "logger=none",
    "callbacks=none",
    "print_table=false",
)
"""Hydra overrides for a few-batch, quiet ``train`` run (train/evaluate/report tests)."""


def demo_module(
    cache_dir: str | Path,
    method: str | dict[str, Any] = "piggyback",
    task: str = "digits_rotated",
    num_classes: int = 10,
    **kwargs: Any,
) -> PiggybackModule:
    """A module on the demo's pretrained small CNN (cached in ``cache_dir``)."""
    backbone = {"name": "small_cnn", "weights": "demo", "cache_dir": str(cache_dir)}
    return PiggybackModule(
        backbone=backbone, task=task, num_classes=num_classes, method=method, **kwargs
    )


def quick_trainer(root: str | Path, epochs: int = 1, **overrides: Any) -> L.Trainer:
    """A CPU Trainer over 6 train / 2 val batches with no logger, checkpoints, progress bar
    or sanity check; ``overrides`` replace any of these options."""
    options: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_train_batches": 6,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
        **overrides,
    }
    return L.Trainer(**options)


@torch.no_grad()
def logits_on_test_split(module: PiggybackModule, datamodule: TaskDataModule) -> torch.Tensor:
    """The module's logits over the test split, in order (the module is left in eval mode)."""
    module.eval()
    datamodule.setup("test")
    return torch.cat([module(x) for x, _ in datamodule.test_dataloader()])


def markdown_rows(text: str) -> dict[str, list[str]]:
    """A printed markdown table as ``{first cell: the other cells}`` (header row included)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in cells}


def paper_table_header(domains: list[str], near: str = "cifar10_small") -> list[str]:
    """The header cells after "method" of ``compare_table.py --paper`` for these domains."""
    n = len(domains)
    return ["lr ×", *domains, f"mean ({n})", near, "S", "bytes / task", f"bytes ({n})"] + [
        "train s / task",
        "BWT",
    ]
