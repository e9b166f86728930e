"""StepInBackward: the optimizer step fused into backward learns exactly what the normal step
learns, frees every gradient, and checkpoints like any optimizer."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from piggyback.data.digits import DigitsDataModule
from piggyback.models.testing import demo_module, quick_trainer
from piggyback.nets.small_cnn import small_cnn
from piggyback.nn import mask_model, mask_parameters, masked_weights
from piggyback.optim import StepInBackward


def _model():
    torch.manual_seed(0)
    net = mask_model(small_cnn(num_classes=5, in_channels=3, width=8), mask_scale=6e-3)
    return net.train()


def _groups(net):
    head = list(net.fc.parameters())
    masks = [p for p in mask_parameters(net) if all(p is not h for h in head)]
    for p in head:
        p.requires_grad_(True)
    return [{"params": masks, "lr": 1e-3}, {"params": head, "lr": 1e-2}]


def _train(net, optimizer, steps=4):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [True, False])
def test_masks_learned_in_backward_are_bit_identical_to_the_normal_step(fused):
    adam = partial(torch.optim.Adam, fused=fused)
    normal, in_backward = _model(), _model()
    _train(normal, adam(_groups(normal)))
    optimizer = StepInBackward(_groups(in_backward), adam)
    _train(in_backward, optimizer)
    pairs = list(zip(normal.parameters(), in_backward.parameters(), strict=True))
    start = _model().parameters()
    assert any(not torch.equal(a, s) for (a, _), s in zip(pairs, start, strict=True))
    for a, b in pairs:
        assert torch.equal(a, b)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    F.cross_entropy(in_backward(x), torch.zeros(4, dtype=torch.long)).backward()
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(stepped) > 0 and all(p.grad is None for p in stepped)  # freed in backward
    assert any(p.grad is not None for p in in_backward.parameters())  # BN: not in the groups
    masks = torch.cat([m.flatten() for m in mask_parameters(in_backward)])
    assert (masks <= 5e-3).any()  # the masks really moved across the threshold


def test_state_dict_round_trip_resumes_bit_identically():
    adam = partial(torch.optim.Adam, fused=True)
    straight = _model()
    _train(straight, StepInBackward(_groups(straight), adam), steps=4)

    first = _model()
    optimizer = StepInBackward(_groups(first), adam)
    _train(first, optimizer, steps=2)
    state = copy.deepcopy(optimizer.state_dict())
    assert len(state["state"]) == sum(len(g["params"]) for g in optimizer.param_groups)
    resumed = copy.deepcopy(first)
    restored = StepInBackward(_groups(resumed), adam)
    restored.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the data of steps 1-2, then train 3-4 on the resumed copy
        torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
    for _ in range(2):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        F.cross_entropy(resumed(x), y).backward()
        restored.step()
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_scheduler_learning_rate_reaches_the_inner_step():
    net = _model()
    optimizer = StepInBackward(_groups(net), partial(torch.optim.SGD))
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # what a scheduler writes
    before = [p.detach().clone() for p in net.parameters()]
    _train(net, optimizer, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_scheduler_learning_rate_reaches_the_inner_step_after_a_resume():
    """load_state_dict makes new param groups; the scheduler writes those (regression: the
    inner optimizers kept the old groups, so a resumed run never saw its lr drop)."""
    net = _model()
    optimizer = StepInBackward(_groups(net), partial(torch.optim.SGD))
    _train(net, optimizer, steps=1)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in net.parameters()]
    _train(net, optimizer, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_a_new_optimizer_over_the_same_parameters_takes_them_over():
    """A task sequence builds one optimizer per task over masks that can be the same tensors
    (regression: the first task's hook stayed first in line, stepped with its own state and
    lr and dropped the gradient, so from the second task on the masks hardly moved)."""
    adam = partial(torch.optim.Adam, fused=True)
    net = _model()
    first = StepInBackward(_groups(net), adam)
    _train(net, first, steps=2)
    first_state = copy.deepcopy(first.state_dict())
    for group in first.param_groups:
        group["lr"] = 0.0  # the first task's decayed lr must not reach the second task
    fresh = copy.deepcopy(net)  # the same values, no hooks: what the second task should do
    _train(fresh, adam(_groups(fresh)), steps=3)
    second = StepInBackward(_groups(net), adam)
    _train(net, second, steps=3)
    for a, b in zip(fresh.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        first.state_dict()["state"].values(), first_state["state"].values(), strict=True
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)  # the old state stayed as it was


def test_an_optimizer_that_is_gone_steps_nothing():
    net = _model()
    _train(net, StepInBackward(_groups(net), partial(torch.optim.SGD, lr=1.0)), steps=1)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    F.cross_entropy(net(x), torch.zeros(4, dtype=torch.long)).backward()
    for a, b in zip(before, net.parameters(), strict=True):
        assert torch.equal(a, b)


STEP_IN_BACKWARD = {
    "_target_": "piggyback.optim.StepInBackward",
    "_partial_": True,
    "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True},
}


def test_lightning_fit_with_the_config_override_learns_the_same_masks(demo_cache, tmp_path):
    """Through the module and Lightning's loop, as ``method.optimizer`` in a config."""
    method = {"name": "piggyback", "lr": {"masks": 1e-3, "head": 1e-2}}
    learned = []
    for optimizer in (None, STEP_IN_BACKWARD):
        torch.manual_seed(0)
        module = demo_module(
            demo_cache, {**method, **({"optimizer": optimizer} if optimizer else {})}
        )
        quick_trainer(tmp_path, epochs=1, limit_train_batches=3).fit(
            module, datamodule=DigitsDataModule("rotated", batch_size=16)
        )
        learned.append(
            {n: m.mask_real.detach().clone() for n, m in masked_weights(module.backbone)}
        )
        learned[-1]["head"] = module.head.weight.detach().clone()
    assert learned[0].keys() == learned[1].keys()
    moved = sum(not torch.equal(v, torch.full_like(v, v.flatten()[0])) for v in learned[0].values())
    assert moved > 0
    for name in learned[0]:
        assert torch.equal(learned[0][name], learned[1][name]), name
