"""CollapseMonitor: exact flip statistics, and a warning on a collapse but not on a healthy run.

Small CNN pretrained on the demo digits (10 balanced classes, ln 10 = 2.303), 6 steps per
epoch.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from piggyback.data.digits import DigitsDataModule
from piggyback.models.module import PiggybackModule
from piggyback.models.testing import demo_module, quick_trainer
from piggyback.nn import masked_weights
from piggyback.training.collapse import CollapseMonitor, label_entropy


class FlipByHand(L.Callback):
    """Switches off the first ``count`` weights of one layer after the epoch's first step."""

    def __init__(self, layer: str, count: int) -> None:
        self.layer, self.count = layer, count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            mask = dict(masked_weights(pl_module.backbone))[self.layer]
            with torch.no_grad():
                mask.mask_real.view(-1)[: self.count] = 0.0


def _fit(tmp_path, module, epochs: int, *callbacks: L.Callback, data="rotated") -> L.Trainer:
    trainer = quick_trainer(tmp_path, epochs=epochs, callbacks=list(callbacks))
    trainer.fit(module, DigitsDataModule(data, batch_size=32))
    return trainer


def test_flip_statistics_are_exact_on_a_hand_made_change(tmp_path, demo_cache):
    torch.manual_seed(0)
    # masks do not train (lr 0): the only change in the epoch is the hand-made one
    module = demo_module(demo_cache, lr={"masks": 0.0, "head": 1e-3})
    layers = dict(masked_weights(module.backbone))
    total = sum(m.mask_real.numel() for m in layers.values())
    name = next(iter(layers))
    monitor = CollapseMonitor()
    trainer = _fit(tmp_path, module, 1, monitor, FlipByHand(name, 7))
    metrics = trainer.callback_metrics
    assert metrics["masks/flipped"].item() == pytest.approx(7 / total, rel=1e-6)
    assert metrics["masks/flipped_max"].item() == pytest.approx(
        7 / layers[name].mask_real.numel(), rel=1e-6
    )


def test_no_flips_give_zeros(tmp_path, demo_cache):
    module = demo_module(demo_cache, lr={"masks": 0.0, "head": 1e-3})
    trainer = _fit(tmp_path, module, 1, CollapseMonitor())
    assert trainer.callback_metrics["masks/flipped"].item() == 0.0
    assert trainer.callback_metrics["masks/flipped_max"].item() == 0.0


def test_warns_on_a_collapsed_network(tmp_path, demo_cache):
    """Every mask off: the features are the same for every image, so no head can beat the
    loss of predicting the label frequencies."""
    torch.manual_seed(0)
    module = demo_module(demo_cache, lr={"masks": 0.0, "head": 1e-2})
    for _, mask in masked_weights(module.backbone):
        mask.set_mask(torch.zeros_like(mask.mask_real))
    monitor = CollapseMonitor()
    with pytest.warns(UserWarning, match=r"collapsed to a constant output.*method\.lr_scale"):
        trainer = _fit(tmp_path, module, 3, monitor)
    assert monitor.collapsed_epochs == [1, 2]  # the first epoch is not checked
    assert monitor.last_epoch_collapsed is True
    assert trainer.callback_metrics["train/collapse"].item() == 1.0


def test_silent_on_a_healthy_run(tmp_path, demo_cache):
    torch.manual_seed(0)
    module = demo_module(demo_cache, lr={"masks": 1e-4, "head": 1e-2})
    monitor = CollapseMonitor()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*collapsed.*")
        trainer = _fit(tmp_path, module, 3, monitor, data="base")
    assert monitor.collapsed_epochs == [] and monitor.last_epoch_collapsed is False
    assert trainer.callback_metrics["train/collapse"].item() == 0.0


def _epoch(
    monitor: CollapseMonitor, epoch: int, loss: float, labels: list[int], **extra: float
) -> None:
    trainer = SimpleNamespace(current_epoch=epoch)
    module = SimpleNamespace(backbone=torch.nn.Linear(2, 2), log_dict=lambda metrics: None)
    monitor.on_train_epoch_start(trainer, module)
    outputs = {"loss": torch.tensor(loss), **{k: torch.tensor(v) for k, v in extra.items()}}
    monitor.on_train_batch_end(trainer, module, outputs, [torch.zeros(0), torch.tensor(labels)], 0)
    monitor.on_train_epoch_end(trainer, module)


