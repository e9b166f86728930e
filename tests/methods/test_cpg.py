"""CPG on the demo backbone: picking, ownership, compaction to a goal, storage, no forgetting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from piggyback.config.validate import ConfigError
from piggyback.data.digits import DigitsDataModule
from piggyback.formats import load_artifact
from piggyback.methods import CPG, build_method
from piggyback.methods.ownership import FREE, owner_bits
from piggyback.models.testing import demo_module, logits_on_test_split, quick_trainer
from piggyback.nn import masked_weights, quantize
from piggyback.train import run, train

REPO = Path(__file__).resolve().parents[2]
SPEC = {
    "_target_": "piggyback.methods.CPG",
    "name": "cpg",
    "prune_step": 0.3,
    "compact_epochs": 3,
    # fast enough on 5 batches that the pick mask flips and the free weights move
    "lr": {"backbone": 1e-2, "masks": 5e-3, "head": 1e-2},
}


def _fit(module, data, root, accuracies):
    """Fit 4 epochs; each validation's accuracy is the next scripted value (the last one
    repeats), so the compaction rule is tested on known numbers."""
    values = list(accuracies)
    module.method.validation_accuracy = lambda _: values.pop(0) if len(values) > 1 else values[0]
    quick_trainer(root, 4, limit_train_batches=5, limit_val_batches=1).fit(module, data)
    del module.method.validation_accuracy


def test_options_are_checked():
    with pytest.raises(ValueError, match="fraction of each block's hidden width"):
        CPG(grow=True)
    with pytest.raises(ValueError, match="0.83, not 83"):
        CPG(reference=83)
    with pytest.raises(ValueError, match="prune_step"):
        CPG(prune_step=0)
    method = build_method({**SPEC, "reference": {"a": 0.5}, "goal": 0.9})
    assert isinstance(method, CPG) and method.reference == {"a": 0.5}
    with pytest.raises(ValueError, match=r"no accuracy for tasks \['b'\]"):
        method.check_tasks(["a", "b"])


def test_growing_a_backbone_without_growable_blocks_exits_2_before_training(make_cfg, capsys):
    cfg = make_cfg("method=cpg", "method.grow=0.25")
    with pytest.raises(SystemExit) as info:
        run(cfg)  # the Hydra job body of train.py
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "SmallCNN has no block whose hidden width can grow" in line, line
    assert not Path(cfg.paths.output_dir, "checkpoints").exists()


def test_a_reference_without_the_task_is_a_config_error(make_cfg):
    cfg = make_cfg("method=cpg", "data=digits/rotated", "+method.reference={other: 0.9}")
    with pytest.raises(ConfigError, match=r"no accuracy for tasks \['digits_rotated'\]"):
        train(cfg)


@pytest.fixture(scope="module")
def cpg_pair(tmp_path_factory, demo_cache):
    """Task A compacts one round (0.3) then misses its goal; task B misses it before pruning."""
    tmp = tmp_path_factory.mktemp("cpg")
    torch.manual_seed(0)
    data_a, data_b = DigitsDataModule("rotated", batch_size=64), DigitsDataModule("mod3")
    module = demo_module(demo_cache, SPEC)
    # goal 1.0 x the unpruned 0.80: 0.3 meets it, 0.6 does not -> A keeps 0.3
    _fit(module, data_a, tmp, [0.80, 0.81, 0.79, 0.95])
    logits_a = logits_on_test_split(module, data_a)
    weights_a = {n: m.weight.detach().clone() for n, m in masked_weights(module.backbone)}
    owners_a = {n: o.clone() for n, o in module.method.owners.items()}
    artifact_a = module.export_task()
    module.add_task("digits_mod3", 3)
    mask_b_start = {n: m.mask_real.detach().clone() for n, m in masked_weights(module.backbone)}
    module.method.reference = 0.7  # an absolute goal for B, which it misses before pruning
    _fit(module, data_b, tmp, [0.5, 0.9])
    return module, data_a, data_b, logits_a, weights_a, owners_a, artifact_a, mask_b_start


def test_the_pruned_fraction_follows_the_goal_rule(cpg_pair):
    module, _, _, _, _, owners_a, artifact_a, _ = cpg_pair
    method: CPG = module.method
    result = method.results["digits_rotated"]
    assert result["goal_accuracy"] == pytest.approx(0.80)
    # evaluated states: unpruned 0.80, 0.3 -> 0.81 (kept), 0.6 -> 0.79 (below: restored)
    assert [s for s, _ in result["history"]] == pytest.approx([0.0, 0.3, 0.6])
    assert result["pruned"] == pytest.approx(0.3, abs=0.01)
    assert artifact_a.extra_meta["compaction"]["pruned"] == result["pruned"]
    owned = {k: sum(int((o == k).sum()) for o in owners_a.values()) for k in (0, 1, FREE)}
    total = sum(owned.values())
    # task 1 owns every pretrained weight (first_task_trains_pretrained) and keeps 70 %
    assert owned[0] == 0
    assert owned[1] / total == pytest.approx(0.7, abs=0.01)
    assert owned[FREE] / total == pytest.approx(0.3, abs=0.01)
    # task B: 0.5 before pruning misses the absolute goal 0.7: nothing pruned, all kept
    result_b = method.results["digits_mod3"]
    assert result_b["goal_accuracy"] == pytest.approx(0.7)
    assert result_b["history"] == [[0.0, pytest.approx(0.5)]]
    assert result_b["pruned"] == 0.0
    for name, o in method.owners.items():
        assert torch.equal(o == 2, owners_a[name] == FREE)


def test_earlier_weights_never_move_and_pruned_ones_are_zero(cpg_pair):
    module, _, _, _, weights_a, owners_a, _, _ = cpg_pair
    method: CPG = module.method
    for name, mask in masked_weights(module.backbone):
        earlier = owners_a[name] <= 1
        assert torch.equal(mask.weight.detach()[earlier], weights_a[name][earlier]), name
        assert torch.equal(method.owners[name][earlier], owners_a[name][earlier])
        assert (weights_a[name][owners_a[name] == FREE] == 0).all()
        # task 2 took only what task 1 left free
        assert ((method.owners[name] == 2) <= (owners_a[name] == FREE)).all()


def test_the_pick_mask_only_touches_earlier_weights(cpg_pair):
    module, *_, mask_b_start = cpg_pair
    module.set_task("digits_mod3")
    method: CPG = module.method
    flipped = 0
    for name, mask in masked_weights(module.backbone):
        owners = method.owners[name]
        earlier = owners < 2
        current = quantize(mask.mask_real.detach(), mask.threshold, "binarizer")
        assert torch.equal(current[~earlier].bool(), owners[~earlier] == 2), name
        start = quantize(mask_b_start[name], mask.threshold, "binarizer")
        flipped += int((current[earlier] != start[earlier]).sum())
    assert flipped > 0  # the pick mask did learn over the earlier weights


def test_earlier_task_logits_are_bit_identical(cpg_pair):
    module, data_a, data_b, logits_a, *_ = cpg_pair
    logits_b = logits_on_test_split(module, data_b)
    module.set_task("digits_rotated")
    assert torch.equal(logits_on_test_split(module, data_a), logits_a)
    module.set_task("digits_mod3")
    assert torch.equal(logits_on_test_split(module, data_b), logits_b)


def test_storage_counts_are_exact(cpg_pair):
    module, _, _, _, _, owners_a, artifact_a, _ = cpg_pair
    artifact_b = module.export_task("digits_mod3")
    owners_b = module.method.owners
    for artifact, owners, index in ((artifact_a, owners_a, 1), (artifact_b, owners_b, 2)):
        assert artifact.extra_meta["owner_bits"] == owner_bits(index)
        for name, o in owners.items():
            earlier = int((o < index).sum())
            assert artifact.extra[f"pick/{name}"].numel() == math.ceil(earlier / 8), name
            assert artifact.extra[f"owner/{name}"].numel() == math.ceil(
                o.numel() * owner_bits(index) / 8
            )
            assert artifact.extra[f"values/{name}"].numel() == int((o == index).sum())
        assert set(artifact.extra) == {
            f"{kind}/{name}" for kind in ("pick", "owner", "values") for name in owners
        }


def test_artifacts_rebuild_the_sequence_in_a_multitask_model(cpg_pair, sequence_model):
    module, data_a, data_b, logits_a, _, _, artifact_a, _ = cpg_pair
    model, artifact_b = sequence_model(module, artifact_a)
    data_a.setup("test")
    x = next(iter(data_a.test_dataloader()))[0]
    data_b.setup("test")
    xb = next(iter(data_b.test_dataloader()))[0]
    with torch.no_grad():
        assert torch.allclose(model(x, task="digits_rotated"), logits_a[: len(x)], atol=1e-5)
        module.set_task("digits_mod3")
        module.eval()
        assert torch.allclose(model(xb, task="digits_mod3"), module(xb), atol=1e-5)


def test_cpg_runs_the_demo_sequence_from_the_cli(demo_sequence_cli, tmp_path):
    """``python train.py method=cpg``: the demo's three tasks, compacted, with the cl block."""
    demo_sequence_cli("cpg", epochs=3)
    names = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert names == [f"digits_{t}.safetensors" for t in ("inverted", "mod3", "rotated")]


