"""Piggyback: a learned binary (or ternary) mask per task over frozen weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from piggyback.formats import TaskArtifact, load_masks, pack_model_masks
from piggyback.masks.stats import layer_sparsity, total_sparsity
from piggyback.methods.base import BN_TYPES, ArtifactParts, Method, TaskState
from piggyback.methods.hosts import InferenceHost, TrainingHost
from piggyback.nn import (
    get_masks,
    mask_model,
    mask_parameters,
    masked_weights,
    reset_masks,
    scale_parameters,
)


class Piggyback(Method):
    """Masks (and, with ``bn="train"``, task-specific BN) train; W never changes.

    ``mask`` (config ``method.mask``) holds mask options that belong to the method and win
    over the ``mask`` group, e.g. KSM's ``granularity: kernel`` and ``soft: true``.

    ``warmup_epochs`` / ``warmup_steps``: a head warm-up (linear probing before fine-tuning):
    until both have passed, the backbone runs frozen (eval mode, no gradient), so only the
    new head trains and every mask stays exactly at its init. Without it, Adam moves every
    mask by about the learning rate per step, so at a few times the paper's rate the first
    masks reach the threshold within ~20 steps, steered by a head that is still random, and
    the run can collapse to a constant output (docs/methods.md, "Learning-rate sweep"). Both
    0 is the paper's recipe.
    """

    name = "piggyback"
    default_lr = {"masks": 1e-4, "head": 1e-4, "bn": 1e-4}
    default_mask: dict[str, Any] = {}

    def __init__(
        self,
        *,
        mask: Mapping[str, Any] | None = None,
        warmup_epochs: int = 0,
        warmup_steps: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.mask = {**self.default_mask, **dict(mask or {})}
        if warmup_epochs < 0 or warmup_steps < 0:
            raise ValueError(
                "method.warmup_epochs and method.warmup_steps must be >= 0, "
                f"got {warmup_epochs} and {warmup_steps}"
            )
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_steps = int(warmup_steps)
        self.warming_up = False

    @property
    def backbone_frozen(self) -> bool:
        return self.warming_up

    def _update_warmup(self, module: TrainingHost) -> None:
        """Warm-up state from the trainer's progress (so a resumed run gets it right too)."""
        trainer = module.trainer
        warming = (
            trainer.current_epoch < self.warmup_epochs or trainer.global_step < self.warmup_steps
        )
        if warming != self.warming_up:
            self.warming_up = warming
            module.train()  # re-applies the frozen modes (BN eval) for the new state

    def on_train_epoch_start(self, module: TrainingHost) -> None:
        self._update_warmup(module)

    def on_train_end(self, module: TrainingHost) -> None:
        self.warming_up = False  # inference and later tasks see the trained backbone

    def prepare_backbone(self, module: TrainingHost, mask_options: Mapping[str, Any]) -> None:
        mask_model(module.backbone, **{**mask_options, **self.mask})
        self.freeze(module)

    def freeze(self, module: TrainingHost) -> None:
        for sub in module.backbone.modules():
            for pname, param in sub.named_parameters(recurse=False):
                if pname in ("mask_real", "soft_scale"):
                    param.requires_grad_(True)
                else:
                    param.requires_grad_(self.trains_bn and isinstance(sub, BN_TYPES))

    def backbone_groups(self, module: TrainingHost) -> list[dict[str, Any]]:
        masks = {"name": "masks", "params": list(mask_parameters(module.backbone))}
        masks["lr"] = self.lr["masks"]
        scales = {"name": "scales", "params": list(scale_parameters(module.backbone))}
        # Soft (KSM) scales are real multipliers, not thresholded: they follow lr_scale.
        follow = 1.0 if self.scale_mask_lr else self.lr_scale  # masks' lr: scaled already?
        scales["lr"] = self.lr.get("scales", self.lr["masks"] * follow)
        return [masks, scales, *super().backbone_groups(module)]

    # ------------------------------------------------------------------ tasks
    def start_task(self, module: TrainingHost, task: str) -> None:
        reset_masks(module.backbone, module.mask_cfg["mask_init"], module.mask_cfg["mask_scale"])
        super().start_task(module, task)

    @staticmethod
    def _versions(module: TrainingHost) -> list[tuple[int, int | None]]:
        return [
            (mask.mask_real._version, None if mask.soft_scale is None else mask.soft_scale._version)
            for _, mask in masked_weights(module.backbone)
        ]

    def on_train_batch_end(self, module: TrainingHost) -> None:
        # A fused optimizer updates mask_real in place without bumping its version counter,
        # so a training step must mark the packed copy stale explicitly.
        module.tasks[module.task].stored.pop("versions", None)
        if self.warming_up:
            self._update_warmup(module)

    def store_task(self, module: TrainingHost, state: TaskState) -> None:
        """Pack the masks (1 bit per weight), skipping the work when nothing changed (no
        training step and no in-place write since the last pack)."""
        versions = self._versions(module)
        if "masks" not in state.stored or state.stored.get("versions") != versions:
            state.stored["masks"] = pack_model_masks(module.backbone)
            state.stored["versions"] = versions
        super().store_task(module, state)

    def activate_task(self, module: TrainingHost, state: TaskState) -> None:
        packed = state.stored["masks"]
        for name, mask in masked_weights(module.backbone):
            mask.set_mask(packed[name].unpack(dtype=None), packed[name].scale)
        super().activate_task(module, state)
        state.stored["versions"] = self._versions(module)

    def epoch_metrics(self, module: TrainingHost) -> dict[str, float]:
        masks = get_masks(module.backbone, per_weight=True)  # weights, not mask units
        metrics = {"masks/zeros": total_sparsity(masks)}
        if module.log_layer_sparsity:
            per_layer = layer_sparsity(masks)
            metrics.update({f"masks/zeros/{name}": value for name, value in per_layer.items()})
        return metrics

    # --------------------------------------------------------------- artifacts
    def export(self, module: TrainingHost, encoding: str) -> ArtifactParts:
        parts = super().export(module, encoding)
        parts.masks = pack_model_masks(module.backbone, encoding)
        if not parts.masks:
            raise ValueError("method 'piggyback' needs a masked backbone (see mask_model)")
        return parts

    @classmethod
    def apply(
        cls,
        backbone: nn.Module,
        artifact: TaskArtifact,
        pretrained_bn: Mapping[str, torch.Tensor] | None,
    ) -> None:
        load_masks(backbone, artifact.masks, artifact.task)
        super().apply(backbone, artifact, pretrained_bn)

    @classmethod
    def attach(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        model.ensure_masked(artifact)

    @classmethod
    def superposition_masks(cls, artifact: TaskArtifact) -> dict[str, torch.Tensor] | None:
        return {name: packed.unpack(torch.int8) for name, packed in artifact.masks.items()}

    @classmethod
    def activate(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        for _, mask in masked_weights(model.backbone):  # binary and ternary tasks may mix
            mask.threshold, mask.threshold_fn = artifact.threshold, artifact.threshold_fn
        super().activate(model, artifact)
