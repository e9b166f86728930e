"""Fine-tuning baselines: every weight trains, so a task is a whole network."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from piggyback.formats import ArtifactError, TaskArtifact
from piggyback.methods.base import ArtifactParts, Method, TaskState
from piggyback.methods.hosts import InferenceHost, TrainingHost


class Finetune(Method):
    """The paper's "individual networks": one fully fine-tuned copy per task (SGD, BN trained)."""

    name = "finetune"
    default_lr = {"backbone": 1e-3}
    default_optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}
    separate_networks = True
    superposable = False  # W itself changes per task: no masks over one frozen W

    def __init__(self, *, bn: str = "train", **options: Any) -> None:
        super().__init__(bn=bn, **options)

    def freeze(self, module: TrainingHost) -> None:
        module.backbone.requires_grad_(True)

    def param_groups(self, module: TrainingHost) -> list[dict[str, Any]]:
        lr = self.lr.get("backbone", self.lr.get("head"))
        backbone = [p for p in module.backbone.parameters() if p.requires_grad]
        head = list(module.head.parameters())
        groups = [
            {"name": "backbone", "params": backbone, "lr": lr},
            {"name": "head", "params": head, "lr": self.lr.get("head", lr)},
        ]
        return [g for g in groups if g["params"]]

    def start_task(self, module: TrainingHost, task: str) -> None:
        """The network keeps its current weights (the pretrained ones for a first task)."""

    def store_task(self, module: TrainingHost, state: TaskState) -> None:
        """Nothing: the network itself is the task (and moves on with the next one)."""

    def activate_task(self, module: TrainingHost, state: TaskState) -> None:
        """Nothing to swap: every task runs on the network as it is now."""

    def export(self, module: TrainingHost, encoding: str) -> ArtifactParts:
        weights = {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}
        return ArtifactParts(weights=weights)

    @classmethod
    def apply(
        cls,
        backbone: nn.Module,
        artifact: TaskArtifact,
        pretrained_bn: Mapping[str, torch.Tensor] | None,
    ) -> None:
        try:
            backbone.load_state_dict(artifact.weights)
        except RuntimeError as exc:
            raise ArtifactError(
                f"fine-tuned weights of {artifact.task!r} do not fit: {exc}"
            ) from None

    @classmethod
    def attach(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        model.finetuned[artifact.task] = model.separate_network(artifact)

    @classmethod
    def activate(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        """Each fine-tuned task has its own network: nothing to switch."""

    @classmethod
    def network(cls, model: InferenceHost, task: str) -> nn.Module:
        return model.finetuned[task]


class FinetuneSequential(Finetune):
    """One network fine-tuned on the tasks in order: the catastrophic-forgetting reference.

    Every task keeps its head, but all tasks share the weights, which move with each new
    task; the continual-learning report shows what that costs the earlier tasks.
    """

    name = "finetune_sequential"
    separate_networks = False
    may_forget = True
