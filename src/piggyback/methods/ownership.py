"""Weight ownership: the machinery PackNet and CPG share.

Both methods run every task on one network whose weights are *owned*: the pretrained task is
owner 0, task ``t`` of the sequence owns the weights it trained and kept, and pruned weights
are :data:`FREE` (zero) until the next task claims them. Owned weights are frozen for good, so
an earlier task never changes. This module holds the owner index (its packed codes in an
artifact, with the values a task owns), per-layer magnitude pruning, the gradient rule that
only the current task's weights learn, and the multi-task model's one shared network. The two
methods differ in which earlier weights a task uses (PackNet: all of them; CPG: a learned pick
mask) and in how much they prune; they override :meth:`OwnedWeights.task_mask` and the hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from piggyback.formats import ArtifactError, ArtifactParts, TaskArtifact
from piggyback.methods.base import BN_TYPES, Method
from piggyback.methods.hosts import (
    InferenceHost,
    TrainingHost,
    sequence_state,
    untouched_backbone_error,
)
from piggyback.nn import mask_model, masked_weights
from piggyback.nn.widen import widen

FREE = 255
"""Owner code of a pruned weight that no task owns (yet)."""
RESERVED = 254
"""Owner code of a weight of a hidden unit added for growth that no task has claimed yet
(CPG's growth reserve): read as zero by every task, never trained, never freed."""


def owner_bits(num_tasks: int) -> int:
    """Bits per weight of an owner index over tasks ``0..num_tasks`` plus "free"."""
    needed = max(1, math.ceil(math.log2(num_tasks + 2)))
    return next(b for b in (1, 2, 4, 8) if b >= needed)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Small integers (< 2**bits) packed ``8 // bits`` to a byte, as uint8."""
    flat = codes.reshape(-1).to(torch.uint8)
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (flat << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(data: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    codes = (data.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel]


def prune_smallest(weight: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` ``candidates`` with the smallest |weight|."""
    pruned = torch.zeros_like(candidates)
    count = min(count, int(candidates.sum()))
    if count <= 0:
        return pruned
    magnitudes = weight.detach().abs().masked_fill(~candidates, float("inf")).reshape(-1)
    pruned.view(-1)[torch.topk(magnitudes, count, largest=False).indices] = True
    return pruned


def prune_fraction(weight: torch.Tensor, candidates: torch.Tensor, fraction: float):
    """Boolean mask of the ``fraction`` of ``candidates`` with the smallest |weight|."""
    return prune_smallest(weight, candidates, int(round(fraction * int(candidates.sum()))))


class OwnedWeights(Method):
    """One network, tasks in order, each weight owned by one task (or free). Not registered."""

    #: the mask options this method passes to ``mask_model`` (PackNet needs no threshold)
    mask_option_keys: tuple[str, ...] = ("target", "exclude")

    def __init__(
        self,
        *,
        first_task_trains_pretrained: bool = True,
        initial_prune: float = 0.0,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not 0.0 <= initial_prune < 1.0:
            raise ValueError(f"{self.name} initial_prune must be in [0, 1), got {initial_prune}")
        if first_task_trains_pretrained and initial_prune > 0:
            raise ValueError(
                f"{self.name}: first_task_trains_pretrained=true gives the first task every "
                "pretrained weight, so there is nothing to prune before it; set "
                "method.initial_prune=0 or method.first_task_trains_pretrained=false"
            )
        if weight_decay < 0:
            raise ValueError(f"{self.name} weight_decay must be >= 0, got {weight_decay}")
        #: the first task owns (and fine-tunes from their pretrained values) every weight,
        #: the reading of the reference's "ImageNet is task 0, pruned and retrained" when no
        #: ImageNet data is at hand; false: the pretrained weights stay frozen as task 0
        self.first_task_trains_pretrained = bool(first_task_trains_pretrained)
        self.initial_prune = float(initial_prune)
        #: L2 decay on the current task's own weights only (applied to their gradient, as the
        #: reference's ``do_weight_decay_and_make_grads_zero``); an optimizer's weight_decay
        #: would also move the weights earlier tasks own
        self.weight_decay = float(weight_decay)
        self.owners: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # task names; task i+1 of the sequence is order[i]
        #: hidden units added per block before masking (``piggyback.nn.widen``; CPG grows)
        self.widened: dict[str, int] = {}

    # ------------------------------------------------------------ the backbone
    def prepare_backbone(self, module: TrainingHost, mask_options: Mapping[str, Any]) -> None:
        from_cfg = {k: mask_options[k] for k in self.mask_option_keys if k in mask_options}
        mask_model(module.backbone, **from_cfg)
        self.owners = {
            name: torch.zeros(mask.weight.shape, dtype=torch.uint8)
            for name, mask in masked_weights(module.backbone)
        }
        self.freeze(module)

    def freeze(self, module: TrainingHost) -> None:
        module.backbone.requires_grad_(False)
        for _, mask in masked_weights(module.backbone):
            mask.weight.requires_grad_(True)  # trained through the task's fixed mask
        if self.trains_bn:
            for sub in module.backbone.modules():
                if isinstance(sub, BN_TYPES):
                    sub.requires_grad_(True)

    def backbone_groups(self, module: TrainingHost) -> list[dict[str, Any]]:
        weights = [mask.weight for _, mask in masked_weights(module.backbone)]
        lr = self.lr["backbone"]
        # No weight decay: it would move weights that earlier tasks own.
        groups = [{"name": "backbone", "params": weights, "lr": lr, "weight_decay": 0.0}]
        return groups + super().backbone_groups(module)

    # ------------------------------------------------------------------ tasks
    def _index(self, task: str) -> int:
        return self.order.index(task) + 1

    def owned(self, index: int) -> int:
        """How many masked weights task ``index`` owns."""
        return sum(int((o == index).sum()) for o in self.owners.values())

    @torch.no_grad()
    def free(self, module: TrainingHost, owner: int, fraction: float) -> None:
        """Prune ``fraction`` of ``owner``'s weights, per layer, by magnitude: zero and free."""
        for name, mask in masked_weights(module.backbone):
            owned = self.owners[name] == owner
            self._release(mask, name, prune_fraction(mask.weight.cpu(), owned, fraction))

    @torch.no_grad()
    def _release(self, mask: nn.Module, name: str, pruned: torch.Tensor) -> None:
        self.owners[name][pruned] = FREE
        mask.weight[pruned.to(mask.weight.device)] = 0.0

    def start_owning(self, module: TrainingHost, index: int) -> None:
        """Task ``index`` begins: it takes the free weights (and, as the first task, every
        pretrained weight or, with ``initial_prune``, the smallest of them, zeroed)."""
        if index == 1 and self.first_task_trains_pretrained:
            for owners in self.owners.values():
                owners[owners == 0] = index  # values kept: fine-tuned from the pretrained ones
        elif index == 1 and self.initial_prune > 0:
            self.free(module, 0, self.initial_prune)  # room in the pretrained network
        self.claim_free(module, index)

    @torch.no_grad()
    def claim_free(self, module: TrainingHost, index: int) -> None:
        """Task ``index`` takes every free weight; new weights start from zero."""
        self.zero_free(module)
        for owners in self.owners.values():
            owners[owners == FREE] = index

    @torch.no_grad()
    def zero_free(self, module: TrainingHost) -> None:
        for name, mask in masked_weights(module.backbone):
            mask.weight[(self.owners[name] == FREE).to(mask.weight.device)] = 0.0

    def on_after_backward(self, module: TrainingHost) -> None:
        """Only the current task's weights learn; earlier tasks' stay exactly as they were."""
        index = self._index(module.task)
        for name, mask in masked_weights(module.backbone):
            grad = mask.weight.grad
            if grad is not None:
                if self.weight_decay:
                    grad.add_(mask.weight.detach(), alpha=self.weight_decay)
                # where, not a multiply: 0 * nan is nan, and earlier weights must never move
                own = (self.owners[name] == index).to(grad.device)
                torch.where(own, grad, torch.zeros((), dtype=grad.dtype), out=grad)

    def checkpoint_state(self, module: TrainingHost) -> dict[str, Any]:
        return {"owners": self.owners, "order": self.order}

    def load_checkpoint_state(self, module: TrainingHost, state: dict[str, Any]) -> None:
        self.owners = state["owners"]
        self.order = list(state["order"])

    # --------------------------------------------------------------- artifacts
    def export_ownership(self, module: TrainingHost, parts: ArtifactParts, index: int) -> None:
        """Owner index (packed) + the values of the weights task ``index`` owns."""
        bits = owner_bits(index)
        shapes = {}
        for name, mask in masked_weights(module.backbone):
            owners = self.owners[name].clone()
            owners[owners > index] = FREE  # later tasks do not exist for this artifact
            codes = torch.where(owners == FREE, torch.full_like(owners, index + 1), owners)
            parts.extra[f"owner/{name}"] = pack_codes(codes, bits)
            weight = mask.weight.detach().cpu()
            parts.extra[f"values/{name}"] = weight[owners == index].clone()
            shapes[name] = list(weight.shape)
        parts.extra_meta = {
            **(parts.extra_meta or {}),
            "index": index,
            "previous_tasks": self.order[: index - 1],
            "owner_bits": bits,
            "shapes": shapes,
        }
        parts.widened = dict(self.widened)

    @staticmethod
    def owners_of(artifact: TaskArtifact) -> dict[str, torch.Tensor]:
        """The artifact's owner index, with "free" as :data:`FREE`."""
        meta = artifact.extra_meta
        index, bits = meta["index"], meta["owner_bits"]
        out = {}
        for name, shape in meta["shapes"].items():
            numel = math.prod(shape)
            codes = unpack_codes(artifact.extra[f"owner/{name}"], numel, bits).reshape(shape)
            out[name] = torch.where(codes == index + 1, torch.full_like(codes, FREE), codes)
        return out

    @classmethod
    def apply(
        cls,
        backbone: nn.Module,
        artifact: TaskArtifact,
        pretrained_bn: Mapping[str, torch.Tensor] | None,
    ) -> None:
        why = "its weights are the pretrained ones pruned and retrained by every task before it"
        raise untouched_backbone_error(cls.__name__, artifact, why)

    # ------------------------------------------------------ multi-task model
    @classmethod
    def task_mask(
        cls, name: str, owners: torch.Tensor, index: int, artifact: TaskArtifact
    ) -> torch.Tensor:
        """The 0/1 mask with which task ``index`` reads layer ``name`` (all earlier weights)."""
        return owners <= index

    @classmethod
    def attach(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        """Add task ``t``'s weights to the model's one shared network (tasks in order)."""
        state = sequence_state(model, cls.name, cls.__name__, artifact)
        widened = state.setdefault("widened", artifact.widened)
        if widened != artifact.widened:
            raise ArtifactError(
                f"{cls.__name__} task {artifact.task!r} was learned on a backbone widened by "
                f"{artifact.widened}, this model's tasks on one widened by {widened}: they "
                "are not from the same sequence"
            )
        owners = cls.owners_of(artifact)
        if cls.name not in model.method_networks:
            net = model.separate_network(None)
            widen(net, artifact.widened)  # the units a growing method added, all tasks' width
            mask_model(net, target=list(owners))
            net.requires_grad_(False)
            model.method_networks[cls.name] = net
        net = model.method_networks[cls.name]
        index = artifact.extra_meta["index"]
        with torch.no_grad():
            for name, mask in masked_weights(net):
                own = owners[name].to(mask.weight.device) == index
                mask.weight[own] = artifact.extra[f"values/{name}"].to(mask.weight)
                mask.weight[owners[name].to(mask.weight.device) == FREE] = 0.0
        state["tasks"].append(artifact.task)
        state.setdefault("owners", {})[artifact.task] = owners

    @classmethod
    def activate(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        net = model.method_networks[cls.name]
        owners = model.method_state[cls.name]["owners"][artifact.task]
        index = artifact.extra_meta["index"]
        with torch.no_grad():
            for name, mask in masked_weights(net):
                keep = cls.task_mask(name, owners[name], index, artifact)
                mask.set_mask(keep.to(mask.mask_real.device))
        Method.apply(net, artifact, model.pretrained_bn)

    @classmethod
    def network(cls, model: InferenceHost, task: str) -> nn.Module:
        return model.method_networks[cls.name]
