"""Superposed masks (SupSup) and the pretrained view: exact values, α gradients, clean exit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from piggyback.nn import get_masks, mask_model, pretrained_weights, superposed, unmask_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))


def _masked_copy(net: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: plain layers whose weights are W * mixture, computed by hand."""
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for name, mix in masks.items():
            param = ref.get_parameter(name)
            param.mul_(mix)
    return ref


def _stacks(net: nn.Module, seeds=(1, 2, 3)) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in net.named_parameters():
        if name.endswith("weight"):
            masks = []
            for seed in seeds:
                g = torch.Generator().manual_seed(seed)
                masks.append((torch.rand(param.shape, generator=g) > 0.3).to(torch.int8))
            out[name] = torch.stack(masks)
    return out


def _mix(stack: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    return (stack.float() * alphas.reshape((-1,) + (1,) * (stack.dim() - 1))).sum(0)


def test_superposition_computes_the_weighted_sum_of_masks_and_its_alpha_gradient():
    plain = _net()
    stacks = _stacks(plain)
    masked = mask_model(copy.deepcopy(plain), mask_init="uniform")
    x = torch.randn(5, 2, 10, 10)
    alphas = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    with superposed(masked, stacks, alphas):
        out = masked(x)
        out.square().sum().backward()
    mixes = {n: _mix(s, alphas.detach()) for n, s in stacks.items()}
    # the same by hand, with autograd on an explicit mixture
    ref_alphas = alphas.detach().clone().requires_grad_(True)
    ref = copy.deepcopy(plain)
    weights = {}
    for name, stack in stacks.items():
        weights[name] = ref.get_parameter(name).detach() * _mix(stack, ref_alphas)
    expected = torch.func.functional_call(ref, weights, (x,))
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(alphas.grad, ref_alphas.grad)
    torch.testing.assert_close(out, _masked_copy(plain, mixes)(x))


def test_one_hot_alpha_is_exactly_that_task_and_the_layer_is_untouched_after():
    plain = _net()
    stacks = _stacks(plain)
    masked = mask_model(copy.deepcopy(plain), mask_init="uniform")
    x = torch.randn(3, 2, 10, 10)
    before = masked(x).detach()
    own = get_masks(masked)
    with torch.no_grad(), superposed(masked, stacks, torch.tensor([0.0, 1.0, 0.0])):
        second = masked(x)
    assert torch.equal(second, _masked_copy(plain, {n: s[1].float() for n, s in stacks.items()})(x))
    assert torch.equal(masked(x), before)  # back to its own mask
    assert all(torch.equal(get_masks(masked)[n], m) for n, m in own.items())


def test_pretrained_view_ignores_the_mask():
    plain = _net()
    masked = mask_model(copy.deepcopy(plain), mask_init="uniform")
    x = torch.randn(3, 2, 10, 10)
    with torch.no_grad():
        assert not torch.equal(masked(x), plain(x))  # about half the weights are off
        with pretrained_weights(masked):
            assert torch.equal(masked(x), plain(x))
            assert torch.equal(masked[0].weight, plain[0].weight)
        assert torch.equal(unmask_model(copy.deepcopy(masked))(x), plain(x))


def test_mismatched_stacks_are_refused():
    masked = mask_model(_net())
    stacks = _stacks(masked)
    stacks.pop(next(iter(stacks)))
    with pytest.raises(ValueError, match="do not match"), superposed(masked, stacks, torch.ones(3)):
        pass
