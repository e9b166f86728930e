"""The paper's "classifier only" baseline: frozen pretrained features, a new head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from piggyback.formats import TaskArtifact
from piggyback.methods.base import Method
from piggyback.nn import masked_weights


class ClassifierOnly(Method):
    """Only the head trains; the backbone runs in eval mode without gradients."""

    name = "classifier_only"

    @property
    def backbone_frozen(self) -> bool:
        return True

    @property
    def trains_bn(self) -> bool:
        return False

    @classmethod
    def apply(
        cls,
        backbone: nn.Module,
        artifact: TaskArtifact,
        pretrained_bn: Mapping[str, torch.Tensor] | None,
    ) -> None:
        """The pretrained network: masks (if another task masked this backbone) all ones."""
        for _, mask in masked_weights(backbone):
            mask.reset_mask("1s", 1.0)
        super().apply(backbone, artifact, pretrained_bn)
