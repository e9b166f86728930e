"""Several optimizers behind one: each group steps as its own optimizer would, frozen groups
do not move at all, and a saved state resumes bit-exactly (schedules included)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from piggyback.optim import (
    FractionStepLR,
    GroupedOptimizer,
    GroupedScheduler,
    build_optimizer,
    build_scheduler,
    milestone_epochs,
)

SGD = functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True)
ADAM = functools.partial(torch.optim.Adam)


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(5, 3, generator=g).requires_grad_() for k in ("weights", "masks")}


def _groups(p: dict[str, torch.Tensor]) -> list[dict]:
    return [
        {"name": "weights", "params": [p["weights"]], "lr": 1e-2},
        {"name": "masks", "params": [p["masks"]], "lr": 1e-3, "weight_decay": 0.0},
    ]


def _loss(p: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    x = torch.linspace(-1, 1, 3) * (step + 1)
    return ((p["weights"] * p["masks"]) @ x).pow(2).sum()


def _train(optimizer, p, steps, start=0, scheduler=None):
    for step in range(start, start + steps):
        optimizer.zero_grad()
        _loss(p, step).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_no_override_gives_the_plain_optimizer():
    p = _params()
    assert type(build_optimizer(_groups(p), SGD)) is torch.optim.SGD
    assert type(build_optimizer(_groups(p), SGD, {"other": ADAM})) is torch.optim.SGD


def test_each_group_steps_exactly_as_its_own_optimizer():
    p, q = _params(), _params()
    grouped = build_optimizer(_groups(p), SGD, {"masks": ADAM})
    assert isinstance(grouped, GroupedOptimizer)
    assert grouped.group_names() == ["weights", "masks"]
    sgd, adam = SGD(_groups(q)[:1]), ADAM(_groups(q)[1:])
    for step in range(6):
        grouped.zero_grad()
        sgd.zero_grad()
        adam.zero_grad()
        _loss(p, step).backward()
        _loss(q, step).backward()
        grouped.step()
        sgd.step()
        adam.step()
    assert torch.equal(p["weights"], q["weights"]) and torch.equal(p["masks"], q["masks"])
    # the outer groups are the inner optimizers' own dicts: one lr change reaches both
    grouped.param_groups[1]["lr"] = 0.5
    assert grouped.inner[1].param_groups[0]["lr"] == 0.5


def test_a_frozen_group_and_its_state_do_not_move():
    p = _params()
    grouped = build_optimizer(_groups(p), SGD, {"masks": ADAM})
    _train(grouped, p, 3)
    masks = p["masks"].detach().clone()
    moments = grouped.state[p["masks"]]["exp_avg"].clone()
    grouped.freeze("masks")
    weights = p["weights"].detach().clone()
    _train(grouped, p, 3, start=3)
    assert torch.equal(p["masks"], masks)
    assert torch.equal(grouped.state[p["masks"]]["exp_avg"], moments)
    assert not torch.equal(p["weights"], weights)
    with pytest.raises(KeyError, match="no param group 'bn'"):
        grouped.freeze("bn")


def test_resume_from_a_saved_state_is_bit_exact():
    """Two optimizers, two schedules, a frozen group: straight 8 steps == 4 + save/load + 4."""

    def build(p):
        opt = build_optimizer(_groups(p), SGD, {"masks": ADAM})
        step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
        sched = build_scheduler(opt, step, {"masks": None})
        return opt, sched

    p = _params()
    opt, sched = build(p)
    assert isinstance(sched, GroupedScheduler) and len(sched.schedulers) == 1
    _train(opt, p, 4, scheduler=sched)
    opt.freeze("masks")
    saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))  # as a checkpoint file
    snapshot = {k: v.detach().clone() for k, v in p.items()}
    _train(opt, p, 4, start=4, scheduler=sched)

    q = {k: v.clone().requires_grad_() for k, v in snapshot.items()}
    opt2, sched2 = build(q)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert opt2.frozen == {"masks"}
    _train(opt2, q, 4, start=4, scheduler=sched2)
    assert torch.equal(p["weights"], q["weights"]) and torch.equal(p["masks"], q["masks"])
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)  # the schedule went on
    assert opt2.param_groups[1]["lr"] == 1e-3  # None: the masks' lr is constant


def test_fraction_milestones_follow_the_budget():
    assert milestone_epochs([0.5], 30) == [15]
    assert milestone_epochs([1 / 3], 30) == [10]
    assert milestone_epochs([0.5], 3) == [2]
    assert milestone_epochs([0.5], 2) == [1]
    with pytest.raises(ValueError, match="fractions of the run"):
        milestone_epochs([15], 30)
    p = _params()
    opt = torch.optim.SGD([p["weights"]], lr=1.0)
    sched = build_scheduler(
        opt, functools.partial(FractionStepLR, milestones=[0.5]), None, total_epochs=10
    )
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0] * 5 + [pytest.approx(0.1)] * 5
    one = FractionStepLR(torch.optim.SGD([p["masks"]], lr=1.0), milestones=[0.5], total_epochs=1)
    assert one.milestones == []
