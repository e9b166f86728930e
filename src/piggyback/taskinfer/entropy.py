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
    every 2-class head is sure of something on any CIFAR image), and where the tasks'
    networks have not specialised: a Piggyback task whose masks hardly moved from the
    pretrained network (the paper's mask rate for a few epochs) is the pretrained backbone
    plus a linear head, and such a head is no less sure on another task's inputs than on
    its own, and often surest on inputs nearest the pretraining domain. On the test
    suite's digits (backbone pretrained on upright digits), linear heads on the pretrained
    features trained to 91 % (rotated) and 99 % (upright, mod 3) accuracy: the rotated
    head is surer on upright digits than on its own, and the mod-3 head surer on rotated
    digits than the rotated head, so rotated batches go to the mod-3 task
    (docs/task_inference.md, "Task inference"). The rule is not at fault there: no rule
    over these outputs separates tasks whose networks compute the same features.
    """

    name = "entropy"
    summary = "T forwards, lowest normalised entropy"
    gives_logits = True

    def sample_scores(self, host: TaskInferenceHost, x: torch.Tensor) -> Scores:
        logits = all_task_logits(host, x)
        values = torch.stack([-normalized_entropy(v) for v in logits.values()], dim=1)
        return Scores(values, logits)
