"""The Piggyback head warm-up: during it only the head moves; the masks start moving after.

Small CNN pretrained on the demo digits, 6 steps per epoch, a learning rate that moves every
mask on every step once masks train.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from piggyback.config.validate import ConfigError, check_config
from piggyback.data.digits import DigitsDataModule
from piggyback.methods import Piggyback
from piggyback.models.module import PiggybackModule
from piggyback.models.testing import demo_module, quick_trainer
from piggyback.utils.instantiate import to_dict

FAST_LR = {"masks": 1e-3, "head": 1e-3, "bn": 1e-3}


class Snapshots(L.Callback):
    """The backbone's and the head's full state after every training step."""

    def __init__(self) -> None:
        self.backbone: list[dict[str, torch.Tensor]] = []
        self.head: list[dict[str, torch.Tensor]] = []
        self.bn_training: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = pl_module.backbone.state_dict()
        self.backbone.append({k: v.clone() for k, v in state.items()})
        self.head.append({k: v.clone() for k, v in pl_module.head.state_dict().items()})
        bns = [m for m in pl_module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.bn_training.append(any(m.training for m in bns))


def _train(tmp_path, demo_cache, epochs: int, bn: str = "frozen", **warmup) -> tuple:
    torch.manual_seed(0)
    method = Piggyback(lr=FAST_LR, bn=bn, **warmup)
    module = demo_module(demo_cache, method=method)
    init = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head0 = {k: v.clone() for k, v in module.head.state_dict().items()}
    snaps = Snapshots()
    quick_trainer(tmp_path, epochs=epochs, callbacks=[snaps]).fit(
        module, DigitsDataModule("rotated", batch_size=32)
    )
    return module, init, head0, snaps


def _masks_real(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith("mask_real")}


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_only_the_head_moves_during_warmup_steps_then_the_masks_move(tmp_path, demo_cache, bn):
    module, init, head0, snaps = _train(tmp_path, demo_cache, epochs=1, bn=bn, warmup_steps=4)
    assert len(snaps.backbone) == 6
    assert all(torch.equal(v, torch.full_like(v, 1e-2)) for v in _masks_real(init).values())
    previous_head = head0
    for step in range(4):  # steps 1-4: the whole backbone (masks, BN stats) bit-identical
        for key, value in init.items():
            assert torch.equal(snaps.backbone[step][key], value), (step, key)
        assert not snaps.bn_training[step]
        head = snaps.head[step]
        assert all(not torch.equal(head[k], previous_head[k]) for k in head), step
        previous_head = head
    for step in (4, 5):  # warm-up over: every mask moved on every step
        before, after = snaps.backbone[step - 1], snaps.backbone[step]
        for key in _masks_real(init):
            assert not torch.equal(after[key], before[key]), (step, key)
    # task-specific BN trains (and updates its statistics) again after the warm-up
    assert snaps.bn_training[4] == (bn == "train")
    assert not module.method.warming_up


def test_warmup_epochs_keeps_the_masks_at_init_for_whole_epochs(tmp_path, demo_cache):
    _, init, _, snaps = _train(tmp_path, demo_cache, epochs=2, warmup_epochs=1)
    masks0 = _masks_real(init)
    for step in range(6):
        assert all(torch.equal(snaps.backbone[step][k], v) for k, v in masks0.items()), step
    assert all(not torch.equal(snaps.backbone[6][k], v) for k, v in masks0.items())


def test_no_warmup_moves_the_masks_on_the_first_step(tmp_path, demo_cache):
    _, init, _, snaps = _train(tmp_path, demo_cache, epochs=1)
    assert all(not torch.equal(snaps.backbone[0][k], v) for k, v in _masks_real(init).items())


def test_warmup_resumes_from_the_trainer_progress(tmp_path, demo_cache):
    """The warm-up state is derived from the trainer, so a module built from scratch (as a
    resumed run is) knows whether the warm-up is over."""
    module = demo_module(demo_cache, method=Piggyback(lr=FAST_LR, warmup_epochs=2))

    class Progress:
        current_epoch, global_step = 2, 12

    module._trainer = Progress()  # the part of the Trainer the warm-up reads
    module.method.on_train_epoch_start(module)
    assert not module.method.warming_up and not module.method.backbone_frozen
    Progress.current_epoch = 1
    module.method.on_train_epoch_start(module)
    assert module.method.warming_up and module.method.backbone_frozen


def test_config_default_is_the_paper_and_the_warmup_one_option_away(make_cfg):
    for method in ("piggyback", "piggyback_bn"):
        cfg = make_cfg(f"method={method}")
        assert cfg.method.warmup_epochs == 0 and cfg.method.warmup_steps == 0
    warm = make_cfg("experiment=paper", "method=piggyback_bn", "method.warmup_epochs=2")
    module = PiggybackModule(
        backbone={"name": "small_cnn", "weights": None},
        task="t",
        num_classes=3,
        method=to_dict(warm.method),
    )
    assert module.method.warmup_epochs == 2 and module.method.trains_bn
    with pytest.raises(ConfigError, match="method.warmup_epochs"):
        check_config(make_cfg("method.warmup_epochs=-1"), [])
