"""Fixtures shared by the method tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import open_dict

from piggyback.backbones import build_backbone
from piggyback.formats import ArtifactError, TaskArtifact
from piggyback.methods import apply_artifact
from piggyback.models.multitask import MultiTaskModel
from piggyback.train import train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_sequence_cli(tmp_path) -> Callable[..., dict[str, Any]]:
    """``run(method, epochs=1)``: ``python train.py method=<method>`` on the demo's three
    tasks (3 batches an epoch) into ``tmp_path``; checks the exit code, the three tasks and
    BWT exactly 0, and returns ``metrics.json``."""

    def run(method: str, epochs: int = 1) -> dict[str, Any]:
        args = [f"method={method}", f"trainer.max_epochs={epochs}"]
        args += ["+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1"]
        args += ["+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]
        args += ["logger=none", "callbacks=none", f"hydra.run.dir={tmp_path}"]
        result = subprocess.run(
            [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads((tmp_path / "metrics.json").read_text())
        assert summary["method"] == method and len(summary["tasks"]) == 3
        assert summary["cl"]["bwt"] == 0.0
        return summary

    return run


@pytest.fixture
def sequence_model(demo_cache) -> Callable[..., tuple[MultiTaskModel, TaskArtifact]]:
    """``build(module, artifact_a)``: a two-task sequence method's second task
    (``digits_mod3``) exported; refused on an untouched backbone and before the task it
    builds on; then both loaded, in order, into a multi-task model on the demo backbone.
    Returns the model and the second artifact."""

    def build(module, artifact_a: TaskArtifact) -> tuple[MultiTaskModel, TaskArtifact]:
        artifact_b = module.export_task("digits_mod3")
        assert artifact_b.extra_meta["previous_tasks"] == ["digits_rotated"]
        demo = build_backbone("small_cnn", weights="demo", cache_dir=str(demo_cache)).model
        with pytest.raises(ArtifactError, match="untouched backbone"):
            apply_artifact(demo, artifact_b)
        model = MultiTaskModel(demo, "small_cnn")
        with pytest.raises(ArtifactError, match=r"builds on tasks \['digits_rotated'\]"):
            model.add_task(artifact_b)
        model.add_task(artifact_a)
        model.add_task(artifact_b)
        return model, artifact_b

    return build


@pytest.fixture
def assert_bit_exact() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``check(module, models, data_a, data_b, logits_a)``: every model gives the first task
    its logits from before the second task, and the second task the training module's, to
    the bit, on the first test batch of each; returns those batches."""

    def check(module, models, data_a, data_b, logits_a) -> tuple[torch.Tensor, torch.Tensor]:
        data_a.setup("test")
        data_b.setup("test")
        x = next(iter(data_a.test_dataloader()))[0]
        xb = next(iter(data_b.test_dataloader()))[0]
        module.set_task("digits_mod3")
        module.eval()
        with torch.no_grad():
            expected_b = module(xb)
            for m in models:
                assert torch.equal(m(x, task="digits_rotated"), logits_a[: len(x)])
                assert torch.equal(m(xb, task="digits_mod3"), expected_b)
        return x, xb

    return check


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
