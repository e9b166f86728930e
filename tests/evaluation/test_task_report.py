"""Task inference in the reports: numbers that match the strategies, early refusals, and the
blocks that train (metrics.json, cl) and evaluate (results.json, task_inference.md) add."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from piggyback.backbones import build_backbone
from piggyback.evaluate import evaluate
from piggyback.evaluation.task_report import (
    check_task_inference,
    format_task_inference,
    strategy_list,
    task_inference_block,
)
from piggyback.models.multitask import MultiTaskModel
from piggyback.models.testing import TINY_RUN, demo_module
from piggyback.taskinfer import TaskInferenceError, infer_task, strategy_names
from piggyback.train import train


def test_strategy_list_reads_names_lists_and_all():
    assert strategy_list(None) == []
    assert strategy_list("prototype") == ["prototype"]
    assert strategy_list(["entropy", "oneshot"]) == ["entropy", "oneshot"]
    assert strategy_list("all") == strategy_names()
    with pytest.raises(TaskInferenceError, match="task_inference=nearest is not a strategy"):
        strategy_list(["entropy", "nearest"])


def test_oneshot_with_a_weight_changing_method_is_refused_before_training(make_cfg):
    cfg = make_cfg("method=finetune", "task_inference=[entropy,oneshot]")
    with pytest.raises(TaskInferenceError, match="method finetune") as info:
        check_task_inference(cfg)
    assert "prototype" in str(info.value)
    assert check_task_inference(make_cfg("method=packnet", "task_inference=prototype")) == [
        "prototype"
    ]


@pytest.fixture(scope="module")
def small(demo_cache):
    """Two untrained tasks (random masks) and two batches of inputs each."""
    torch.manual_seed(0)
    module = demo_module(demo_cache, task="a", num_classes=10, mask={"mask_init": "uniform"})
    module.add_task("b", 3)
    artifacts = [module.export_task(t) for t in ("a", "b")]
    backbone = build_backbone("small_cnn", weights="demo", cache_dir=demo_cache).model
    model = MultiTaskModel.from_artifacts(artifacts, backbone)
    g = torch.Generator().manual_seed(1)
    data = {
        "a": TensorDataset(torch.rand(12, 1, 32, 32, generator=g), torch.randint(0, 10, (12,))),
        "b": TensorDataset(1 - torch.rand(12, 1, 32, 32, generator=g), torch.randint(0, 3, (12,))),
    }
    batches = {t: [(x, y) for x, y in DataLoader(d, batch_size=6)] for t, d in data.items()}
    return model, batches


def test_block_numbers_are_what_the_strategies_give(small):
    model, batches = small
    block = task_inference_block(model, batches, ["entropy", "max_prob"], torch.device("cpu"))
    for name in ("entropy", "max_prob"):
        result = block["strategies"][name]
        per_batch = result["per_batch"]
        for task, items in batches.items():
            right = sum(infer_task(model, x, name, "batch") == task for x, _ in items)
            expected = 100 * right / len(items)
            assert per_batch["tasks"][task]["task_inference_pct"] == pytest.approx(expected)
            assert per_batch["tasks"][task]["n"] == 12
        for mode in ("per_batch", "per_sample"):
            r = result[mode]
            assert r["task_agnostic_pct"] <= r["task_inference_pct"]
            assert r["forwards_per_input"] == 2 and r["backwards_per_input"] == 0
            assert r["ms_per_batch"] > 0
        assert sum(r["n"] for r in result["per_sample"]["tasks"].values()) == 24
    assert block["mixed_stream"] == {"inputs": 24, "batch_size": 6, "seed": 0}
    table = format_task_inference({"piggyback": block})
    assert "| entropy | per batch |" in table and "| b |" in table


def test_a_sequence_adds_task_inference_to_the_cl_block_and_evaluate_reports_it(make_cfg):
    cfg = make_cfg(*TINY_RUN, "data=demo", "~data.tasks.mod3", "task_inference=[prototype,oneshot]")
    train(cfg)
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    block = summary["cl"]["task_inference"]
    assert set(block["strategies"]) == {"prototype", "oneshot"}
    assert set(block["task_aware_pct"]) == {"digits_rotated", "digits_inverted"}
    oneshot = block["strategies"]["oneshot"]["per_batch"]
    assert oneshot["forwards_per_input"] == 2 and oneshot["backwards_per_input"] == 1
    # the artifacts carry prototypes: evaluate measures the same from the files
    out = Path(cfg.paths.output_dir)
    ecfg = make_cfg(
        f"artifacts={out}",
        "task_inference=prototype",
        "limit_test_batches=2",
        "print_table=false",
        f"hydra.run.dir={out}/eval",
        config_name="eval",
    )
    ecfg.paths.output_dir = str(out / "eval")
    result = evaluate(ecfg)
    evaluated = result["summary"]["piggyback"]["task_inference"]
    assert (
        evaluated["strategies"]["prototype"]["per_batch"]["task_inference_pct"]
        == (block["strategies"]["prototype"]["per_batch"]["task_inference_pct"])
    )
    assert "per sample" in (out / "eval" / "task_inference.md").read_text()
