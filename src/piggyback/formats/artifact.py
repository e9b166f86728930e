"""The task artifact: everything one learned task needs, on top of a frozen backbone.

One file per task (``checked_file``): packed masks, the head, BN state when BN was trained for
the task, method-specific tensors (full weights for fine-tuning, PackNet's owner index) and
JSON metadata including the method's *name*. This module is the format only: it never asks
which method wrote a file; ``piggyback.methods`` applies artifacts and writes their parts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from piggyback.formats.checked_file import ArtifactError, read_checked_file, write_checked_file
from piggyback.formats.packed import PackedMask
from piggyback.formats.state import FINGERPRINT_SCHEME, fingerprint, legacy_fingerprint
from piggyback.nn.convert import masked_weights

ARTIFACT_FORMAT = "piggyback-task"
FORMAT_VERSION = 4
"""v2: masks named by parameter (``conv1.weight``), state fingerprint. v3: masks of reduced
shape (``kernel``/``filter`` granularity, with the weight's shape in the metadata) and soft
mask scales (``scale/<name>``). v4: ``widened``, the hidden units added to the backbone's
blocks before the task's weights apply (CPG's growth, ``piggyback.nn.widen``). Each file is
written at the oldest version that holds it (plain per-weight masks: v2), so older releases
keep reading what they can; v1 to v3 files load.

