"""PiggybackModule: the paper's guarantees and Lightning round trips, on the demo data."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from piggyback.backbones import build_backbone
from piggyback.data.digits import DigitsDataModule
from piggyback.models.module import PiggybackModule
from piggyback.models.testing import demo_module, logits_on_test_split, quick_trainer
from piggyback.nn import get_masks, masked_weights

FAST_LR = {"masks": 1e-3, "head": 1e-3, "bn": 1e-3}


def _module(demo_cache, **kw):
    kw.setdefault("lr", FAST_LR)
    return demo_module(demo_cache, **kw)


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_no_forgetting_task_a_logits_bit_identical_after_task_b(tmp_path, demo_cache, bn):
    torch.manual_seed(0)
    data_a = DigitsDataModule("rotated", batch_size=64)
    data_b = DigitsDataModule("inverted", batch_size=64)
    module = _module(demo_cache, bn=bn)
    quick_trainer(tmp_path).fit(module, data_a)
    logits_a = logits_on_test_split(module, data_a)
    masks_a = get_masks(module.backbone)
    assert any((m == 0).any() for m in masks_a.values()), "task A learned no mask at all"
    frozen = {n: layer.weight.clone() for n, layer in masked_weights(module.backbone)}

    module.add_task("digits_inverted", 10)
    quick_trainer(tmp_path).fit(module, data_b)
    logits_b = logits_on_test_split(module, data_b)
    masks_b = get_masks(module.backbone)
    assert any(not torch.equal(masks_a[n], masks_b[n]) for n in masks_a)

    module.set_task("digits_rotated")
    assert torch.equal(logits_on_test_split(module, data_a), logits_a)
    module.set_task("digits_inverted")
    assert torch.equal(logits_on_test_split(module, data_b), logits_b)
    # The pretrained conv weights never moved.
    params = dict(module.backbone.named_parameters())
    for name, weight in frozen.items():
        assert torch.equal(params[name], weight), name


def test_frozen_bn_and_weights_are_untouched_by_training(tmp_path, demo_cache):
    module = _module(demo_cache)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items() if "mask_real" not in k}
    quick_trainer(tmp_path).fit(module, DigitsDataModule("rotated"))
    after = module.backbone.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    names = [g["name"] for g in module.param_groups()]
    assert names == ["masks", "head"]


def test_param_groups_per_method(demo_cache):
    assert [g["name"] for g in _module(demo_cache, bn="train").param_groups()] == [
        "masks",
        "bn",
        "head",
    ]
    assert [g["name"] for g in _module(demo_cache, method="finetune").param_groups()] == [
        "backbone",
        "head",
    ]
    assert [g["name"] for g in _module(demo_cache, method="classifier_only").param_groups()] == [
        "head"
    ]


def test_finetune_moves_weights_and_classifier_only_does_not(tmp_path, demo_cache):
    data = DigitsDataModule("rotated")
    finetune = _module(demo_cache, method="finetune")
    w0 = finetune.backbone.features[0].weight.clone()
    quick_trainer(tmp_path).fit(finetune, data)
    assert not torch.equal(finetune.backbone.features[0].weight, w0)
    with pytest.raises(ValueError, match="separate network"):
        finetune.add_task("other", 3)

    frozen = _module(demo_cache, method="classifier_only")
    state = {k: v.clone() for k, v in frozen.backbone.state_dict().items()}
    head0 = frozen.head.weight.clone()
    quick_trainer(tmp_path).fit(frozen, data)
    for key, value in frozen.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not torch.equal(frozen.head.weight, head0)


def test_checkpoint_round_trip_gives_same_predictions(tmp_path, demo_cache):
    data_a = DigitsDataModule("rotated")
    module = _module(demo_cache)
    trainer = quick_trainer(tmp_path)
    trainer.fit(module, data_a)
    module.add_task("digits_mod3", 3)
    trainer = quick_trainer(tmp_path)
    trainer.fit(module, DigitsDataModule("mod3"))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    expected_mod3 = logits_on_test_split(module, DigitsDataModule("mod3"))
    module.set_task("digits_rotated")
    expected_rot = logits_on_test_split(module, data_a)

    loaded = PiggybackModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.task == "digits_mod3" and set(loaded.tasks) == {"digits_rotated", "digits_mod3"}
    assert loaded.hparams.backbone["weights"] is None  # rebuilt without downloading
    assert torch.equal(logits_on_test_split(loaded, DigitsDataModule("mod3")), expected_mod3)
    loaded.set_task("digits_rotated")
    assert torch.equal(logits_on_test_split(loaded, data_a), expected_rot)
    assert loaded.backbone_fingerprint == module.backbone_fingerprint


def test_resume_from_last_ckpt_continues_from_saved_epoch(tmp_path, demo_cache):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = DigitsDataModule("rotated")
    ckpt_dir = tmp_path / "ckpt"
    first = quick_trainer(
        tmp_path,
        epochs=2,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )
    first.fit(_module(demo_cache), data)
    last = ckpt_dir / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1

    seen = []

    class Recorder(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.current_epoch)

    resumed_module = _module(demo_cache)
    second = quick_trainer(tmp_path, epochs=4, callbacks=[Recorder()])
    second.fit(resumed_module, data, ckpt_path=str(last))
    assert seen == [2, 3]
    assert second.global_step == 4 * 6


def test_unknown_task_and_duplicate_task_errors(demo_cache):
    module = _module(demo_cache)
    with pytest.raises(KeyError, match="unknown task"):
        module.set_task("nope")
    with pytest.raises(ValueError, match="already exists"):
        module.add_task("digits_rotated", 10)
    with pytest.raises(ValueError, match="unknown method"):
        _module(demo_cache, method="nope")


def test_mask_statistics_are_logged(tmp_path, demo_cache):
    trainer = quick_trainer(tmp_path)
    trainer.fit(_module(demo_cache), DigitsDataModule("rotated"))
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["masks/zeros"]) < 1.0
    per_layer = [k for k in metrics if k.startswith("masks/zeros/")]
    assert len(per_layer) == 5  # the demo CNN has 5 convs; its classifier is stripped


PRUNED_PACKNET = {
    "_target_": "piggyback.methods.PackNet",
    "name": "packnet",
    "first_task_trains_pretrained": False,
    "initial_prune": 0.5,
}


@pytest.mark.parametrize("method", ["piggyback", pytest.param(PRUNED_PACKNET, id="packnet")])
def test_prototype_is_the_pretrained_networks_mean_feature_and_changes_nothing(demo_cache, method):
    """PackNet with ``initial_prune`` has pruned (zeroed) half the pretrained weights when its
    first task starts: the prototype must still come from the pretrained values, and the
    trained state must be exactly as before afterwards."""
    module = demo_module(demo_cache, method, mask={"mask_init": "uniform"}).eval()
    pretrained = build_backbone("small_cnn", weights="demo", cache_dir=demo_cache).model.eval()
    x = torch.rand(10, 1, 32, 32)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        live = module.backbone(x)
        assert not torch.allclose(live, pretrained(x))  # masked / pruned: not the pretrained
        proto = module.feature_mean([(x[:6], None), (x[6:], None)])
        torch.testing.assert_close(proto, pretrained(x).mean(0))
        assert torch.equal(module.backbone(x), live)
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
