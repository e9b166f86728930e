"""What a method's hooks may use of the objects that host it, as structural types.

A method is called by two hosts: the LightningModule that trains tasks
(``piggyback.models.module.PiggybackModule``) and the multi-task inference model
(``piggyback.models.multitask.MultiTaskModel``). Both sit above the methods layer, so a method never
imports their classes; it is typed against these protocols, which name exactly the small
objects it touches (the backbone, the current head, the task states, ...). Anything that has
these attributes can host a method: a test double, or a ``SimpleNamespace`` for exporting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from piggyback.formats import ArtifactError, TaskArtifact


@dataclass
class TaskState:
    """A finished task as the module keeps it; ``stored`` is whatever its method saves."""

    num_classes: int
    class_names: list[str] | None = None
    stored: dict[str, Any] = field(default_factory=dict)
    #: mean pretrained feature of the task's training images (task inference); method-neutral
    prototype: torch.Tensor | None = None


class TrainingHost(Protocol):
    """The training side: one backbone, the task being learned and the tasks learned so far."""

    backbone: nn.Module
    pretrained_bn: Mapping[str, torch.Tensor]
    mask_cfg: Mapping[str, Any]
    tasks: dict[str, TaskState]
    task: str | None
    log_layer_sparsity: bool

    @property
    def head(self) -> nn.Module: ...

    @property
    def trainer(self) -> Any: ...  # the Lightning Trainer (epochs; PackNet's prune schedule)

    def train(self, mode: bool = True) -> Any: ...  # re-applies the method's frozen modes


class InferenceHost(Protocol):
    """The inference side: the shared backbone plus room for what a method keeps per model."""

    backbone: nn.Module
    fingerprint: str
    pretrained_bn: Mapping[str, torch.Tensor]
    finetuned: nn.ModuleDict  # fine-tuned tasks: one network each
    method_networks: nn.ModuleDict  # networks a method shares between its tasks (PackNet)
    method_state: dict[str, Any]

    def ensure_masked(self, artifact: TaskArtifact) -> None: ...

    def separate_network(self, artifact: TaskArtifact | None) -> nn.Module: ...


def untouched_backbone_error(method: str, artifact: TaskArtifact, why: str) -> ArtifactError:
    """The refusal of a sequence method's task on a backbone no earlier task touched: ``why``
    says what the task's weights depend on; the message names the tasks to load first."""
    return ArtifactError(
        f"{method} task {artifact.task!r} cannot be applied to an untouched backbone: {why} "
        f"({artifact.extra_meta.get('previous_tasks')}). Load the whole sequence in order: "
        "MultiTaskModel.from_artifacts([...]) or evaluate.py on the run's artifacts."
    )


def sequence_state(
    model: InferenceHost, key: str, label: str, artifact: TaskArtifact, **empty: Any
) -> dict[str, Any]:
    """``model``'s state for a method whose tasks build on each other (PackNet, CPG, WSN,
    HAT: one shared network, tasks added in sequence order). ``empty`` are the state's other
    entries when it is created; an artifact out of order is an :class:`ArtifactError`."""
    state = model.method_state.setdefault(key, {"tasks": [], **empty})
    expected = artifact.extra_meta["previous_tasks"]
    if state["tasks"] != expected:
        raise ArtifactError(
            f"{label} task {artifact.task!r} builds on tasks {expected} (in that order); this "
            f"model holds {label} tasks {state['tasks']}. Add them in sequence order."
        )
    return state
