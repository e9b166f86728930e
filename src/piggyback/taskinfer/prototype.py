"""Nearest task prototype in the pretrained feature space: one forward of the backbone."""

from __future__ import annotations

import torch

from piggyback.nn import pretrained_weights
from piggyback.taskinfer.base import (
    Scores,
    Strategy,
    TaskInferenceError,
    TaskInferenceHost,
    bn_state,
)


class Prototype(Strategy):
    """The task whose prototype (the mean *pretrained*, unmasked feature of its training
    images, stored in its artifact: a few KB) is nearest, in Euclidean distance, to the
    input's pretrained feature. One forward of the shared backbone, whatever the number of
    tasks and whatever the method (it never runs a task's network).

    It tells domains apart, not label spaces: two tasks over the same images (digits and
    digits mod 3) have the same prototype, and similar domains (Split-CIFAR) nearly so.
    """

    name = "prototype"
    summary = "1 forward of the pretrained backbone, nearest mean feature"

    def check(self, host: TaskInferenceHost) -> None:
        missing = [t for t in host.tasks if host.artifact(t).prototype is None]
        if missing:
            raise TaskInferenceError(
                f"task_inference=prototype: task(s) {missing} have no prototype (artifacts "
                "written before prototypes were stored); retrain them to store one, or use "
                "task_inference=entropy, max_prob or oneshot"
            )

    def cost(self, num_tasks: int, per: str) -> dict[str, float]:
        return {"forwards": 1.0, "backwards": 0.0}

    @torch.no_grad()
    def features(self, host: TaskInferenceHost, x: torch.Tensor) -> torch.Tensor:
        """Pretrained features: masks ignored, pretrained BN (restored afterwards)."""
        backbone = host.backbone
        with bn_state(backbone, host.pretrained_bn), pretrained_weights(backbone):
            return backbone(x).flatten(1).float()

    def sample_scores(self, host: TaskInferenceHost, x: torch.Tensor) -> Scores:
        features = self.features(host, x)
        means = torch.stack([host.artifact(t).prototype for t in host.tasks]).to(features)
        if means.shape[1] != features.shape[1]:
            raise TaskInferenceError(
                f"task prototypes have {means.shape[1]} features, this backbone gives "
                f"{features.shape[1]}; the tasks were trained on another backbone"
            )
        return Scores(-torch.cdist(features, means).square())
