"""The task artifact: everything one learned task needs, on top of a frozen backbone.

One safetensors file per task: packed masks, the head, BN state when BN was trained for the
task, full weights for the fine-tuning baseline, and JSON metadata. safetensors never
executes code on load. A SHA-256 digest over metadata and tensors catches tampering and
truncation; a fingerprint of the frozen backbone catches masks applied to other weights
(which would otherwise give silent garbage).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from piggyback.masks.packing import mask_kind, pack_mask, packed_size, unpack_mask
from piggyback.nn.convert import frozen_state_dict, masked_weights

ARTIFACT_FORMAT = "piggyback-task"
FORMAT_VERSION = 2
"""v2: masks named by parameter (``conv1.weight``), state fingerprint. v1 files still load."""
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class ArtifactError(ValueError):
    """An artifact cannot be read or does not fit the model it is applied to."""


MASK_ENCODINGS = ("bits", "rice")
"""``bits``: 1 bit per weight (2 for ternary masks). ``rice``: binary masks only, the gaps
between the minority symbol coded with block-adaptive Golomb-Rice (``masks/codec.py``), well
under 1 bit per weight on trained masks."""
_RENAMED_ENCODINGS = {"rle": "rice"}  # the old name: earlier artifacts and configs say it


def canonical_encoding(name: str) -> str:
    """The current name of a mask encoding; ``rle`` (the old name of ``rice``) still works."""
    name = _RENAMED_ENCODINGS.get(name, name)
    if name not in MASK_ENCODINGS:
        raise ValueError(
            f"unknown mask encoding {name!r}; choose one of {', '.join(MASK_ENCODINGS)}"
        )
    return name


@dataclass
class PackedMask:
    """One layer's mask as stored: ``data`` is uint8, ``encoding`` says how to decode it."""

    data: torch.Tensor
    shape: tuple[int, ...]
    kind: str = "binary"
    encoding: str = "bits"

    def __post_init__(self) -> None:
        # files and checkpoints written before the rename say "rle"; unknown names are left
        # for unpack() to refuse
        self.encoding = _RENAMED_ENCODINGS.get(self.encoding, self.encoding)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, kind: str = "binary", encoding: str = "bits"):
        encoding = canonical_encoding(encoding)
        if encoding == "bits":
            data = pack_mask(mask, kind)
        else:
            if kind != "binary":
                raise ValueError(f"the {encoding!r} encoding supports binary masks only")
            from piggyback.masks.codec import compress_mask

            data = torch.frombuffer(bytearray(compress_mask(mask)), dtype=torch.uint8)
        return cls(data=data, shape=tuple(mask.shape), kind=kind, encoding=encoding)

    def unpack(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The mask as a tensor of ``shape``; stored bytes that do not decode to exactly that
        shape raise :class:`ArtifactError` (whatever the bytes: the decoder is fuzzed)."""
        encoding = self.encoding  # an old name was already renamed in __post_init__
        if encoding not in MASK_ENCODINGS:
            raise ArtifactError(f"unknown mask encoding {encoding!r} (newer piggyback?)")
        if self.kind not in ("binary", "ternary") or (encoding == "rice" and self.kind != "binary"):
            raise ArtifactError(f"a {self.kind!r} mask cannot use the {encoding!r} encoding")
        if encoding == "bits":
            if self.data.numel() != packed_size(self.numel, self.kind):
                raise ArtifactError(
                    f"mask of shape {self.shape} has {self.data.numel()} bytes, "
                    f"expected {packed_size(self.numel, self.kind)} (truncated?)"
                )
            return unpack_mask(self.data, self.shape, self.kind, dtype)
        from piggyback.masks.codec import decompress_mask

        try:
            mask = decompress_mask(self.data.numpy().tobytes(), self.shape)
        except ValueError as exc:
            raise ArtifactError(f"mask of shape {self.shape}: {exc}") from None
        return mask if dtype is None else mask.to(dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


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

    @property
    def num_masked_weights(self) -> int:
        return sum(m.numel for m in self.masks.values())

    def unpacked_masks(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: m.unpack(dtype) for name, m in self.masks.items()}

    def mask_bytes(self) -> int:
        return sum(m.data.numel() for m in self.masks.values())

    def task_bytes(self) -> int:
        """Bytes this task adds on top of the shared backbone (tensor payload only)."""
        tensors = [
            *self.head.values(),
            *self.bn_state.values(),
            *self.weights.values(),
            *self.extra.values(),
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


FINGERPRINT_SCHEME = "state-v2"
"""Prefix of current fingerprints; artifacts without it carry the v1 (conv/linear) scheme."""


def _hash_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().data)


def fingerprint(backbone: nn.Module, *, bn_state: Mapping[str, torch.Tensor] | None = None) -> str:
    """SHA-256 of everything a task's predictions depend on in the frozen backbone.

    That is the whole state dict except the per-task masks: conv/linear/attention weights
    and biases, BatchNorm affine parameters *and running statistics* (two backbones with the
    same weights but other BN statistics predict differently), embeddings, LayerNorms.
    ``bn_state`` (the pretrained BN state) replaces the live BN tensors, so a backbone that
    currently runs a task with its own trained BN still fingerprints as the pretrained one.
    """
    digest = hashlib.sha256()
    state = frozen_state_dict(backbone)
    if bn_state is not None:
        state.update({k: v for k, v in bn_state.items() if k in state})
    for key, tensor in state.items():
        _hash_tensor(digest, key, tensor)
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"


def legacy_fingerprint(backbone: nn.Module) -> str:
    """The v1 fingerprint (format-1 artifacts): frozen ``nn.Conv2d``/``nn.Linear`` tensors only."""
    digest = hashlib.sha256()
    for name, module in backbone.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        for pname in ("weight", "bias"):
            tensor = module._parameters.get(pname)
            if tensor is not None:
                _hash_tensor(digest, f"{name}.{pname}", tensor)
    return digest.hexdigest()


def fingerprint_for(artifact: TaskArtifact, backbone: nn.Module, current: str | None = None) -> str:
    """The backbone's fingerprint in the scheme ``artifact`` was written with."""
    if not artifact.fingerprint.startswith(f"{FINGERPRINT_SCHEME}:"):
        return legacy_fingerprint(backbone)
    return current or fingerprint(backbone)


def bn_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Affine parameters and running statistics of every BatchNorm layer."""
    state: dict[str, torch.Tensor] = {}
    for name, module in backbone.named_modules():
        if isinstance(module, _BN_TYPES):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
    return state


def load_bn_state(backbone: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    modules = dict(backbone.named_modules())
    for full_key, value in state.items():
        name, _, key = full_key.rpartition(".")
        module = modules.get(name)
        if not isinstance(module, _BN_TYPES):
            raise ArtifactError(
                f"artifact has BN state for {name!r}, not a BatchNorm in this model"
            )
        target = module.state_dict()[key] if key in module.state_dict() else None
        if target is None or target.shape != value.shape:
            raise ArtifactError(f"BN state {full_key!r} does not fit this model")
        with torch.no_grad():
            target.copy_(value)


def pack_model_masks(backbone: nn.Module, encoding: str = "bits") -> dict[str, PackedMask]:
    """The current mask of every masked layer, packed.

    Binary masks are handed over as bool (``mask_real > threshold``): packing a bool tensor
    skips the alphabet checks a float mask needs, about 3x faster on a ResNet-50.
    """
    layers = list(masked_weights(backbone))
    if not layers:
        return {}
    kind = mask_kind(layers[0][1].threshold_fn)
    return {
        name: PackedMask.from_mask(
            layer.mask_real.detach() > layer.threshold if kind == "binary" else layer.mask(),
            kind,
            encoding,
        )
        for name, layer in layers
    }


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
    from types import SimpleNamespace

    from piggyback.methods import build_method

    method_obj = build_method(method, bn="train" if include_bn else "frozen")
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


def artifact_from_model(
    backbone: nn.Module,
    head: nn.Linear,
    parts: Any,
    *,
    task: str,
    backbone_name: str,
    method: str,
    backbone_fingerprint: str,
    class_names: list[str] | None = None,
    config: dict[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> TaskArtifact:
    """A task artifact from a method's :class:`~piggyback.methods.ArtifactParts`."""
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
    )


