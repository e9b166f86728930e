"""Optimizers and schedules; the paper's Adam (``torch.optim.Adam``) stays the default.

- :class:`GroupedOptimizer` / :func:`build_optimizer`: several optimizers behind one, per named
  param group (CPG: SGD for weights, Adam for pick masks), with :class:`GroupedScheduler`.
- :class:`FractionStepLR`: step decay at fractions of the run, so a paper's schedule keeps its
  shape at any number of epochs.
- :class:`StepInBackward`: any optimizer stepped per parameter inside the backward pass, so
  the masks' gradients never all exist at once (exact: same masks as the normal step).
- :class:`LeanAdam`: Adam's update with a bfloat16 first moment (Adam-like on masks, 1.5
  weight-sized tensors of state instead of 2) or also a factored second moment (0.5, but
  not Adam-like on masks; see its docstring).
"""

from piggyback.optim.grouped import (
    GroupedOptimizer,
    GroupedScheduler,
    build_optimizer,
    build_scheduler,
)
from piggyback.optim.lean_adam import LeanAdam
from piggyback.optim.schedulers import FractionStepLR, milestone_epochs
from piggyback.optim.step_in_backward import StepInBackward

__all__ = [
    "FractionStepLR",
    "GroupedOptimizer",
    "GroupedScheduler",
    "LeanAdam",
    "StepInBackward",
    "build_optimizer",
    "build_scheduler",
    "milestone_epochs",
]
