"""``method.lr_scale`` and the binary masks' learning rate (the learning-rate cliff).

With Adam a mask moves by about its learning rate per step, so that rate only sets how many
steps the first flip takes from the init. By default ``lr_scale`` leaves it alone; the paper's
sweep (``scale_mask_lr=true``) scales it too. Small CNN pretrained on the demo digits.
"""

from __future__ import annotations

import pytest
import torch

from piggyback.data.digits import DigitsDataModule
from piggyback.methods import CPG, KSM, Piggyback
from piggyback.models.testing import demo_module, quick_trainer
from piggyback.nn import masked_weights


def test_lr_scale_leaves_the_binary_masks_rate_alone_unless_asked():
    assert Piggyback(lr_scale=10).lr == pytest.approx({"masks": 1e-4, "head": 1e-3, "bn": 1e-3})
    paper = Piggyback(lr_scale=10, scale_mask_lr=True)
    assert paper.lr == pytest.approx({"masks": 1e-3, "head": 1e-3, "bn": 1e-3})
    assert Piggyback(lr={"masks": 1e-3}, lr_scale=3).lr["masks"] == pytest.approx(1e-3)
    cpg = CPG(lr_scale=10).lr
    assert cpg["masks"] == pytest.approx(1e-4) and cpg["backbone"] == pytest.approx(1e-2)


@pytest.mark.parametrize("scale_mask_lr", [False, True])
def test_ksm_scales_are_real_multipliers_and_follow_lr_scale(tmp_path, demo_cache, scale_mask_lr):
    method = KSM(lr_scale=3, scale_mask_lr=scale_mask_lr)
    module = demo_module(demo_cache, method=method)
    groups = {g["name"]: g["lr"] for g in module.param_groups()}
    assert groups["scales"] == pytest.approx(3e-4)
    assert groups["masks"] == pytest.approx(3e-4 if scale_mask_lr else 1e-4)


def _masks_after(tmp_path, demo_cache, method: Piggyback, steps: int, **module_kwargs):
    torch.manual_seed(0)
    module = demo_module(demo_cache, method=method, **module_kwargs)
    trainer = quick_trainer(tmp_path, epochs=1, limit_train_batches=steps)
    trainer.fit(module, DigitsDataModule("rotated", batch_size=32))
    return {name: mask.mask_real.detach().clone() for name, mask in masked_weights(module.backbone)}


def test_a_mask_scale_that_follows_the_lr_is_the_same_training(tmp_path, demo_cache):
    """Init, threshold and mask lr all x8 give exactly 8 x every mask value at every step (a
    power of two scales exactly): the straight-through gradient does not depend on the scale,
    and Adam's step is proportional to its lr. So keeping the mask lr out of ``lr_scale`` is
    the same as letting the mask scale follow it."""
    head = {"head": 1e-3}
    plain = _masks_after(tmp_path / "a", demo_cache, Piggyback(lr={"masks": 1e-3, **head}), 6)
    scaled = _masks_after(
        tmp_path / "b",
        demo_cache,
        Piggyback(lr={"masks": 8e-3, **head}),
        6,
        mask={"mask_scale": 8e-2, "threshold": 4e-2},
    )
    assert plain.keys() == scaled.keys()
    assert any(not torch.equal(v, torch.full_like(v, 1e-2)) for v in plain.values())
    for name in plain:
        assert torch.equal(scaled[name], 8 * plain[name]), name


def test_masks_flip_only_after_the_papers_50_steps_at_ten_times_the_lr(tmp_path, demo_cache):
    """lr_scale=10: default masks move 1e-4 per step and cannot reach the threshold (5e-3
    below the init) in 8 steps; the paper's sweep moves them 1e-3 per step and flips some
    within 5-6 steps, in a burst."""
    steps = 8
    default = _masks_after(tmp_path / "a", demo_cache, Piggyback(lr_scale=10), steps)
    assert all((v > 5e-3).all() for v in default.values())
    assert all(v.min() < 1e-2 for v in default.values())  # they did move
    paper = _masks_after(
        tmp_path / "b", demo_cache, Piggyback(lr_scale=10, scale_mask_lr=True), steps
    )
    flipped = sum(int((v <= 5e-3).sum()) for v in paper.values())
    total = sum(v.numel() for v in paper.values())
    assert flipped / total > 0.01
