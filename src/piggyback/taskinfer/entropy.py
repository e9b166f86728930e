"""The task whose own network is most certain: lowest class-count-normalised entropy."""

from __future__ import annotations

import torch

from piggyback.taskinfer.base import (
    Scores,
    Strategy,
    TaskInferenceHost,
    all_task_logits,
    normalized_entropy,
)


class Entropy(Strategy):
    """Runs every task's network and head on the input (T forwards); the task whose
    predictive entropy, divided by ``log(classes)``, is lowest wins.

    Works for every method (each task runs as it would with its label). Fails where a
    head is confidently wrong on other tasks' inputs (similar domains, e.g. Split-CIFAR:
    every 2-class head is sure of something on any CIFAR image).
    """

    name = "entropy"
    summary = "T forwards, lowest normalised entropy"
    gives_logits = True

    def sample_scores(self, host: TaskInferenceHost, x: torch.Tensor) -> Scores:
        logits = all_task_logits(host, x)
        values = torch.stack([-normalized_entropy(v) for v in logits.values()], dim=1)
        return Scores(values, logits)
