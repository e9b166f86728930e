"""Fixtures shared by the method tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import open_dict

from piggyback.train import train


@pytest.fixture
def train_keeping_epochs(make_cfg, tmp_path) -> Callable[..., Path]:
    """``run(out, *overrides)``: ``train.py`` with the overrides into ``tmp_path/out``, a
    checkpoint kept after every epoch; returns the folder of the task's ``e<epoch>.ckpt``
    (for the resume tests: resume from one, compare with the uninterrupted run's last)."""

    def run(out: str, *overrides: str, task: str = "digits_rotated") -> Path:
        cfg = make_cfg(*overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / out)
            cfg.callbacks = {
                "each_epoch": {
                    "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "dirpath": str(tmp_path / out / "epochs"),
                    "filename": "e{epoch}",
                    "auto_insert_metric_name": False,
                    "monitor": None,
                    "save_top_k": -1,
                }
            }
        train(cfg)
        return tmp_path / out / "epochs" / task

    return run
