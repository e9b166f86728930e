"""CPG's growth on a network with growable blocks (a random mobilenetv3 on the digits tasks):
exactly the configured units claimed, by the task that needs them, earlier tasks untouched."""

from __future__ import annotations

import pytest
import torch

from piggyback.backbones import build_backbone
from piggyback.data.digits import DigitsDataModule
from piggyback.formats import load_artifact, read_bundle, save_artifact
from piggyback.methods import CPG
from piggyback.methods.ownership import FREE, RESERVED
from piggyback.models.module import PiggybackModule
from piggyback.models.multitask import MultiTaskModel
from piggyback.models.testing import logits_on_test_split, quick_trainer
from piggyback.nn import masked_weights
from piggyback.nn.widen import hidden_widths

BACKBONE = {
    "name": "mobilenetv3_small_050",
    "source": "timm",
    "weights": None,
    "kwargs": {"in_chans": 1},
    "init_seed": 0,
}
SPEC = {
    "_target_": "piggyback.methods.CPG",
    "name": "cpg",
    "prune_step": 0.3,
    "compact_epochs": 3,
    "grow": 0.25,
    "max_grows": 2,
    "lr": {"backbone": 1e-2, "masks": 5e-3, "head": 1e-2},
}


def _fit(module, data, root, accuracies):
    """4 epochs whose validation accuracies are scripted (the last one repeats)."""
    values = list(accuracies)
    module.method.validation_accuracy = lambda _: values.pop(0) if len(values) > 1 else values[0]
    quick_trainer(root, 4, limit_train_batches=3, limit_val_batches=1).fit(module, data)
    del module.method.validation_accuracy


def _counts(owners):
    codes = torch.cat([o.reshape(-1) for o in owners.values()])
    return {int(c): int((codes == c).sum()) for c in codes.unique()}


def test_growth_options_are_checked():
    with pytest.raises(ValueError, match="fraction of each block's hidden width"):
        CPG(grow=True)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        CPG(grow=1.5)
    with pytest.raises(ValueError, match="needs method.bn=train"):
        CPG(grow=0.25, bn="frozen")
    with pytest.raises(ValueError, match="max_grows must be >= 1"):
        CPG(grow=0.25, max_grows=0)