def test_a_regulariser_in_the_loss_is_not_taken_for_a_collapse():
    """HAT adds c x (mean gate), about 0.75 with every gate open, to what it minimises: the
    check reads the step's ``task_loss`` (the cross-entropy) where there is one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _epoch(CollapseMonitor(after_epochs=0), 0, 0.75 + 0.3, [0, 1, 2, 3], task_loss=0.3)
    with pytest.warns(UserWarning, match="collapsed"):
        _epoch(CollapseMonitor(after_epochs=0), 0, 0.3, [0, 1, 2, 3], task_loss=1.386)


def test_chance_level_is_the_entropy_of_the_labels():
    assert label_entropy({0: 5, 1: 5, 2: 5, 3: 5}) == pytest.approx(math.log(4))
    assert label_entropy({0: 3, 1: 1}) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )
    assert label_entropy({}) == 0.0
    # imbalanced labels: a constant prediction reaches their entropy (0.562), below ln 2
    monitor = CollapseMonitor(after_epochs=0)
    with pytest.warns(UserWarning, match="collapsed"):
        _epoch(monitor, 0, 0.560, [0, 0, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _epoch(monitor, 1, 0.50, [0, 0, 0, 1])  # more than 2 % below chance: learning
        _epoch(CollapseMonitor(after_epochs=1), 0, 0.70, [0, 1])  # first epoch: not checked
    assert monitor.collapsed_epochs == [0]
    assert monitor.last_epoch_collapsed is False  # warned for epoch 0, recovered in epoch 1
    unchecked = CollapseMonitor(after_epochs=1)
    _epoch(unchecked, 0, 0.70, [0, 1])
    assert unchecked.last_epoch_collapsed is None
    with pytest.warns(UserWarning, match="diverged"):  # far above chance: diverged
        _epoch(CollapseMonitor(), 1, 19.0, [0, 1, 2])
    with pytest.raises(ValueError):
        CollapseMonitor(tolerance=1.5)


# ------------------------------------------------------------------------------------------
# The mechanism of the collapse, checked for defects of ours on EfficientNet-Lite0 (random
# init; the straight-through gradient itself is checked on it in tests/nn/test_architectures)


def _lite0_module():
    torch.manual_seed(0)
    backbone = {"name": "tf_efficientnet_lite0", "source": "timm", "weights": None}
    return PiggybackModule(backbone=backbone, task="t", num_classes=5, method="piggyback")


def test_frozen_bn_stays_frozen_under_masks_on_efficientnet_lite0():
    """timm's BatchNormAct2d stays in eval mode while masks train: its statistics never
    move, whatever the masks do."""
    module = _lite0_module()
    module.train()
    bns = [m for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    stats = {k: v.clone() for k, v in module.backbone.state_dict().items() if "running" in k}
    optimizer = torch.optim.Adam(module.param_groups())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    assert all(torch.equal(module.backbone.state_dict()[k], v) for k, v in stats.items())
    assert not any(m.training for m in bns)


def test_a_fully_masked_depthwise_filter_gives_a_constant_channel():
    """What the collapsed runs show: a depthwise filter whose 9 mask values are all off
    outputs 0 for every image, so frozen BN + ReLU6 turn that channel into the constant
    act(beta - gamma * mean / sqrt(var + eps)); with enough such channels the features stop
    depending on the image."""
    module = _lite0_module().eval()
    block = module.backbone.blocks[0][0]  # depthwise conv_dw -> bn1 (BN + ReLU6)
    mask = dict(masked_weights(block))["conv_dw.weight"]
    mask.mask_real.data[3] = 0.0  # channel 3: all 3x3 weights off
    bn = block.bn1
    with torch.no_grad():
        bn.running_mean[3], bn.running_var[3] = 0.7, 0.25
        bn.weight[3], bn.bias[3] = 2.0, 4.0
        seen = {}
        handle = bn.register_forward_hook(lambda m, i, o: seen.update(out=o))
        module(torch.randn(3, 3, 32, 32))
        handle.remove()
    expected = min(max(4.0 - 2.0 * 0.7 / math.sqrt(0.25 + bn.eps), 0.0), 6.0)
    channel = seen["out"][:, 3]
    assert torch.allclose(channel, torch.full_like(channel, expected), atol=1e-5)
    assert seen["out"][:, 4].std() > 0  # an unmasked channel still depends on the image
