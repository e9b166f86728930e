"""The task whose own network gives the highest maximum softmax probability."""

from __future__ import annotations

import torch

from piggyback.taskinfer.base import Scores, Strategy, TaskInferenceHost, all_task_logits


class MaxProb(Strategy):
    """Runs every task's network and head (T forwards); highest max softmax wins.

    The classic out-of-distribution score (Hendrycks & Gimpel, 2017). Not normalised by
    the number of classes: a 2-class head is never below 0.5, a 43-class head can be near
    1/43, so with very different class counts it leans towards small heads; ``entropy``
    normalises, prefer it then. Like ``entropy`` it needs task networks that differ: heads
    over (nearly) the same pretrained features are surest on the pretraining domain's
    inputs whatever task those belong to (see ``Entropy``).
    """

    name = "max_prob"
    summary = "T forwards, highest max softmax"
    gives_logits = True

    def sample_scores(self, host: TaskInferenceHost, x: torch.Tensor) -> Scores:
        logits = all_task_logits(host, x)
        values = torch.stack(
            [torch.softmax(v.float(), dim=1).amax(dim=1) for v in logits.values()], dim=1
        )
        return Scores(values, logits)
