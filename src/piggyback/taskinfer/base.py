"""Task inference: which learned task an unlabeled input belongs to, behind one interface.

A multi-task model deployed for real gets images without a task label. A *strategy* scores
every task for every input (higher: more likely); :func:`infer_task` turns scores into task
names, for a whole batch (SupSup's setting: a batch comes from one task) or per input (a
mixed stream), and :func:`predict` adds each input's class under its inferred task.

A strategy is one small class in one file: subclass :class:`Strategy`, give it a ``name``
and it registers itself (``task_inference=<name>`` then finds it). Strategies are typed
against :class:`TaskInferenceHost`, the few things of a multi-task model they use, never
against ``piggyback.models.multitask.MultiTaskModel`` itself (which sits beside them and
calls them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import nn

from piggyback.formats import ArtifactError, TaskArtifact, bn_state_dict, load_bn_state
from piggyback.utils.inputs import num_inputs, select_inputs

PER_CHOICES: tuple[str, ...] = ("batch", "sample")
REGISTRY: dict[str, type[Strategy]] = {}


class TaskInferenceError(ArtifactError):
    """The loaded tasks cannot use a strategy (the message says which strategies can).

    An :class:`ArtifactError`, so that the entry points report it as a one-line user error:
    it is always about what the loaded task artifacts hold.
    """


class TaskInferenceHost(Protocol):
    """What a strategy may use of a multi-task model."""

    backbone: nn.Module  # the shared pretrained backbone (masked layers keep W untouched)
    heads: nn.ModuleDict  # one head per task
    pretrained_bn: Mapping[str, torch.Tensor]
    inference_cache: dict[str, Any]  # emptied whenever a task is added or removed

    @property
    def tasks(self) -> list[str]: ...

    def artifact(self, task: str) -> TaskArtifact: ...

    def __call__(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor: ...


@dataclass
class Scores:
    """Per-task scores, ``values[n, t]`` for task ``tasks[t]`` (higher: more likely).

    ``n`` runs over the inputs (per sample) or is 1 (per batch). ``logits`` holds every
    task's logits for the inputs when the strategy computed them on the tasks' own networks
    anyway (then a prediction needs no further forward).
    """

    values: torch.Tensor
    logits: dict[str, torch.Tensor] | None = None


class Prediction(NamedTuple):
    task: str
    label: int


class Strategy:
    """Base class of a task-inference rule; override :meth:`sample_scores` at least."""

    name: ClassVar[str] = ""
    #: one line for reports: what it computes
    summary: ClassVar[str] = ""
    #: its scores come with every task's logits (a prediction needs no extra forward)
    gives_logits: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def check(self, host: TaskInferenceHost) -> None:
        """Raise :class:`TaskInferenceError` when ``host``'s tasks cannot use this strategy."""

    def sample_scores(self, host: TaskInferenceHost, x: torch.Tensor) -> Scores:
        """Scores of every task for every input: ``values`` of shape ``[len(x), T]``."""
        raise NotImplementedError

    def batch_scores(self, host: TaskInferenceHost, x: torch.Tensor) -> Scores:
        """Scores for the batch as a whole (``[1, T]``): by default the inputs' mean."""
        scores = self.sample_scores(host, x)
        return Scores(scores.values.mean(0, keepdim=True), scores.logits)

    def cost(self, num_tasks: int, per: str) -> dict[str, float]:
        """Backbone forwards and backwards per input to infer the task (not the class)."""
        return {"forwards": float(num_tasks), "backwards": 0.0}


def strategy_names() -> list[str]:
    return sorted(REGISTRY)


def build_strategy(spec: str | Strategy) -> Strategy:
    """A strategy object from its registered name (or the object itself)."""
    if isinstance(spec, Strategy):
        return spec
    try:
        return REGISTRY[spec]()
    except KeyError:
        raise TaskInferenceError(
            f"unknown task_inference strategy {spec!r}; choose from {strategy_names()}"
        ) from None


def _check_per(per: str) -> None:
    if per not in PER_CHOICES:
        raise ValueError(f"per must be one of {PER_CHOICES}, got {per!r}")


def infer(
    host: TaskInferenceHost, x: torch.Tensor, strategy: str | Strategy, per: str
) -> tuple[list[str], Scores]:
    """Each input's inferred task (the same for all under ``per="batch"``) and the scores."""
    _check_per(per)
    if not host.tasks:
        raise TaskInferenceError("the model holds no task to infer")
    rule = build_strategy(strategy)
    rule.check(host)
    scores = rule.batch_scores(host, x) if per == "batch" else rule.sample_scores(host, x)
    best = scores.values.argmax(dim=1).tolist()
    tasks = [host.tasks[i] for i in best]
    if per == "batch":
        tasks = tasks * num_inputs(x)
    return tasks, scores


def infer_task(
    host: TaskInferenceHost, x: torch.Tensor, strategy: str | Strategy = "entropy", per="batch"
) -> str | list[str]:
    """The task of batch ``x`` (``per="batch"``), or of each input (``per="sample"``)."""
    tasks, _ = infer(host, x, strategy, per)
    return tasks[0] if per == "batch" else tasks


@torch.no_grad()
def _classes(host: TaskInferenceHost, x: torch.Tensor, tasks: list[str], scores: Scores):
    labels: list[int] = [0] * len(tasks)
    groups: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task, []).append(i)
    for task, positions in groups.items():
        if scores.logits is not None:
            logits = scores.logits[task][positions]
        else:
            logits = host(select_inputs(x, positions), task=task)
        for i, label in zip(positions, logits.argmax(dim=1).tolist(), strict=True):
            labels[i] = label
    return labels


def predict(
    host: TaskInferenceHost,
    x: torch.Tensor,
    strategy: str | Strategy = "entropy",
    per: str = "sample",
) -> list[Prediction]:
    """``(task, class)`` for every input of ``x``, the task inferred by ``strategy``.

    Strategies that ran every task's network (entropy, max_prob) take the class from those
    logits; the others run one more forward per inferred task group.
    """
    tasks, scores = infer(host, x, strategy, per)
    labels = _classes(host, x, tasks, scores)
    return [Prediction(t, c) for t, c in zip(tasks, labels, strict=True)]


# ------------------------------------------------------------------------- helpers
def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy per row divided by ``log(C)``: 0 (certain) .. 1 (uniform).

    Dividing by the maximum makes heads with different numbers of classes comparable (a
    uniform 2-class head and a uniform 43-class head both score 1). One class: 0.
    """
    num_classes = logits.shape[-1]
    if num_classes < 2:
        return logits.new_zeros(logits.shape[:-1])
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy / torch.log(torch.tensor(float(num_classes), device=logits.device))


@torch.no_grad()
def all_task_logits(host: TaskInferenceHost, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every task's logits on ``x``, each through its own network (T forwards)."""
    return {task: host(x, task=task) for task in host.tasks}


@contextmanager
def bn_state(backbone: nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``backbone`` computes with the BN ``state`` inside the block; restored exactly after.

    The host remembers which task's BN it holds; putting the same tensors back keeps that
    knowledge true.
    """
    saved = bn_state_dict(backbone)
    try:
        if state:
            load_bn_state(backbone, state)
        yield
    finally:
        load_bn_state(backbone, saved)
