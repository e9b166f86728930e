"""Mixed precision and channels_last: compute may drop to bf16, masks must stay float32.

Masks move by ~lr = 1e-4 per step around a threshold of 5e-3; bf16 has 8 bits of mantissa,
so a bf16 mask (or a bf16 mask gradient) would round most updates away.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from piggyback.models.module import PiggybackModule
from piggyback.nn import mask_model, masked_weights, module_masks


def _layer(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A masked conv or linear layer, its WeightMask and an input."""
    torch.manual_seed(0)
    if kind == "conv":
        layer = mask_model(nn.Conv2d(4, 6, 3, padding=1), mask_init="uniform")
        return layer, module_masks(layer)["weight"], torch.randn(2, 4, 8, 8)
    layer = mask_model(nn.Linear(5, 3), mask_init="uniform")
    return layer, module_masks(layer)["weight"], torch.randn(4, 5)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_masked_layer_under_bf16_autocast_keeps_float32_mask_and_grad(kind):
    layer, m, x = _layer(kind)
    weight, bias = m.weight.detach().clone(), layer.bias.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert m.mask_real.dtype == torch.float32
    assert m.mask_real.grad is not None and m.mask_real.grad.dtype == torch.float32
    assert m.weight.grad is None and layer.bias.grad is None
    assert m.weight.dtype == torch.float32
    assert torch.equal(m.weight, weight) and torch.equal(layer.bias, bias)

    # Same graph written out by hand: dL/dmask_real = dL/dW_eff * W (straight through).
    w_eff = (weight * m.mask()).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.conv2d(x, w_eff, bias, padding=1) if kind == "conv" else F.linear(x, w_eff, bias)
    assert torch.equal(ref, y.detach())
    ref.float().square().sum().backward()
    assert torch.allclose(m.mask_real.grad, w_eff.grad * weight, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_mask_update_is_not_rounded_away():
    """A 1e-4 Adam step on a 1e-2 mask survives in float32 (in bf16 it would vanish)."""
    layer, m, x = _layer("conv")
    before = m.mask_real.detach().clone()
    opt = torch.optim.Adam([m.mask_real], lr=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().square().sum()
    loss.backward()
    opt.step()
    moved = (m.mask_real.detach() - before).abs()
    assert m.mask_real.dtype == torch.float32
    assert moved.max().item() == pytest.approx(1e-4, rel=1e-2)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_channels_last_module_trains_one_step_on_cpu(tmp_path, precision):
    torch.manual_seed(0)
    module = PiggybackModule(
        backbone={"name": "resnet18", "weights": None},
        task="t",
        num_classes=3,
        channels_last=True,
        log_layer_sparsity=False,
    )
    before = {n: layer.mask_real.detach().clone() for n, layer in masked_weights(module.backbone)}
    weights = {n: layer.weight.detach().clone() for n, layer in masked_weights(module.backbone)}
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 1
    changed = 0
    for name, layer in masked_weights(module.backbone):
        assert layer.mask_real.dtype == torch.float32
        if layer.mask_real.dim() == 4:
            assert layer.mask_real.is_contiguous(memory_format=torch.channels_last)
            assert layer.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(layer.weight, weights[name])  # the backbone never moves
        changed += not torch.equal(layer.mask_real, before[name])
    assert changed == len(before)  # every layer's mask got a gradient and an update
