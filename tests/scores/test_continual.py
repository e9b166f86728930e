"""Continual-learning measures: the formulas on hand-made matrices, and the `cl` block of a
real task sequence (BWT exactly 0 for Piggyback and PackNet, forgetting for sequential
fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piggyback.scores.continual import (
    average_accuracy,
    backward_transfer,
    cl_summary,
    forgetting,
    format_cl_table,
)
from piggyback.train import train

NO_FORGETTING = [[0.9, None, None], [0.9, 0.8, None], [0.9, 0.8, 0.7]]
FORGETTING = [[0.9, None, None], [0.6, 0.8, None], [0.3, 0.7, 0.95]]


def test_formulas_on_hand_made_matrices():
    assert average_accuracy(NO_FORGETTING) == pytest.approx(0.8)
    assert backward_transfer(NO_FORGETTING) == 0.0
    assert forgetting(NO_FORGETTING) == 0.0
    assert average_accuracy(FORGETTING) == pytest.approx((0.3 + 0.7 + 0.95) / 3)
    # BWT: ((0.3 - 0.9) + (0.7 - 0.8)) / 2; forgetting: ((0.9 - 0.3) + (0.8 - 0.7)) / 2
    assert backward_transfer(FORGETTING) == pytest.approx(-0.35)
    assert forgetting(FORGETTING) == pytest.approx(0.35)
    # forgetting counts from the best earlier accuracy, BWT from the just-learned one
    rising = [[0.5, None, None], [0.8, 0.6, None], [0.7, 0.6, 0.9]]
    assert backward_transfer(rising) == pytest.approx(0.1)
    assert forgetting(rising) == pytest.approx(0.05)


def test_one_task_has_no_backward_transfer_and_bad_matrices_are_refused():
    assert backward_transfer([[0.7]]) is None and forgetting([[0.7]]) is None
    assert average_accuracy([[0.7]]) == 0.7
    with pytest.raises(ValueError, match="row 1 lacks"):
        average_accuracy([[0.9, None], [None, 0.8]])
    with pytest.raises(ValueError, match="entries"):
        average_accuracy([[0.9], [0.9, 0.8]])


def test_summary_and_table():
    summary = cl_summary(["a", "b", "c"], FORGETTING, task_bytes=[1, 2, 3])
    assert summary["task_bytes"] == {"a": 1, "b": 2, "c": 3}
    assert summary["train_seconds"] == {"a": None, "b": None, "c": None}
    table = format_cl_table(summary)
    assert "BWT -35.00" in table and "forgetting +35.00" in table and "95.00" in table


SEQUENCE = (
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=10",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=4",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "callbacks=none",
)


@pytest.mark.parametrize("method", ["piggyback_bn", "packnet"])
def test_sequence_reports_zero_backward_transfer(make_cfg, method, capsys):
    cfg = make_cfg(
        *SEQUENCE, f"method={method}", "method.lr_scale=10", "++method.scale_mask_lr=true"
    )
    train(cfg)
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "metrics.json").read_text())
    cl = summary["cl"]
    for record in summary["tasks"].values():  # the tasks really trained: BWT=0 is not vacuous
        assert record.get("masked_off", record.get("packnet/owned", 0)) > 0
    assert cl["tasks"] == ["digits_rotated", "digits_inverted", "digits_mod3"]
    matrix = cl["accuracy_matrix"]
    for j in range(3):  # each task's accuracy never moves once it is learned
        assert [row[j] for row in matrix[j:]] == [matrix[j][j]] * (3 - j)
    assert cl["bwt"] == 0.0 and cl["forgetting"] == 0.0
    assert all(v > 0 for v in cl["task_bytes"].values())
    assert all(v > 0 for v in cl["train_seconds"].values())
    assert "BWT +0.00" in capsys.readouterr().out
    logged = (out / "csv" / "cl" / "metrics.csv").read_text()
    assert "cl/average_accuracy" in logged and "cl/bwt" in logged


def test_sequential_finetuning_forgets(make_cfg):
    """Rotated, then inverted digits on one fine-tuned network (BN trained): the rotated
    task's accuracy drops once the network moves on — what catastrophic forgetting is."""
    cfg = make_cfg(*SEQUENCE, "method=finetune_sequential", "method.lr_scale=10")
    train(cfg)
    cl = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["cl"]
    assert cl["forgetting"] > 0.05 and cl["bwt"] < -0.05
