"""PackNet (Mallya & Lazebnik, CVPR 2018): tasks packed into one network by pruning.

The pretrained network is task 0. Each new task trains the weights that are still free,
then prunes a fraction of them by magnitude, retrains briefly, and freezes what it kept.
Task ``t`` runs with the weights owned by tasks ``0..t`` (later tasks' weights masked off),
so it never changes after it is learned. Storage: one network, a per-weight owner index and
the heads. Built on the mask machinery: the owner index becomes a fixed 0/1 mask per task,
and the weights train through it (``dW = dW_eff * M``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from piggyback.formats import ArtifactError, TaskArtifact
from piggyback.methods.base import BN_TYPES, ArtifactParts, Method, TaskState
from piggyback.methods.hosts import InferenceHost, TrainingHost
from piggyback.nn import mask_model, masked_weights

FREE = 255
"""Owner code of a pruned weight that no task owns (yet)."""


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


def _prune_smallest(weight: torch.Tensor, candidates: torch.Tensor, fraction: float):
    """Boolean mask of the ``fraction`` of ``candidates`` with the smallest |weight|."""
    count = int(round(fraction * int(candidates.sum())))
    pruned = torch.zeros_like(candidates)
    if count <= 0:
        return pruned
    magnitudes = weight.detach().abs().masked_fill(~candidates, float("inf")).reshape(-1)
    pruned.view(-1)[torch.topk(magnitudes, count, largest=False).indices] = True
    return pruned


class PackNet(Method):
    """Prune-and-freeze continual learning on one network, in a fixed task order."""

    name = "packnet"
    default_lr = {"backbone": 1e-3, "head": 1e-3}
    default_optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}
    may_forget = False
    superposable = False  # W itself changes per task: no masks over one frozen W

    def __init__(
        self,
        *,
        prune: float = 0.5,
        initial_prune: float = 0.5,
        retrain_epochs: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        for label, value in (("prune", prune), ("initial_prune", initial_prune)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"packnet {label} must be in [0, 1), got {value}")
        if retrain_epochs < 0:
            raise ValueError(f"packnet retrain_epochs must be >= 0, got {retrain_epochs}")
        self.prune = prune
        self.initial_prune = initial_prune
        self.retrain_epochs = retrain_epochs
        self.owners: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # task names; task i+1 of the sequence is order[i]
        self.pruned: set[str] = set()

    # ------------------------------------------------------------ the backbone
    def prepare_backbone(self, module: TrainingHost, mask_options: Mapping[str, Any]) -> None:
        options = {k: mask_options[k] for k in ("target", "exclude") if k in mask_options}
        mask_model(module.backbone, **options)
        self.owners = {
            name: torch.zeros(mask.weight.shape, dtype=torch.uint8)
            for name, mask in masked_weights(module.backbone)
        }
        self.freeze(module)

    def freeze(self, module: TrainingHost) -> None:
        module.backbone.requires_grad_(False)
        for _, mask in masked_weights(module.backbone):
            mask.weight.requires_grad_(True)  # trained through the fixed owner mask
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

    @torch.no_grad()
    def _set_masks(self, module_or_net: nn.Module, index: int) -> None:
        """Task ``index`` sees the weights of tasks ``0..index`` (free ones are 255)."""
        for name, mask in masked_weights(module_or_net):
            mask.set_mask((self.owners[name] <= index).to(mask.mask_real.device))

    @torch.no_grad()
    def _free(self, module: TrainingHost, owner: int, fraction: float) -> None:
        """Prune ``fraction`` of ``owner``'s weights, per layer, by magnitude: zero and free."""
        for name, mask in masked_weights(module.backbone):
            owned = self.owners[name] == owner
            pruned = _prune_smallest(mask.weight.cpu(), owned, fraction)
            self.owners[name][pruned] = FREE
            mask.weight[pruned.to(mask.weight.device)] = 0.0

    def start_task(self, module: TrainingHost, task: str) -> None:
        self.order.append(task)
        index = self._index(task)
        if index == 1 and self.initial_prune > 0:
            self._free(module, 0, self.initial_prune)  # free room in the pretrained net
        self._zero_free(module)  # new weights start from zero
        for owners in self.owners.values():
            owners[owners == FREE] = index
        self._set_masks(module.backbone, index)
        super().start_task(module, task)

    def on_train_epoch_start(self, module: TrainingHost) -> None:
        """Prune the current task when only its retraining epochs are left."""
        trainer = module.trainer
        last = (trainer.max_epochs or 1) - self.retrain_epochs
        if module.task not in self.pruned and trainer.current_epoch >= max(last, 0):
            self.prune_current(module)

    def on_after_backward(self, module: TrainingHost) -> None:
        """Only the current task's weights learn; earlier tasks' stay exactly as they were."""
        index = self._index(module.task)
        for name, mask in masked_weights(module.backbone):
            grad = mask.weight.grad
            if grad is not None:
                grad.mul_((self.owners[name] == index).to(grad.device, grad.dtype))

    def prune_current(self, module: TrainingHost) -> None:
        if module.task in self.pruned:
            return
        index = self._index(module.task)
        self._free(module, index, self.prune)
        self._set_masks(module.backbone, index)
        self.pruned.add(module.task)

    def on_train_end(self, module: TrainingHost) -> None:
        self.prune_current(module)  # no retraining epochs were left: prune now
        self._zero_free(module)  # momentum may have nudged pruned weights after pruning

    @torch.no_grad()
    def _zero_free(self, module: TrainingHost) -> None:
        for name, mask in masked_weights(module.backbone):
            mask.weight[(self.owners[name] == FREE).to(mask.weight.device)] = 0.0

    def activate_task(self, module: TrainingHost, state: TaskState) -> None:
        self._set_masks(module.backbone, self._index(module.task))
        super().activate_task(module, state)

    def epoch_metrics(self, module: TrainingHost) -> dict[str, float]:
        total = sum(o.numel() for o in self.owners.values())
        free = sum(int((o == FREE).sum()) for o in self.owners.values())
        own = sum(int((o == self._index(module.task)).sum()) for o in self.owners.values())
        return {"packnet/free": free / total, "packnet/owned": own / total}

    def checkpoint_state(self, module: TrainingHost) -> dict[str, Any]:
        return {"owners": self.owners, "order": self.order, "pruned": sorted(self.pruned)}

    def load_checkpoint_state(self, module: TrainingHost, state: dict[str, Any]) -> None:
        self.owners = state["owners"]
        self.order = list(state["order"])
        self.pruned = set(state["pruned"])

    # --------------------------------------------------------------- artifacts
    def export(self, module: TrainingHost, encoding: str) -> ArtifactParts:
        """Owner index (packed) + the values of the weights this task owns, + BN if trained."""
        self.prune_current(module)
        index = self._index(module.task)
        bits = owner_bits(index)
        parts = super().export(module, encoding)
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
            "index": index,
            "previous_tasks": self.order[: index - 1],
            "owner_bits": bits,
            "shapes": shapes,
        }
        return parts

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
        raise ArtifactError(
            f"PackNet task {artifact.task!r} cannot be applied to an untouched backbone: its "
            "weights are the pretrained ones pruned and retrained by every task before it "
            f"({artifact.extra_meta.get('previous_tasks')}). Load the whole sequence in "
            "order: InferenceHost.from_artifacts([...]) or evaluate.py on the run's artifacts."
        )

    # ------------------------------------------------------ multi-task model
    @classmethod
    def attach(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        """Add task ``t``'s weights to the model's one PackNet network (tasks in order)."""
        state = model.method_state.setdefault(cls.name, {"tasks": []})
        expected = artifact.extra_meta["previous_tasks"]
        if state["tasks"] != expected:
            raise ArtifactError(
                f"PackNet task {artifact.task!r} builds on tasks {expected} (in that order); "
                f"this model holds PackNet tasks {state['tasks']}. Add them in sequence order."
            )
        owners = cls.owners_of(artifact)
        if cls.name not in model.method_networks:
            net = model.separate_network(None)
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
                mask.set_mask((owners[name] <= index).to(mask.mask_real.device))
        Method.apply(net, artifact, model.pretrained_bn)

    @classmethod
    def network(cls, model: InferenceHost, task: str) -> nn.Module:
        return model.method_networks[cls.name]