The optional ``prototype`` tensor (task inference) was added within v2: files without it
load (``prototype=None``) and readers that predate it ignore it."""
PLAIN_VERSION = 2
REDUCED_VERSION = 3


@dataclass
class ArtifactParts:
    """The method-specific tensors of a task artifact (the head and metadata are common)."""

    masks: dict[str, PackedMask] = field(default_factory=dict)
    bn_state: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_meta: dict[str, Any] = field(default_factory=dict)
    #: hidden units added per block (``piggyback.nn.widen``) to the pretrained backbone
    widened: dict[str, int] = field(default_factory=dict)


@dataclass
class TaskArtifact:
    """In-memory form of a task artifact file."""

    task: str
    num_classes: int
    method: str
    backbone: str
    fingerprint: str
    head: dict[str, torch.Tensor]
    masks: dict[str, PackedMask] = field(default_factory=dict)
    bn_state: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # method-specific tensors
    extra_meta: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    threshold_fn: str = "binarizer"
    threshold: float = 5e-3
    config: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    #: mean pretrained (unmasked) backbone feature of the task's training images, for
    #: nearest-mean task inference; None in artifacts written before it existed
    prototype: torch.Tensor | None = None
    #: hidden units added per block to the pretrained backbone before this task's weights
    #: apply (``piggyback.nn.widen``; CPG's growth); empty: the backbone as pretrained
    widened: dict[str, int] = field(default_factory=dict)

    @property
    def num_masked_weights(self) -> int:
        """Weights gated by the masks (whatever their granularity)."""
        return sum(m.num_weights for m in self.masks.values())

    @property
    def num_mask_units(self) -> int:
        """Mask values stored (one bit each for binary masks)."""
        return sum(m.numel for m in self.masks.values())

    def unpacked_masks(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Each layer's mask at its stored (unit) shape."""
        return {name: m.unpack(dtype) for name, m in self.masks.items()}

    def weight_masks(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Each layer's 0/1 mask expanded to its weight's shape (scales left out)."""
        return {name: m.unpack(dtype).expand(m.weight_shape) for name, m in self.masks.items()}

    def mask_weights(self) -> dict[str, int]:
        """Weights gated by each mask *unit*, per layer (statistics weight units by it)."""
        return {name: m.num_weights // max(m.numel, 1) for name, m in self.masks.items()}

    def mask_bytes(self) -> int:
        """Bytes of the masks: their bit code plus the scales of soft masks."""
        return sum(m.nbytes for m in self.masks.values())

    def task_bytes(self) -> int:
        """Bytes this task adds on top of the shared backbone (tensor payload only)."""
        tensors = [
            *self.head.values(),
            *self.bn_state.values(),
            *self.weights.values(),
            *self.extra.values(),
            *([self.prototype] if self.prototype is not None else []),
        ]
        return self.mask_bytes() + sum(t.numel() * t.element_size() for t in tensors)

    def bits_per_masked_weight(self) -> float:
        n = self.num_masked_weights
        return 8.0 * self.mask_bytes() / n if n else 0.0

    def build_head(self) -> nn.Linear:
        weight = self.head["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in self.head)
        head.load_state_dict(self.head)
        return head


def fingerprint_for(artifact: TaskArtifact, backbone: nn.Module, current: str | None = None) -> str:
    """The backbone's fingerprint in the scheme ``artifact`` was written with."""
    if not artifact.fingerprint.startswith(f"{FINGERPRINT_SCHEME}:"):
        return legacy_fingerprint(backbone)
    return current or fingerprint(backbone)


def artifact_from_model(
    backbone: nn.Module,
    head: nn.Linear,
    parts: ArtifactParts,
    *,
    task: str,
    backbone_name: str,
    method: str,
    backbone_fingerprint: str,
    class_names: list[str] | None = None,
    config: dict[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    prototype: torch.Tensor | None = None,
) -> TaskArtifact:
    """A task artifact from a method's :class:`ArtifactParts` and the task's head."""
    masks = list(masked_weights(backbone))
    return TaskArtifact(
        task=task,
        num_classes=head.out_features,
        method=method,
        backbone=backbone_name,
        fingerprint=backbone_fingerprint,
        head={k: v.detach().clone() for k, v in head.state_dict().items()},
        masks=parts.masks,
        bn_state=parts.bn_state,
        weights=parts.weights,
        extra=parts.extra,
        extra_meta=parts.extra_meta,
        class_names=list(class_names) if class_names is not None else None,
        threshold_fn=masks[0][1].threshold_fn if masks else "binarizer",
        threshold=masks[0][1].threshold if masks else 5e-3,
        config=config,
        metrics=dict(metrics or {}),
        prototype=None if prototype is None else prototype.detach().to("cpu", torch.float32),
        widened=dict(parts.widened),
    )


def artifact_version(artifact: TaskArtifact) -> int:
    """The oldest format version that holds ``artifact`` (v3 only for reduced/soft masks,
    v4 only for a widened backbone)."""
    if artifact.widened:
        return FORMAT_VERSION
    return REDUCED_VERSION if any(m.reduced for m in artifact.masks.values()) else PLAIN_VERSION


def artifact_tensors(artifact: TaskArtifact) -> dict[str, torch.Tensor]:
    tensors = {f"mask/{n}": m.data.contiguous() for n, m in artifact.masks.items()}
    scales = {n: m.scale for n, m in artifact.masks.items() if m.scale is not None}
    tensors.update({f"scale/{n}": s.contiguous() for n, s in scales.items()})
    tensors.update({f"head/{k}": v.contiguous() for k, v in artifact.head.items()})
    tensors.update({f"bn/{k}": v.contiguous() for k, v in artifact.bn_state.items()})
    tensors.update({f"weights/{k}": v.contiguous() for k, v in artifact.weights.items()})
    tensors.update({f"extra/{k}": v.contiguous() for k, v in artifact.extra.items()})
    if artifact.prototype is not None:
        tensors["prototype"] = artifact.prototype.contiguous()
    return {k: v.detach().to("cpu") for k, v in tensors.items()}


def artifact_meta(artifact: TaskArtifact) -> dict[str, Any]:
    return {
        "task": artifact.task,
        "num_classes": artifact.num_classes,
        "method": artifact.method,
        "backbone": artifact.backbone,
        "fingerprint": artifact.fingerprint,
        "class_names": artifact.class_names,
        "threshold_fn": artifact.threshold_fn,
        "threshold": artifact.threshold,
        "num_masked_weights": artifact.num_masked_weights,
        "masks": {n: _mask_meta(m) for n, m in artifact.masks.items()},
        "config": artifact.config,
        "metrics": artifact.metrics,
        "extra": artifact.extra_meta,
        **({"widened": artifact.widened} if artifact.widened else {}),
    }


def _mask_meta(mask: PackedMask) -> dict[str, Any]:
    meta: dict[str, Any] = {"shape": list(mask.shape), "kind": mask.kind, "encoding": mask.encoding}
    if mask.reduced:  # plain masks keep the v2 metadata exactly
        meta["weight_shape"] = list(mask.weight_shape)
        meta["soft"] = mask.scale is not None
    return meta


def save_artifact(
    artifact: TaskArtifact, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write atomically (temp file + rename); refuse to replace a file unless ``overwrite``."""
    return write_checked_file(
        path,
        artifact_tensors(artifact),
        artifact_meta(artifact),
        file_format=ARTIFACT_FORMAT,
        version=artifact_version(artifact),
        overwrite=overwrite,
    )


def load_artifact(path: str | os.PathLike) -> TaskArtifact:
    """Read and verify an artifact; any damage raises :class:`ArtifactError`."""
    meta, tensors = read_checked_file(
        path, file_format=ARTIFACT_FORMAT, version=FORMAT_VERSION, what="task artifact"
    )
    return artifact_from_parts(meta, tensors)


def artifact_from_parts(
    meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> TaskArtifact:
    """Rebuild an artifact from its stored metadata and tensors (files and bundles alike)."""

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    packed = group("mask/")
    scales = group("scale/")
    # Format 1 (fingerprint without scheme prefix) named masks by module; every masked
    # module then was a Conv2d or Linear, so its parameter name is ``<module>.weight``.
    legacy = not str(meta["fingerprint"]).startswith(f"{FINGERPRINT_SCHEME}:")
    masks = {
        f"{name}.weight" if legacy else name: PackedMask(
            data=packed[name],
            shape=tuple(info["shape"]),
            kind=info["kind"],
            encoding=info["encoding"],
            weight_shape=tuple(info["weight_shape"]) if "weight_shape" in info else None,
            scale=scales.get(name) if info.get("soft") else None,
        )
        for name, info in meta["masks"].items()
    }
    for name, mask in masks.items():
        try:
            mask.check()
        except ArtifactError as exc:
            raise ArtifactError(f"task {meta['task']!r}: mask for {name!r}: {exc}") from None
    return TaskArtifact(
        task=meta["task"],
        num_classes=meta["num_classes"],
        method=meta["method"],
        backbone=meta["backbone"],
        fingerprint=meta["fingerprint"],
        head=group("head/"),
        masks=masks,
        bn_state=group("bn/"),
        weights=group("weights/"),
        extra=group("extra/"),
        extra_meta=meta.get("extra") or {},
        class_names=meta.get("class_names"),
        threshold_fn=meta["threshold_fn"],
        threshold=meta["threshold"],
        config=meta.get("config"),
        metrics=meta.get("metrics") or {},
        prototype=tensors.get("prototype"),
        widened={str(k): int(v) for k, v in (meta.get("widened") or {}).items()},
    )


def check_fingerprint(artifact: TaskArtifact, backbone_fingerprint: str) -> None:
    if artifact.fingerprint != backbone_fingerprint:
        raise ArtifactError(
            f"task {artifact.task!r} was learned on a backbone with different weights "
            f"(artifact fingerprint {artifact.fingerprint[:12]}…, this backbone "
            f"{backbone_fingerprint[:12]}…). Load the '{artifact.backbone}' weights the task "
            "was trained on; masks applied to other weights give meaningless predictions."
        )


def verify_backbone(
    backbone: nn.Module,
    artifact: TaskArtifact,
    *,
    backbone_fingerprint: str | None = None,
    pretrained_bn: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse ``artifact`` unless it was learned on ``backbone``'s pretrained weights.

    Pass a precomputed ``backbone_fingerprint`` when switching tasks often (hashing a
    ResNet-50 costs ~0.1 s); ``pretrained_bn`` replaces the live BN state when hashing.
    """
    current = backbone_fingerprint or fingerprint(backbone, bn_state=pretrained_bn)
    check_fingerprint(artifact, fingerprint_for(artifact, backbone, current))