def test_a_backbone_without_growable_blocks_is_refused_by_name(demo_cache):
    backbone = {"name": "small_cnn", "weights": "demo", "cache_dir": str(demo_cache)}
    with pytest.raises(ValueError, match="SmallCNN has no block whose hidden width can grow"):
        PiggybackModule(backbone=backbone, task="a", num_classes=3, method=SPEC)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A compacts to 0.3; B misses its absolute goal before pruning, grows once, then meets
    it and compacts; C finds nothing free only if A and B kept everything (they do not)."""
    tmp = tmp_path_factory.mktemp("grow")
    torch.manual_seed(0)
    data_a, data_b = DigitsDataModule("rotated", batch_size=32), DigitsDataModule("mod3")
    module = PiggybackModule(backbone=BACKBONE, task="digits_rotated", num_classes=10, method=SPEC)
    reserve = _counts(module.method.owners)[RESERVED]
    _fit(module, data_a, tmp, [0.80, 0.81, 0.79])
    logits_a = logits_on_test_split(module, data_a)
    owners_a = {n: o.clone() for n, o in module.method.owners.items()}
    artifact_a = module.export_task()
    module.add_task("digits_mod3", 3)
    module.method.reference = 0.7
    _fit(module, data_b, tmp, [0.5, 0.9, 0.9])
    return module, data_a, data_b, logits_a, owners_a, artifact_a, reserve


def test_the_reserve_holds_exactly_the_configured_units(grown):
    module, *_ = grown
    growth = module.method.growth
    for block, base in growth.base.items():
        assert growth.units[block] == max(1, -(-base // 4))  # ceil(0.25 x width)
        assert hidden_widths(module.backbone)[block].width == base + 2 * growth.units[block]
    assert module.method.widened == growth.reserve


def test_a_task_that_misses_its_goal_claims_one_growth_then_compacts(grown):
    module, _, _, _, owners_a, _, reserve = grown
    method: CPG = module.method
    assert _counts(owners_a)[RESERVED] == reserve  # A met its goal: it never grew
    assert method.results["digits_rotated"]["grown"] == 0
    result_b = method.results["digits_mod3"]
    assert result_b["grown"] == 1 and method.growth.claims == ["digits_mod3"]
    # unpruned 0.5 missed 0.7 -> grow; 0.9 (grown) met it -> 0.3 -> 0.6 kept
    assert [s for s, _ in result_b["history"]] == pytest.approx([0.0, 0.0, 0.3, 0.6])
    claimed = reserve - _counts(method.owners)[RESERVED]
    assert claimed * 2 == reserve  # one of the two growths: exactly half the reserve
    for name, o in method.owners.items():
        was_reserved = owners_a[name] == RESERVED
        now = o[was_reserved]
        assert ((now == RESERVED) | (now == 2) | (now == FREE)).all()  # B's, or B's pruned


def test_earlier_tasks_stay_bit_identical_and_the_reserve_is_zero_for_them(grown):
    module, data_a, data_b, logits_a, owners_a, *_ = grown
    logits_b = logits_on_test_split(module, data_b)
    module.set_task("digits_rotated")
    assert torch.equal(logits_on_test_split(module, data_a), logits_a)
    for name, mask in masked_weights(module.backbone):
        assert not mask.mask()[module.method.owners[name] >= 2].any(), name
    module.set_task("digits_mod3")
    assert torch.equal(logits_on_test_split(module, data_b), logits_b)


def test_artifacts_record_widths_and_rebuild_the_widened_network(grown, tmp_path, assert_bit_exact):
    module, data_a, data_b, logits_a, _, artifact_a, _ = grown
    artifact_b = module.export_task("digits_mod3", config={"backbone": BACKBONE})
    growth = module.method.growth
    assert artifact_a.extra_meta["widths"] == growth.base
    assert artifact_b.extra_meta["widths"] == {
        b: w + growth.units[b] for b, w in growth.base.items()
    }
    paths = []
    for artifact in (artifact_a, artifact_b):
        assert artifact.widened == growth.reserve
        paths.append(save_artifact(artifact, tmp_path / f"{artifact.task}.safetensors"))
    assert load_artifact(paths[1]).widened == growth.reserve
    model = MultiTaskModel.from_artifacts(paths, build_backbone(**BACKBONE).model)
    bundle = model.save(tmp_path / "both.bundle")
    assert [a.widened for a in read_bundle(bundle)[2]] == [growth.reserve] * 2  # v4
    # the bundle rebuilds the backbone as the run built it (in_chans=1, from B's config)
    assert_bit_exact(module, [model, MultiTaskModel.load(bundle)], data_a, data_b, logits_a)


def test_a_task_with_no_free_weight_grows_at_its_start(tmp_path):
    torch.manual_seed(0)
    spec = {**SPEC, "compact_epochs": 0}  # nothing is ever pruned: A keeps every weight
    module = PiggybackModule(backbone=BACKBONE, task="digits_rotated", num_classes=10, method=spec)
    trainer = quick_trainer(tmp_path, 1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule("rotated", batch_size=32))
    module.add_task("digits_mod3", 3)
    method: CPG = module.method
    assert method.growth.claims == ["digits_mod3"]
    assert method.owned(2) > 0 and method.compaction["grown"] == 1


def test_a_checkpoint_restores_the_widened_network_and_its_claims(grown, tmp_path):
    module, data_a, data_b, logits_a, *_ = grown
    trainer = quick_trainer(tmp_path, 1)
    trainer.strategy.connect(module)
    path = tmp_path / "grown.ckpt"
    trainer.save_checkpoint(path)
    restored = PiggybackModule.load_from_checkpoint(path, weights_only=False)
    assert restored.method.growth.claims == ["digits_mod3"]
    for name, owners in module.method.owners.items():
        assert torch.equal(restored.method.owners[name], owners), name
    restored.set_task("digits_rotated")
    assert torch.equal(logits_on_test_split(restored, data_a), logits_a)
    module.set_task("digits_mod3")
    restored.set_task("digits_mod3")
    assert torch.equal(logits_on_test_split(restored, data_b), logits_on_test_split(module, data_b))


def test_a_first_task_that_owns_the_pretrained_network_never_grows(tmp_path):
    """It is the fine-tuned network its goal comes from: a miss is noise, not capacity."""
    torch.manual_seed(0)
    spec = {**SPEC, "reference": 0.99}
    module = PiggybackModule(backbone=BACKBONE, task="digits_rotated", num_classes=10, method=spec)
    _fit(module, DigitsDataModule("rotated", batch_size=32), tmp_path, [0.5])
    assert module.method.growth.claims == []
    assert module.method.results["digits_rotated"]["grown"] == 0
