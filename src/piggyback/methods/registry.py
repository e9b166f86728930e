"""Method names -> classes, and the two moves between a backbone and a task artifact.

An artifact records its method's *name* (the format knows no method); this module turns the
name back into the class that applies it, and builds method objects from configs. Importing
it registers every built-in method.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
from hydra.errors import InstantiationException
from torch import nn

from piggyback.formats import (
    ArtifactError,
    TaskArtifact,
    artifact_from_model,
    fingerprint,
    verify_backbone,
)
from piggyback.methods.base import REGISTRY, Method
from piggyback.methods.classifier_only import ClassifierOnly
from piggyback.methods.cpg import CPG
from piggyback.methods.finetune import Finetune, FinetuneSequential
from piggyback.methods.hat import HAT
from piggyback.methods.ksm import KSM
from piggyback.methods.packnet import PackNet
from piggyback.methods.piggyback import Piggyback
from piggyback.methods.wsn import WSN
from piggyback.utils.instantiate import build

BUILT_IN = (Piggyback, ClassifierOnly, Finetune, FinetuneSequential, PackNet, CPG, KSM, WSN, HAT)
"""Registered by importing them above (``Method.__init_subclass__``)."""


def method_class(name: str) -> type[Method]:
    """The registered method class of ``name`` (as recorded in artifacts)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(REGISTRY)}") from None


def artifact_method(artifact: TaskArtifact) -> type[Method]:
    """The class that wrote ``artifact``; an unknown name is an :class:`ArtifactError`."""
    try:
        return method_class(artifact.method)
    except ValueError as exc:
        raise ArtifactError(f"task {artifact.task!r}: {exc} (newer piggyback?)") from None


def build_method(spec: str | Mapping[str, Any] | Method, **overrides: Any) -> Method:
    """A method object from a registered name, a ``_target_`` config, or an object."""
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, str):
        return method_class(spec)(**overrides)
    options = {k: v for k, v in dict(spec).items() if v is not None}
    options.update(overrides)
    target = options.pop("_target_", None)
    if target is None:
        return method_class(options.pop("name", "piggyback"))(**options)
    try:
        return build({"_target_": target, "_recursive_": False, **options})
    except InstantiationException as exc:  # a bad option: the method's own message
        cause = exc.__cause__
        if isinstance(cause, ValueError | TypeError):
            raise ValueError(f"method {target}: {cause}") from None
        raise


def apply_artifact(
    backbone: nn.Module,
    artifact: TaskArtifact,
    *,
    backbone_fingerprint: str | None = None,
    pretrained_bn: Mapping[str, torch.Tensor] | None = None,
) -> nn.Linear:
    """Make ``backbone`` compute ``artifact``'s task; returns the task's head.

    Pass a precomputed ``backbone_fingerprint`` when switching tasks often (hashing a
    ResNet-50 costs ~0.1 s). ``pretrained_bn`` restores the shared BN statistics for tasks
    that did not train their own BN.
    """
    verify_backbone(
        backbone, artifact, backbone_fingerprint=backbone_fingerprint, pretrained_bn=pretrained_bn
    )
    artifact_method(artifact).apply(backbone, artifact, pretrained_bn)
    return artifact.build_head()


def extract_artifact(
    backbone: nn.Module,
    head: nn.Linear,
    *,
    task: str,
    backbone_name: str,
    method: str = "piggyback",
    backbone_fingerprint: str | None = None,
    class_names: list[str] | None = None,
    include_bn: bool = False,
    config: dict[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    encoding: str = "bits",
) -> TaskArtifact:
    """Snapshot the task that ``backbone`` + ``head`` currently implement.

    The method (by name) decides what is stored; ``include_bn`` stores the BN state for
    methods that may train it. ``backbone_fingerprint`` must be the fingerprint of the
    *pretrained* weights; pass it for ``finetune``, whose weights have moved.
    """
    method_obj = build_method(method, bn="train" if include_bn else "frozen")
    # export reads only the backbone and the task name of its host
    parts = method_obj.export(SimpleNamespace(backbone=backbone, task=task), encoding)
    return artifact_from_model(
        backbone,
        head,
        parts,
        task=task,
        backbone_name=backbone_name,
        method=method,
        backbone_fingerprint=backbone_fingerprint or fingerprint(backbone),
        class_names=class_names,
        config=config,
        metrics=metrics,
    )
