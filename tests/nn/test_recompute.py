"""``recompute_masked_weights``: recipes instead of ``W * M`` in autograd's saved tensors.

The architecture matrix (test_architectures.py) checks, per model, that no ``W * M``
outlives the forward and that the mask gradients stay bit-identical; here: the failure
modes, the cases where it must do nothing, and the training module's switch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from piggyback.models.testing import demo_module
from piggyback.nn import mask_model, masked_weights, recompute_masked_weights
from piggyback.nn.recompute import recomputing


def _masked_mlp() -> nn.Module:
    torch.manual_seed(0)
    return mask_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))


def test_a_mask_changed_between_forward_and_backward_is_an_error():
    model = _masked_mlp()
    x = torch.randn(5, 8, requires_grad=True)
    with recompute_masked_weights():
        loss = model(x).square().sum()
    _, mask = next(iter(masked_weights(model)))
    with torch.no_grad():
        mask.mask_real.add_(1.0)
    with pytest.raises(RuntimeError, match="modified between the forward and the backward"):
        loss.backward()


def test_a_threshold_changed_between_forward_and_backward_is_an_error():
    model = _masked_mlp()
    x = torch.randn(5, 8, requires_grad=True)
    with recompute_masked_weights():
        loss = model(x).square().sum()
    for _, mask in masked_weights(model):
        mask.threshold = 0.5
    with pytest.raises(RuntimeError, match="modified between"):
        loss.backward()


def test_no_op_without_autograd_or_when_disabled():
    with torch.no_grad(), recompute_masked_weights():
        assert not recomputing()
    with recompute_masked_weights(enabled=False):
        assert not recomputing()
    with recompute_masked_weights():
        assert recomputing()
        with recompute_masked_weights():  # nests
            assert recomputing()
        assert recomputing()
    assert not recomputing()


def test_input_gradients_and_double_backward_match_the_saved_path():
    """Rebuilt ``W * M`` feeds the input gradient (linear saves ``W_eff.t()``, a view)."""
    outs = []
    for recompute in (False, True):
        model = _masked_mlp()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with recompute_masked_weights(recompute):
            y = model(x).square().sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        gx.square().sum().backward()
        outs.append((gx.detach(), [m.mask_real.grad.clone() for _, m in masked_weights(model)]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(a, b)


def test_module_switch_learns_the_same_masks(demo_cache):
    """``model.recompute_masked_weights=true`` through PiggybackModule: same masks, bit for bit."""
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    masks = []
    for recompute in (False, True):
        torch.manual_seed(0)
        module = demo_module(demo_cache, recompute_masked_weights=recompute)
        assert module.hparams["recompute_masked_weights"] is recompute
        module.train()
        opt = module.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        opt = opt[0] if isinstance(opt, list) else opt
        for _ in range(3):
            nn.functional.cross_entropy(module(x), y).backward()
            opt.step()
            opt.zero_grad()
        masks.append([m.mask_real.detach().clone() for _, m in masked_weights(module.backbone)])
    for a, b in zip(*masks, strict=True):
        assert torch.equal(a, b)
