"""One frozen backbone serving any number of learned tasks, and the bundle file that ships it.

Piggyback's point is that N tasks cost one backbone plus ~1 bit per weight per task. This
module makes that concrete at inference time: :class:`MultiTaskModel` holds the pretrained
backbone once and every task's artifact (packed masks, head, BN state); ``model(x,
task="cubs")`` swaps in that task's mask and BN state (never reloading the backbone) and
applies its head. A batch holds one task; :meth:`MultiTaskModel.predict_mixed` groups a
mixed request list by task so each task is switched to once. Inputs without a task label:
:meth:`MultiTaskModel.infer_task` and :meth:`MultiTaskModel.predict` find the task with a
strategy of ``piggyback.taskinfer`` (entropy, max_prob, SupSup's oneshot, prototype).

A *bundle* (``save_bundle``/``load_bundle``) is one safetensors file (never pickle) holding
the backbone weights once and every task, so a deployment needs a single file and no
download. Sizes: a piggyback task adds its packed masks (1 bit per masked weight, or less
with the ``rice`` encoding) + head (+ BN state when trained); a ``classifier_only`` task adds
its head only; a ``finetune`` task has no mask to apply, so it is stored and run as its own
complete network: it adds the *full* backbone weights (float32, as large as the backbone
itself, e.g. ~94 MB for ResNet-50) and, once loaded, a full network's memory.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from piggyback.backbones import build_backbone
from piggyback.formats import (
    BUNDLE_FORMAT,
    FINGERPRINT_SCHEME,
    ArtifactError,
    TaskArtifact,
    bn_state_dict,
    fingerprint,
    legacy_fingerprint,
    load_artifact,
    load_bn_state,
    read_bundle,
    verify_backbone,
    write_bundle,
)
from piggyback.methods import apply_artifact, artifact_method
from piggyback.models.storage import (
    architecture_bytes,
    layer_order,
    masks_in_network_order,
    state_bytes,
    storage_summary,
)
from piggyback.nn.convert import (
    MaskingError,
    frozen_state_dict,
    mask_model,
    masked_weights,
    unmask_model,
)
from piggyback.taskinfer import PER_CHOICES, Prediction, Strategy
from piggyback.taskinfer import infer_task as _infer_task
from piggyback.taskinfer import predict as _predict
from piggyback.utils.inputs import Inputs, move_inputs, stack_inputs

__all__ = [
    "BUNDLE_FORMAT",
    "MultiTaskModel",
    "architecture_bytes",
    "group_by_task",
    "layer_order",
    "load_bundle",
    "masks_in_network_order",
    "save_bundle",
    "state_bytes",
    "storage_summary",
]


# ------------------------------------------------------------------------- helpers
def group_by_task(tasks: Iterable[str]) -> dict[str, list[int]]:
    """``{task: [positions]}`` in order of first appearance.

    One entry per task means one mask switch per task however the requests are interleaved.
    """
    groups: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task, []).append(i)
    return groups


# ------------------------------------------------------------------------- the model
class MultiTaskModel(nn.Module):
    """A frozen backbone plus any number of task artifacts; ``model(x, task=...)`` predicts.

    Build it from the *pretrained* backbone (classifier stripped, e.g.
    ``build_backbone(...).model``), masked or not. Its fingerprint and BN statistics are taken
    once here: every artifact is checked against that fingerprint, and tasks that did not
    train BN run with those statistics. It is an inference container (eval mode, no
    gradients on the shared weights); learning happens in ``PiggybackModule``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        backbone_name: str,
        *,
        pretrained_bn: Mapping[str, torch.Tensor] | None = None,
        backbone_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name
        self.fingerprint = backbone_fingerprint or fingerprint(backbone)
        self.pretrained_bn = dict(pretrained_bn or bn_state_dict(backbone))
        self.heads = nn.ModuleDict()
        # finetune tasks: each is its own network (no mask can express moved weights)
        self.finetuned = nn.ModuleDict()
        # networks and state that a method shares between its tasks (PackNet's one network)
        self.method_networks = nn.ModuleDict()
        self.method_state: dict[str, Any] = {}
        self._artifacts: dict[str, TaskArtifact] = {}
        self._loaded: str | None = None  # task whose masks/BN the shared backbone holds
        self.task: str | None = None
        self.inference_cache: dict[str, Any] = {}  # task inference (mask stacks); per task set
        self.requires_grad_(False)
        self.eval()

    # -------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[str]:
        return list(self._artifacts)

    def artifact(self, task: str) -> TaskArtifact:
        return self._artifacts[self._known(task)]

    def _known(self, task: str) -> str:
        if task not in self._artifacts:
            raise KeyError(f"unknown task {task!r}; this model has {self.tasks}")
        return task

    def _device(self) -> torch.device:
        return next(iter(self.backbone.parameters()), torch.empty(0)).device

    def train(self, mode: bool = True) -> MultiTaskModel:
        """Always eval: train-mode BN would overwrite the statistics every task shares."""
        return super().train(False)

    def ensure_masked(self, artifact: TaskArtifact) -> None:
        """Mask exactly the layers the artifact masks (the first piggyback task decides)."""
        layers = dict(masked_weights(self.backbone))
        if not layers:
            try:
                mask_model(
                    self.backbone,
                    threshold=artifact.threshold,
                    threshold_fn=artifact.threshold_fn,
                    target=list(artifact.masks),
                )
            except MaskingError as exc:
                raise ArtifactError(
                    f"task {artifact.task!r} does not fit this model: {exc}"
                ) from None
            self.backbone.requires_grad_(False)
            layers = dict(masked_weights(self.backbone))
            self._loaded = None  # new mask buffers: whatever was loaded must be re-applied
        if set(layers) != set(artifact.masks):
            diff = sorted(set(layers) ^ set(artifact.masks))[:5]
            raise ArtifactError(
                f"task {artifact.task!r} masks other layers than the tasks already in this "
                f"model (differences: {diff}). Tasks trained with different mask.exclude "
                "settings cannot share one backbone; put them in separate models."
            )
        for name, layer in layers.items():
            # weight_shape: masks of any granularity gate a weight of this shape (family)
            if tuple(artifact.masks[name].weight_shape) != tuple(layer.weight.shape):
                raise ArtifactError(
                    f"task {artifact.task!r}: mask for {name!r} was learned for a weight of "
                    f"shape {tuple(artifact.masks[name].weight_shape)}, the layer's weight has "
                    f"{tuple(layer.weight.shape)}"
                )

    def separate_network(self, artifact: TaskArtifact | None) -> nn.Module:
        """A network of its own, built from the pristine backbone (fine-tuned tasks, PackNet).

        With an artifact, that artifact is applied to it (its weights loaded).
        """
        net = unmask_model(copy.deepcopy(self.backbone))
        load_bn_state(net, self.pretrained_bn)
        if artifact is not None:
            apply_artifact(net, artifact, backbone_fingerprint=self.fingerprint)
        return net.requires_grad_(False).eval()

    def add_task(self, artifact: TaskArtifact | str | os.PathLike, *, replace: bool = False) -> str:
        """Add a task (an artifact or its file); returns its name.

        Refuses artifacts learned on other backbone weights (fingerprint mismatch): their
        masks would give meaningless predictions on this backbone.
        """
        if not isinstance(artifact, TaskArtifact):
            artifact = load_artifact(artifact)
        method = artifact_method(artifact)
        if artifact.task in self._artifacts and not replace:
            raise ArtifactError(
                f"task {artifact.task!r} is already in this model; pass replace=True to swap "
                "it, or keep the two versions in separate models"
            )
        verify_backbone(self.backbone, artifact, backbone_fingerprint=self.fingerprint)
        if artifact.task in self.finetuned:
            del self.finetuned[artifact.task]
        method.attach(self, artifact)
        head = artifact.build_head().to(self._device())
        self.heads[artifact.task] = head.requires_grad_(False)
        self._artifacts[artifact.task] = artifact
        self.inference_cache.clear()
        if self._loaded == artifact.task:
            self._loaded = None
        if self.task == artifact.task:
            self.task = None
            self.set_task(artifact.task)
        return artifact.task

    def remove_task(self, task: str) -> None:
        self._known(task)
        del self._artifacts[task], self.heads[task]
        self.inference_cache.clear()
        if task in self.finetuned:
            del self.finetuned[task]
        if self.task == task:
            self.task = None
        if self._loaded == task:
            self._loaded = None

    @torch.no_grad()
    def set_task(self, task: str) -> None:
        """Swap in ``task``'s masks, head and BN state; the backbone weights stay in place."""
        artifact = self.artifact(task)
        self.task = task
        if self._loaded == task:
            return
        artifact_method(artifact).activate(self, artifact)
        self._loaded = task

    # -------------------------------------------------------------- inference
    def forward(self, x: Inputs, task: str | None = None) -> torch.Tensor:
        """Logits of ``task`` (default: the current task) for a batch of that one task (an
        image tensor, or the mapping of tensors a text backbone takes)."""
        if task is not None:
            self.set_task(task)
        if self.task is None:
            raise RuntimeError(
                f"no task selected: call model(x, task=...) with one of {self.tasks}"
            )
        net = artifact_method(self.artifact(self.task)).network(self, self.task)
        return self.heads[self.task](net(x))

    @torch.no_grad()
    def predict_mixed(
        self,
        requests: Sequence[tuple[Inputs, str]],
        *,
        batch_size: int = 64,
        return_logits: bool = False,
    ) -> list[Any]:
        """Predictions for ``[(image, task), ...]`` in the requests' order.

        Images are ``[C, H, W]``; a text request is a mapping of ``[length]`` tensors (padded
        to the longest of its batch with 0). Requests are grouped by task (one switch per task) and
        batched; the result holds a class index per request, or its logits (tasks have
        different numbers of classes, so these are a list, not one tensor).
        """
        out: list[Any] = [None] * len(requests)
        device = self._device()
        for task, positions in group_by_task(t for _, t in requests).items():
            self.set_task(task)
            for start in range(0, len(positions), batch_size):
                chunk = positions[start : start + batch_size]
                x = move_inputs(stack_inputs([requests[i][0] for i in chunk]), device)
                logits = self(x)
                values = logits.cpu() if return_logits else logits.argmax(dim=1).tolist()
                for i, value in zip(chunk, values, strict=True):
                    out[i] = value
        return out

    # -------------------------------------------------------------- task inference
    def infer_task(
        self, x: Inputs, strategy: str | Strategy = "entropy", per: str = "batch"
    ) -> str | list[str]:
        """The task of unlabeled inputs ``x``: one name for the batch (``per="batch"``,
        SupSup's setting) or one per input (``per="sample"``, a mixed stream).

        ``strategy``: ``entropy`` | ``max_prob`` | ``oneshot`` | ``prototype`` (see
        ``piggyback.taskinfer``). The current task is left as it was.
        """
        if per not in PER_CHOICES:
            raise ValueError(f"per must be one of {PER_CHOICES}, got {per!r}")
        current = self.task
        try:
            return _infer_task(self, x, strategy, per)
        finally:
            self._restore(current)

    def predict(
        self, x: Inputs, strategy: str | Strategy = "entropy", per: str = "sample"
    ) -> list[Prediction]:
        """``(task, label)`` for every input of ``x`` without task labels: the task from
        ``strategy`` (per input by default), the class from that task's network."""
        current = self.task
        try:
            return _predict(self, x, strategy, per)
        finally:
            self._restore(current)

    def _restore(self, task: str | None) -> None:
        """Back to ``task`` after task inference switched the backbone between tasks."""
        if task is None:
            self.task = None
        elif task in self._artifacts:
            self.set_task(task)

    # -------------------------------------------------------------- storage
    def backbone_bytes(self) -> int:
        return state_bytes(frozen_state_dict(self.backbone))

    def storage(self) -> dict[str, Any]:
        return storage_summary(list(self._artifacts.values()), self.backbone_bytes())

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """Backbone weights with the pretrained BN statistics, whatever task is loaded."""
        state = frozen_state_dict(self.backbone)
        for key, value in self.pretrained_bn.items():
            state[key] = value
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        return save_bundle(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu"):
        return load_bundle(path, map_location=map_location)

    @classmethod
    def from_artifacts(
        cls,
        artifacts: Iterable[TaskArtifact | str | os.PathLike],
        backbone: nn.Module,
        backbone_name: str | None = None,
    ) -> MultiTaskModel:
        """Convenience: ``MultiTaskModel(backbone)`` plus ``add_task`` for each artifact."""
        loaded = [a if isinstance(a, TaskArtifact) else load_artifact(a) for a in artifacts]
        name = backbone_name or (loaded[0].backbone if loaded else "unknown")
        model = cls(backbone, name)
        for artifact in loaded:
            model.add_task(artifact)
        return model


# ------------------------------------------------------------------------- bundle file
def save_bundle(model: MultiTaskModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write backbone (once) + every task into one safetensors file, atomically.

    Refuses to replace an existing file unless ``overwrite``. A SHA-256 digest over metadata
    and tensors lets :func:`load_bundle` reject damaged files.
    """
    return write_bundle(
        path,
        backbone_name=model.backbone_name,
        backbone_fingerprint=model.fingerprint,
        backbone_state=model.pretrained_state(),
        artifacts=[model.artifact(task) for task in model.tasks],
        overwrite=overwrite,
    )


def _build_options(meta: Mapping[str, Any], artifacts: list[TaskArtifact]) -> dict[str, Any]:
    """How the tasks' runs built the backbone beyond its name (source, builder kwargs such as
    a timm model's ``in_chans`` or a ViT's ``img_size``, a ``_target_`` model), from the run
    config the artifacts carry; the weights themselves come from the bundle."""
    for artifact in artifacts:
        built = (artifact.config or {}).get("backbone")
        if isinstance(built, Mapping) and built.get("name") == meta["backbone"]:
            keys = ("source", "classifier", "model", "kwargs")
            return {k: built[k] for k in keys if built.get(k) is not None}
    return {}


def load_bundle(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> MultiTaskModel:
    """Rebuild the multi-task model from a bundle; no download, no pickle."""
    meta, state, artifacts = read_bundle(path)
    backbone = build_backbone(meta["backbone"], weights=None, **_build_options(meta, artifacts))
    backbone = backbone.model
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{path}: backbone weights do not fit {meta['backbone']!r}: {exc}"
        ) from None
    backbone = backbone.to(map_location)
    model = MultiTaskModel(backbone, meta["backbone"])
    recorded = str(meta["fingerprint"])
    current = (
        model.fingerprint
        if recorded.startswith(f"{FINGERPRINT_SCHEME}:")
        else legacy_fingerprint(backbone)  # a format-1 bundle
    )
    if current != recorded:
        raise ArtifactError(f"{path}: backbone weights do not match the recorded fingerprint")
    for artifact in artifacts:
        model.add_task(artifact)
    return model
