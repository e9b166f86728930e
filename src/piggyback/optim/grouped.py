"""Several optimizers behind one: a method may train weights with SGD and masks with Adam.

The reference code of CPG (ivclab/CPG, ``CPG_imagenet_main.py``) steps the network's weights,
biases, BN and head with SGD (momentum, nesterov) and only the pick masks with Adam, each with
its own learning-rate schedule. Lightning's automatic optimization takes one optimizer, so
:class:`GroupedOptimizer` is one ``torch.optim.Optimizer`` whose ``param_groups`` are the
inner optimizers' own group dicts (the very same objects): an LR monitor, ``lr_scale``, the
finite-loss guard and any scheduler see and change every group's lr, each inner optimizer
keeps its own update rule, and ``state_dict`` has the usual layout (every parameter's state,
Adam's moments and SGD's momentum alike), so checkpoints save and resume bit-exactly.

A group can be *frozen* (:meth:`GroupedOptimizer.freeze`): its parameters are left out of the
inner optimizer's step, so neither they nor their optimizer state move at all, which an lr of 0
or a zeroed gradient does not guarantee (Adam's momentum moves a parameter for about ten steps
after its gradient is zeroed). CPG freezes its pick masks while it compacts a task (the
reference's ``lr_mask 0``).

:class:`GroupedScheduler` steps one scheduler per inner optimizer (``method.schedulers``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "GroupedOptimizer",
    "GroupedScheduler",
    "build_optimizer",
    "build_scheduler",
]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class GroupedOptimizer(torch.optim.Optimizer):
    """Named param groups stepped by several inner optimizers, seen as one optimizer.

    ``parts`` is a list of ``(factory, groups)``: each factory builds one inner optimizer over
    its groups (dicts with a ``name``). Group names must be unique.
    """

    def __init__(self, parts: list[tuple[OptimizerFactory, list[dict[str, Any]]]]) -> None:
        self.inner: list[torch.optim.Optimizer] = []
        groups: list[dict[str, Any]] = []
        for factory, part in parts:
            inner = factory(part)  # fills its own defaults into these very dicts
            self.inner.append(inner)
            groups.extend(inner.param_groups)
        names = [g.get("name") for g in groups]
        if len(set(names)) != len(names) or None in names:
            raise ValueError(f"grouped optimizer needs unique group names, got {names}")
        super().__init__(groups, {})
        self.frozen: set[str] = set()
        self._link()

    def _link(self) -> None:
        """Point every inner optimizer at this optimizer's group dicts and state."""
        by_name = {g["name"]: g for g in self.param_groups}
        for inner in self.inner:
            inner.param_groups = [by_name[g["name"]] for g in inner.param_groups]
            inner.state = self.state  # parameters are disjoint: one state dict serves all

    def group_names(self) -> list[str]:
        return [g["name"] for g in self.param_groups]

    def freeze(self, name: str, frozen: bool = True) -> None:
        """Leave group ``name`` out of every step from now on (or put it back)."""
        if name not in self.group_names():
            raise KeyError(f"no param group {name!r}; groups: {self.group_names()}")
        (self.frozen.add if frozen else self.frozen.discard)(name)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self.inner:
            held = [g for g in inner.param_groups if g["name"] in self.frozen]
            if len(held) == len(inner.param_groups):
                continue
            params = [g["params"] for g in held]
            for g in held:
                g["params"] = []
            try:
                inner.step()
            finally:
                for g, p in zip(held, params, strict=True):
                    g["params"] = p
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["frozen"] = sorted(self.frozen)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        frozen = state_dict.pop("frozen", [])
        super().load_state_dict(state_dict)
        # load_state_dict made new group dicts and a new state dict: relink the inner ones,
        # or a resumed run would step with the lr of the run's start
        for inner in self.inner:
            names = [g["name"] for g in inner.param_groups]
            inner.param_groups = [g for g in self.param_groups if g["name"] in names]
        self._link()
        self.frozen = set(frozen)


class GroupedScheduler(LRScheduler):
    """One scheduler per inner optimizer of a :class:`GroupedOptimizer`, stepped together.

    A subclass of ``LRScheduler`` only so that Lightning accepts it; it keeps no schedule of
    its own (``base_lrs`` and ``last_epoch`` live in the inner schedulers).
    """

    def __init__(self, optimizer: GroupedOptimizer, schedulers: list[Any]) -> None:
        self.optimizer = optimizer
        self.schedulers = list(schedulers)
        self._last_lr = [g["lr"] for g in optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:  # noqa: ARG002 - the LRScheduler API
        for scheduler in self.schedulers:
            scheduler.step()
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler, state in zip(self.schedulers, state_dict["schedulers"], strict=True):
            scheduler.load_state_dict(state)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def build_optimizer(
    groups: list[dict[str, Any]],
    default: OptimizerFactory,
    per_group: Mapping[str, OptimizerFactory] | None = None,
) -> torch.optim.Optimizer:
    """``default`` over ``groups``, except the groups named in ``per_group``, which get their
    own optimizer. No override that applies: the plain ``default`` optimizer (as before)."""
    per_group = {k: v for k, v in (per_group or {}).items() if any(g["name"] == k for g in groups)}
    if not per_group:
        return default(groups)
    rest = [g for g in groups if g["name"] not in per_group]
    parts = [(default, rest)] if rest else []
    parts += [(per_group[g["name"]], [g]) for g in groups if g["name"] in per_group]
    return GroupedOptimizer(parts)


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    target = getattr(factory, "func", factory)
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _one(factory: SchedulerFactory, optimizer: Any, total_epochs: int | None) -> Any:
    if total_epochs is not None and _accepts(factory, "total_epochs"):
        return factory(optimizer, total_epochs=total_epochs)
    return factory(optimizer)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    default: SchedulerFactory | None,
    per_group: Mapping[str, SchedulerFactory | None] | None = None,
    *,
    total_epochs: int | None = None,
) -> Any:
    """The scheduler(s) of ``optimizer``; None when there is none.

    For a :class:`GroupedOptimizer`, each inner optimizer gets the scheduler named after its
    first group in ``per_group`` (None there: a constant lr), else ``default``. A scheduler
    that takes ``total_epochs`` (e.g. :class:`~piggyback.optim.FractionStepLR`) is given the
    run's epochs, so its milestones follow the budget.
    """
    per_group = dict(per_group or {})
    if not isinstance(optimizer, GroupedOptimizer):
        return _one(default, optimizer, total_epochs) if default is not None else None
    schedulers = []
    for inner in optimizer.inner:
        name = inner.param_groups[0]["name"]
        factory = per_group[name] if name in per_group else default
        if factory is not None:
            schedulers.append(_one(factory, inner, total_epochs))
    return GroupedScheduler(optimizer, schedulers) if schedulers else None
