"""WSN (Kang et al., ICML 2022, "Forget-free Continual Learning with Winning Subnetworks").

Tasks are learned in order on one network. Every masked weight has a learned real **score**;
task ``t`` computes with ``W ⊙ M_t``, where ``M_t`` keeps exactly ``capacity`` (the paper's
``c``) of each layer's weights: those with the largest ``|score|`` (``round(c · n)`` of a
layer's ``n`` weights, ties broken by position). The top-k is straight-through: the score gets
the mask's gradient ``dL/dW_eff ⊙ W`` (times ``sign(score)``, the derivative of ``|score|``), as
in the reference's ``GetSubnetFaster``. A task trains only the weights that **no earlier task
uses** (their owner is :data:`~piggyback.methods.ownership.FREE`); the weights that earlier
tasks' masks keep may be reused by the new mask but are frozen (their gradient is zeroed, as
the reference's ``consolidated_masks``), so every earlier task computes exactly as before.
When a task ends, the free weights its mask keeps become its own (owner ``t``).

How it maps onto this code base: the masked layers of ``piggyback.nn`` compute ``W ⊙ Q(mask_real)``;
here ``mask_real`` holds the *live binary mask* (0/1, rewritten from the scores before every
training step, and by task switches), and the score is a separate parameter ``wsn_score``
next to it (``<layer>.piggyback.weight.wsn_score``). The straight-through gradient that
lands on ``mask_real`` is handed to the score after each backward. The ownership machinery is
PackNet's and CPG's (``ownership``), with every weight free at the start (the pretrained or
randomly initialised network is not a task).

Storage (per task artifact): the task's plane of WSN's integer map of task masks, entropy coded
given the planes before it (``piggyback.masks.taskmap``: our gap/Rice codec on the weights the
previous task keeps, on those only older tasks keep and on the free ones), plus the float
values of the weights the task owns, its head and (``bn=train``) its BatchNorm.
``extra_meta["map"]`` reports the bits per weight of all tasks' planes together against one bit
per task. A reader adds the tasks in order (``MultiTaskModel``, like PackNet and CPG); a WSN
task is a binary mask over the shared network, so tasks can be superposed (SupSup's one-shot
task inference).

Hyperparameters and their sources (ihaeyong/WSN):

- ``capacity`` 0.5: ``--sparsity`` (the fraction kept; ``args.sparsity = 1 - args.sparsity``
  turns it into the fraction dropped) default 0.5 in ``main_wsn_cifar100_100.py`` and
  ``main_wsn_five_dataset_resnet18.py``; the scripts pass it as ``$3`` (the paper reports
  c = 3 % … 50 %).
- Adam, lr 1e-3 for weights, scores and heads alike: ``--optim adam --lr 1e-3`` in every
  ``scripts/wsn/*.sh`` (one optimizer over ``model.parameters()``).
- score init ``kaiming_uniform_(a=sqrt(5))`` (``score_init="kaiming"``, the class default):
  ``SubnetConv2d/SubnetLinear.init_mask_parameters`` in ``networks/subnet.py``, for a network
  trained from scratch; on a pretrained one it keeps a random half of every layer at the first
  step, so the YAML's default is ``magnitude`` (``|W|``: the largest ``capacity`` of each
  pretrained layer; ours, measured in ``conf/method/wsn.yaml``); scores are *not*
  re-initialised per task (``model.init_masks`` is commented out in the mains):
  ``reset_scores=false``.
- top-k over ``|score|`` with a straight-through gradient: ``GetSubnetFaster`` in
  ``networks/subnet.py``.
- BatchNorm: the reference's ResNet-18 uses ``BatchNorm2d(affine=False,
  track_running_stats=False)`` (batch statistics, nothing learned). Ours: ``bn=train``, BN
  affine parameters and running statistics per task, stored with the task (ours, because
  batch statistics at test time make a prediction depend on the rest of its batch, and a
  per-task BN is forget-free as well). ``bn=frozen`` keeps the backbone's BN.
- Biases of masked layers are not masked and stay frozen (ours, because the reference's
  networks have none (``bias=False``) and Piggyback's masked layers leave them unmasked).
- Schedule: the family's ``FractionStepLR`` (x0.1 after half the epochs; ours, so methods
  compare on one schedule); the reference halves the lr after 6 epochs without a better
  validation loss and restores the best validation epoch at the end of a task, which we do
  not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from piggyback.formats import ArtifactError, ArtifactParts, TaskArtifact
from piggyback.masks.taskmap import decode_plane, encode_plane, plane_bits
from piggyback.methods.base import Method, TaskState
from piggyback.methods.hosts import InferenceHost, TrainingHost, sequence_state
from piggyback.methods.ownership import FREE, OwnedWeights, pack_codes, unpack_codes
from piggyback.nn import WeightMask, mask_model, masked_weights

CONTEXTS = ("previous", "older", "free")
"""The contexts a plane is coded in (``piggyback.masks.taskmap``): weights the previous task
keeps, weights only older tasks keep, weights no earlier task keeps."""
SCORE_INITS = ("kaiming", "magnitude")
"""``kaiming``: ``kaiming_uniform_(a=sqrt(5))``, the reference's (a random subnetwork at the
first step, for a network trained from scratch); ``magnitude``: ``|W|`` of the starting
weights, so the first task starts from the largest ``capacity`` of each pretrained layer."""

SCORE = "wsn_score"
"""Name of the score parameter registered on each layer's :class:`WeightMask`."""