def artifact_tensors(artifact: TaskArtifact) -> dict[str, torch.Tensor]:
    tensors = {f"mask/{n}": m.data.contiguous() for n, m in artifact.masks.items()}
    tensors.update({f"head/{k}": v.contiguous() for k, v in artifact.head.items()})
    tensors.update({f"bn/{k}": v.contiguous() for k, v in artifact.bn_state.items()})
    tensors.update({f"weights/{k}": v.contiguous() for k, v in artifact.weights.items()})
    tensors.update({f"extra/{k}": v.contiguous() for k, v in artifact.extra.items()})
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
        "masks": {
            n: {"shape": list(m.shape), "kind": m.kind, "encoding": m.encoding}
            for n, m in artifact.masks.items()
        },
        "config": artifact.config,
        "metrics": artifact.metrics,
        "extra": artifact.extra_meta,
    }


def _digest(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_artifact(
    artifact: TaskArtifact, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write atomically (temp file + rename); refuse to replace a file unless ``overwrite``."""
    return write_checked_file(
        path,
        artifact_tensors(artifact),
        artifact_meta(artifact),
        file_format=ARTIFACT_FORMAT,
        version=FORMAT_VERSION,
        overwrite=overwrite,
    )


def write_checked_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    file_format: str,
    version: int,
    overwrite: bool = False,
) -> Path:
    """The one writer of piggyback files (artifacts and bundles): safetensors with a format
    tag, a version, JSON metadata and a digest; written to a temp file and then linked into
    place, so a crash never leaves half a file and an existing file is never clobbered."""
    from safetensors.torch import save_file

    from piggyback.atomic import atomic_write

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_json = json.dumps(meta, default=str)  # insertion order = network order
    metadata = {
        "format": file_format,
        "version": str(version),
        "meta": meta_json,
        "digest": _digest(meta_json, tensors),
    }
    atomic_write(
        path, lambda tmp: save_file(dict(tensors), tmp, metadata=metadata), overwrite=overwrite
    )
    return path


def read_checked_file(
    path: str | os.PathLike,
    *,
    file_format: str,
    version: int,
    what: str,
    format_hints: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a file written by :func:`write_checked_file`; any damage raises ArtifactError.

    ``what`` names the file kind in messages; ``format_hints`` maps another piggyback format
    to a hint (e.g. "use load_artifact") for files opened with the wrong loader.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types and OSError
        raise ArtifactError(
            f"{path} is not a readable piggyback {what} (truncated or corrupt?): {exc}"
        ) from None
    found = metadata.get("format")
    if found != file_format:
        hint = (format_hints or {}).get(found, "")
        raise ArtifactError(f"{path} is a safetensors file but not a piggyback {what}{hint}")
    try:
        found_version = int(metadata.get("version", "0"))
    except ValueError:
        raise ArtifactError(
            f"{path} has a damaged header: version {metadata.get('version')!r} is not a number"
        ) from None
    if found_version > version:
        raise ArtifactError(
            f"{path} uses {what} format v{metadata['version']}; this piggyback reads up to "
            f"v{version}. Upgrade piggyback."
        )
    meta_json = metadata.get("meta", "")
    if _digest(meta_json, tensors) != metadata.get("digest"):
        raise ArtifactError(f"{path} failed its integrity check: the file was modified or damaged")
    return json.loads(meta_json), tensors


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
    # Format 1 (fingerprint without scheme prefix) named masks by module; every masked
    # module then was a Conv2d or Linear, so its parameter name is ``<module>.weight``.
    legacy = not str(meta["fingerprint"]).startswith(f"{FINGERPRINT_SCHEME}:")
    masks = {
        f"{name}.weight" if legacy else name: PackedMask(
            data=packed[name],
            shape=tuple(info["shape"]),
            kind=info["kind"],
            encoding=info["encoding"],
        )
        for name, info in meta["masks"].items()
    }
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
    )


def check_fingerprint(artifact: TaskArtifact, backbone_fingerprint: str) -> None:
    if artifact.fingerprint != backbone_fingerprint:
        raise ArtifactError(
            f"task {artifact.task!r} was learned on a backbone with different weights "
            f"(artifact fingerprint {artifact.fingerprint[:12]}…, this backbone "
            f"{backbone_fingerprint[:12]}…). Load the '{artifact.backbone}' weights the task "
            "was trained on; masks applied to other weights give meaningless predictions."
        )


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
    current = backbone_fingerprint or fingerprint(backbone, bn_state=pretrained_bn)
    check_fingerprint(artifact, fingerprint_for(artifact, backbone, current))
    from piggyback.methods import method_class

    try:
        cls = method_class(artifact.method)
    except ValueError as exc:
        raise ArtifactError(f"task {artifact.task!r}: {exc} (newer piggyback?)") from None
    cls.apply(backbone, artifact, pretrained_bn)
    return artifact.build_head()


def load_masks(backbone: nn.Module, artifact: TaskArtifact) -> None:
    """Unpack ``artifact``'s masks into a masked backbone, checking names and shapes."""
    current = dict(masked_weights(backbone))
    if set(current) != set(artifact.masks):
        missing = sorted(set(current) ^ set(artifact.masks))[:5]
        raise ArtifactError(
            f"task {artifact.task!r} masks do not match this model's masked weights "
            f"(differences: {missing}); was it trained with another backbone or target list?"
        )
    for name, mask in current.items():
        packed = artifact.masks[name]
        if tuple(packed.shape) != tuple(mask.weight.shape):
            raise ArtifactError(
                f"task {artifact.task!r}: mask for {name!r} has shape {packed.shape}, "
                f"the weight has {tuple(mask.weight.shape)}"
            )
        try:
            mask.set_mask(packed.unpack(dtype=None))
        except ArtifactError as exc:
            raise ArtifactError(f"task {artifact.task!r}: mask for {name!r}: {exc}") from None