def test_resume_in_the_middle_of_compaction_equals_the_uninterrupted_run(
    tmp_path, train_keeping_epochs
):
    """Resumed after the first pruning round: the same rounds, owners and weights follow."""

    args = ("data=digits/rotated", "method=cpg", "method.prune_step=0.3", "trainer.max_epochs=3")
    args += ("+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1")
    args += ("+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false")
    args += ("logger=none", "callbacks=none", "method.lr_scale=10")

    def run(out: str, *extra: str) -> Path:
        return train_keeping_epochs(out, *args, *extra) / "e2.ckpt"

    ab = ("full", "resumed")
    full = run("full")
    middle = tmp_path / "full" / "epochs" / "digits_rotated" / "e1.ckpt"  # after round 1
    resumed = run("resumed", f"resume={middle}")
    a, b = (torch.load(p, weights_only=False) for p in (full, resumed))
    state_m = torch.load(middle, weights_only=False)["piggyback"]["method_state"]
    assert state_m["compaction"]["rounds"] == 1  # the checkpoint is mid-compaction
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["piggyback"]["method_state"], b["piggyback"]["method_state"]
    assert all(torch.equal(sa["owners"][n], sb["owners"][n]) for n in sa["owners"])
    # the final judgement (after the last epoch) and the stored task agree too
    arts = [load_artifact(tmp_path / o / "artifacts" / "digits_rotated.safetensors") for o in ab]
    assert arts[0].extra_meta["compaction"] == arts[1].extra_meta["compaction"]
    assert [s for s, _ in arts[0].extra_meta["compaction"]["history"]][:2] == [0.0, 0.3]
    assert all(torch.equal(arts[0].extra[k], arts[1].extra[k]) for k in arts[0].extra)