def score_of(mask: WeightMask) -> nn.Parameter:
    """The WSN score of one masked weight."""
    return mask._parameters[SCORE]


def keep_count(numel: int, capacity: float) -> int:
    """How many of a layer's ``numel`` weights a task keeps: ``round(c · n)``, at least 1."""
    return min(numel, max(1, round(capacity * numel)))


def top_fraction(scores: torch.Tensor, capacity: float) -> torch.Tensor:
    """0/1 mask (``scores``' dtype) of exactly :func:`keep_count` largest ``|scores|``."""
    flat = scores.detach().abs().reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat, keep_count(flat.numel(), capacity), sorted=False).indices] = 1.0
    return keep.reshape(scores.shape)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


def _tensor(data: bytes) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8)
    )


class WSN(OwnedWeights):
    """Winning subnetworks: a top-``capacity`` mask per task over weights owned in order."""

    name = "wsn"
    default_lr = {"backbone": 1e-3, "scores": 1e-3, "head": 1e-3, "bn": 1e-3}
    default_optimizer = {"_target_": "torch.optim.Adam", "_partial_": True}
    may_forget = False
    superposable = True  # a task is a binary mask over the one shared network
    mask_option_keys = ("target", "exclude")

    def __init__(
        self,
        *,
        capacity: float = 0.5,
        reset_scores: bool = False,
        score_init: str = "kaiming",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not 0.0 < float(capacity) <= 1.0:
            raise ValueError(
                f"wsn capacity must be the fraction of each layer's weights a task keeps, in "
                f"(0, 1] (0.1, not 10), got {capacity}"
            )
        if score_init not in SCORE_INITS:
            raise ValueError(f"wsn score_init must be one of {SCORE_INITS}, got {score_init!r}")
        self.capacity = float(capacity)
        self.reset_scores = bool(reset_scores)
        self.score_init = score_init

    # ------------------------------------------------------------ the backbone
    def prepare_backbone(self, module: TrainingHost, mask_options: Mapping[str, Any]) -> None:
        super().prepare_backbone(module, mask_options)  # masks, owners, freeze
        for name, mask in masked_weights(module.backbone):
            self.owners[name].fill_(FREE)  # the starting network is not a task
            mask.register_parameter(SCORE, nn.Parameter(torch.empty_like(mask.weight)))
        self._init_scores(module)
        self.freeze(module)

    @torch.no_grad()
    def _init_scores(self, module: TrainingHost) -> None:
        for _, mask in masked_weights(module.backbone):
            if self.score_init == "magnitude":
                score_of(mask).copy_(mask.weight.detach().abs())
            else:
                nn.init.kaiming_uniform_(score_of(mask), a=math.sqrt(5))

    def freeze(self, module: TrainingHost) -> None:
        super().freeze(module)  # the weights train (the free ones: on_after_backward)
        for _, mask in masked_weights(module.backbone):
            # mask_real receives the straight-through gradient (all-reduced under DDP), which
            # on_after_backward hands to the score; the score itself is outside autograd, so
            # DDP does not wait for a gradient of it (the optimizer steps it all the same)
            mask.mask_real.requires_grad_(True)
            if SCORE in mask._parameters:
                score_of(mask).requires_grad_(False)

    def backbone_groups(self, module: TrainingHost) -> list[dict[str, Any]]:
        scores = [score_of(mask) for _, mask in masked_weights(module.backbone)]
        group = {"name": "scores", "params": scores, "lr": self.lr["scores"], "weight_decay": 0.0}
        return [*super().backbone_groups(module), group]

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def pick(self, module: TrainingHost) -> None:
        """The current task's mask from the scores: the top ``capacity`` of every layer."""
        for _, mask in masked_weights(module.backbone):
            mask.mask_real.copy_(top_fraction(score_of(mask), self.capacity))

    def start_task(self, module: TrainingHost, task: str) -> None:
        self.order.append(task)
        if self.reset_scores and len(self.order) > 1:
            self._init_scores(module)
        self.pick(module)
        Method.start_task(self, module, task)  # BN: the starting network's

    def on_train_batch_start(self, module: TrainingHost, batch_idx: int) -> None:
        self.pick(module)

    def on_after_backward(self, module: TrainingHost) -> None:
        """The score gets the mask's straight-through gradient; only free weights learn."""
        index = self._index(module.task)
        for name, mask in masked_weights(module.backbone):
            real, score = mask.mask_real, score_of(mask)
            if real.grad is not None:
                grad = real.grad * score.detach().sign()  # d|score| / dscore
                score.grad = grad if score.grad is None else score.grad.add_(grad)
                real.grad = None
            grad = mask.weight.grad
            if grad is not None:  # FREE (255) or the current task: no earlier task uses it
                grad.mul_((self.owners[name] >= index).to(grad.device, grad.dtype))

    def current_masks(self, module: TrainingHost) -> dict[str, torch.Tensor]:
        """The live mask of every layer (bool, on the CPU)."""
        return {
            name: mask.mask_real.detach().cpu() > 0.5
            for name, mask in masked_weights(module.backbone)
        }

    def store_task(self, module: TrainingHost, state: TaskState) -> None:
        """Keep the task's mask (1 bit per weight); the newest task owns the free weights it
        keeps (recomputed at every store, so a checkpoint mid-task is consistent)."""
        masks = self.current_masks(module)
        state.stored["mask"] = {n: pack_codes(m, 1) for n, m in masks.items()}
        index = self._index(module.task)
        if index == len(self.order):
            for name, keep in masks.items():
                owners = self.owners[name]
                mine = owners >= index
                owners[mine] = torch.where(keep[mine], index, FREE).to(owners.dtype)
        super().store_task(module, state)

    def activate_task(self, module: TrainingHost, state: TaskState) -> None:
        for name, mask in masked_weights(module.backbone):
            numel = mask.weight.numel()
            keep = unpack_codes(state.stored["mask"][name], numel, 1).reshape(mask.weight.shape)
            mask.set_mask(keep.to(mask.mask_real.device))
        Method.activate_task(self, module, state)

    def epoch_metrics(self, module: TrainingHost) -> dict[str, float]:
        index = self._index(module.task)
        total = kept = reused = used = 0
        for name, keep in self.current_masks(module).items():
            earlier = self.owners[name] < index
            total += keep.numel()
            kept += int(keep.sum())
            reused += int((keep & earlier).sum())
            used += int((keep | earlier).sum())
        return {
            "wsn/kept": kept / total,
            "wsn/reused": reused / max(kept, 1),  # share of the mask that earlier tasks own
            "wsn/used": used / total,  # weights some task up to this one keeps
        }

    # --------------------------------------------------------------- artifacts
    def _masks(self, module: TrainingHost, k: int) -> dict[str, torch.Tensor] | None:
        """Task ``k``'s masks (bool; the live ones for the active task), None before task 1."""
        if k < 1:
            return None
        if k == self._index(module.task):
            return self.current_masks(module)
        stored = module.tasks[self.order[k - 1]].stored["mask"]
        return {
            n: unpack_codes(stored[n], o.numel(), 1).reshape(o.shape).bool()
            for n, o in self.owners.items()
        }

    def _planes(self, module: TrainingHost, index: int) -> dict[str, int]:
        """Bits of the coded planes of tasks ``1..index``."""
        bits, previous = {}, None
        for k, task in enumerate(self.order[:index], start=1):
            masks = self._masks(module, k)
            bits[task] = sum(
                plane_bits(encode_plane(masks[n], o < k, None if previous is None else previous[n]))
                for n, o in self.owners.items()
            )
            previous = masks
        return bits

    def export(self, module: TrainingHost, encoding: str) -> ArtifactParts:
        """This task's plane of the integer map (coded given the earlier planes), the values
        of the weights it owns, and BN when trained."""
        parts = Method.export(self, module, encoding)
        index = self._index(module.task)
        previous = self._masks(module, index - 1)
        shapes, kept = {}, 0
        layers = dict(masked_weights(module.backbone))
        for name, keep in self.current_masks(module).items():
            used = self.owners[name] < index
            streams = encode_plane(keep, used, None if previous is None else previous[name])
            for kind, stream in zip(CONTEXTS, streams, strict=True):
                parts.extra[f"plane_{kind}/{name}"] = _tensor(stream)
            weight = layers[name].weight.detach().cpu()
            parts.extra[f"values/{name}"] = weight[keep & ~used].clone()
            shapes[name] = list(keep.shape)
            kept += int(keep.sum())
        weights = sum(math.prod(s) for s in shapes.values())
        bits = self._planes(module, index)
        parts.extra_meta = {
            **(parts.extra_meta or {}),
            "index": index,
            "previous_tasks": self.order[: index - 1],
            "shapes": shapes,
            "capacity": self.capacity,
            "kept": kept / weights,
            "map": {
                "tasks": index,
                "bits_per_weight": sum(bits.values()) / weights,  # all tasks' planes
                "this_task_bits_per_weight": bits[module.task] / weights,
                "uncoded_bits_per_weight": float(index),  # one bit per weight and task
            },
        }
        return parts

    # ------------------------------------------------------ multi-task model
    @classmethod
    def attach(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        """Decode the task's plane given the tasks before it and write the weights it owns
        into the model's one shared network (tasks in sequence order)."""
        state = sequence_state(model, cls.name, "WSN", artifact, owners={}, masks={})
        shapes = artifact.extra_meta["shapes"]
        if cls.name not in model.method_networks:
            net = model.separate_network(None)
            mask_model(net, target=list(shapes))
            net.requires_grad_(False)
            model.method_networks[cls.name] = net
            state["owners"] = {
                n: torch.full(tuple(s), FREE, dtype=torch.uint8) for n, s in shapes.items()
            }
        net = model.method_networks[cls.name]
        index = artifact.extra_meta["index"]
        previous = cls.task_masks(model, state["tasks"][-1]) if state["tasks"] else None
        masks = {}
        with torch.no_grad():
            for name, mask in masked_weights(net):
                owners = state["owners"][name]
                used = owners < index
                streams = tuple(_bytes(artifact.extra[f"plane_{kind}/{name}"]) for kind in CONTEXTS)
                try:
                    keep = decode_plane(streams, used, None if previous is None else previous[name])
                except ValueError as exc:
                    raise ArtifactError(f"task {artifact.task!r}, {name!r}: {exc}") from None
                own = keep & ~used
                values = artifact.extra[f"values/{name}"]
                if values.numel() != int(own.sum()):
                    raise ArtifactError(
                        f"task {artifact.task!r}: {values.numel()} values for {name!r}, its mask "
                        f"owns {int(own.sum())} weights"
                    )
                mask.weight[own.to(mask.weight.device)] = values.to(mask.weight)
                owners[own] = index
                masks[name] = pack_codes(keep, 1)
        state["tasks"].append(artifact.task)
        state["masks"][artifact.task] = masks

    @classmethod
    def task_masks(cls, model: InferenceHost, task: str) -> dict[str, torch.Tensor]:
        """Task ``task``'s 0/1 masks (bool, by weight name) in ``model``."""
        owners = model.method_state[cls.name]["owners"]
        packed = model.method_state[cls.name]["masks"][task]
        return {
            n: unpack_codes(p, owners[n].numel(), 1).reshape(owners[n].shape).bool()
            for n, p in packed.items()
        }

    @classmethod
    def superposition(
        cls, model: InferenceHost, artifact: TaskArtifact
    ) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
        """WSN's shared network and the task's masks on it (SupSup's one-shot inference)."""
        masks = cls.task_masks(model, artifact.task)
        return model.method_networks[cls.name], {n: m.to(torch.int8) for n, m in masks.items()}

    @classmethod
    def activate(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        net = model.method_networks[cls.name]
        masks = cls.task_masks(model, artifact.task)
        with torch.no_grad():
            for name, mask in masked_weights(net):
                mask.set_mask(masks[name].to(mask.mask_real.device))
        Method.apply(net, artifact, model.pretrained_bn)
