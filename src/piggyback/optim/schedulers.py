"""Schedules whose milestones are fractions of the run, so a paper's shape survives any budget.

The papers decay their learning rate at fixed epochs of a long run: Piggyback x0.1 every 15 of
its 30 epochs, PackNet x0.1 after 10 of 20 fine-tuning epochs and then 10 retraining epochs at
0.1x. ``StepLR(step_size=15)`` in a 10-epoch run never fires, and the last epoch is tested at
full lr. :class:`FractionStepLR` keeps the shape: milestones are fractions of the epochs the
run is given (``total_epochs``, filled in from ``trainer.max_epochs`` by the module).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["FractionStepLR", "milestone_epochs"]


def milestone_epochs(fractions: Sequence[float], total_epochs: int) -> list[int]:
    """The epochs at which the lr drops: ``round(f * total)``, at least 1, each one distinct
    when the budget allows (a 3-epoch run with milestones 0.5 drops at epoch 2)."""
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    for f in fractions:
        if not 0.0 < float(f) < 1.0:
            raise ValueError(f"milestones are fractions of the run in (0, 1), got {f}")
    return [max(1, min(total_epochs - 1, round(float(f) * total_epochs))) for f in fractions]


class FractionStepLR(LambdaLR):
    """``lr * gamma ** (number of milestones passed)``; milestones as fractions of the run.

    With ``total_epochs=1`` no milestone can fire (the one epoch runs at full lr).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[float] = (0.5,),
        gamma: float = 0.1,
        total_epochs: int = 1,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = milestone_epochs(milestones, total_epochs) if total_epochs > 1 else []
        self.gamma = float(gamma)
        steps = self.milestones

        def factor(epoch: int) -> float:
            return self.gamma ** sum(epoch >= m for m in steps)

        super().__init__(optimizer, factor, last_epoch=last_epoch)
