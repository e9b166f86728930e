"""CPG (Hung et al., NeurIPS 2019): compacting, picking (and growing) for unforgetting.

Tasks are learned in order on one network whose weights are owned (see ``ownership``). Task
``t``:

1. **Picks and trains.** A learned binary Piggyback mask over the weights that earlier tasks
   own (``mask_real`` with the straight-through threshold) *picks* which of them task ``t``
   reuses, while the weights no task owns yet (free, starting from zero) are trained. The
   earlier weights themselves never change. The first task owns and fine-tunes every
   pretrained weight (as PackNet here; the reference compacts ImageNet as task 1, which
   needs ImageNet data).
2. **Compacts.** The last ``compact_epochs`` epochs run in rounds of ``round_epochs``: each
   round prunes more of the task's own weights (per layer, by magnitude, as a fraction of what
   the task owned before compacting; by default evenly spaced up to ``max_prune`` = 95 %) and
   retrains the rest with the pick masks frozen (no step at all: the reference's ``lr_mask
   0``). After every round the validation accuracy is compared with the task's **goal**; the
   first round below it ends compaction and the state of the last round that met it (weights,
   ownership, pick mask, head, BN) is restored: "the sparsest level whose accuracy still meets
   the goal" (``tools/choose_appropriate_pruning_ratio_for_next_task.py``, no loss allowed).
   The pruned weights are released (zero, ``FREE``) to later tasks.
3. **Grows** (``grow`` > 0) when the task misses its goal before any pruning, or finds no
   free weight at its start: it claims ``grow`` x the hidden width of every block that can
   grow (``piggyback.methods.growth``: units held in reserve from the start, so that earlier
   tasks stay bit-identical; at most ``max_grows`` growths per sequence) and trains them in
   the next round; a goal still missed with the reserve spent keeps all its weights. A first
   task that owns the whole pretrained network never grows: it is the fine-tuned network.
   Without growth (``grow=0``) a task that misses its goal keeps all its weights
   (``cpg/pruned`` stays 0).

The goal is ``goal × reference``: ``reference`` is the individually fine-tuned accuracy of
each task (the paper's setting): the path of a ``method=finetune`` run's ``metrics.json`` on the
same tasks (its ``val/acc`` per task), a mapping ``{task: accuracy}`` (fractions, as
``val/acc``), or one number for every task. ``null`` is the stated fallback: the task's own
validation accuracy after step 1, before any pruning. Accuracies are validation accuracies.

Hyperparameters and their sources (ivclab/CPG):
- weights, biases, BN and head: SGD, momentum 0.9, nesterov (``CPG_imagenet_main.py``), lr
  1e-3 (``experiment2/CPG_imagenet.sh`` ``init_lr``; 1e-2 for Stanford Cars), weight decay
  4e-5 on the current task's weights only (the scripts' ``--weight_decay 4e-5``, applied by
  ``utils/prune.py`` ``do_weight_decay_and_make_grads_zero``);
- pick masks: Adam, lr 1e-4 (``lr_mask``), 0 while pruning;
- BN trained and stored per task (``shared_layer_info`` in ``CPG_imagenet_main.py``);
- pruning from 10 % towards 95 % (``pruning_ratio_interval`` 0.1, last step +0.05);
- schedule: constant lr (ours, because the reference decays x0.1 only after 5 epochs without
  a better validation accuracy, which a short task does not reach, and its pruning rounds
  restart at a constant ``pruning_lr``).

Storage per task: its pick mask (1 bit per weight that earlier tasks own), plus, as PackNet,
the owner index and the float values of the weights it owns, plus its head (and BN when
``bn=train``). Earlier tasks' predictions are bit-identical after later tasks: their weights
are frozen and read through the same masks. Differences to the reference code, for a short
budget: one pruning step at the start of each round instead of a cubic ramp within it, rounds
of ``round_epochs`` instead of 20 epochs, and no optional "retrain mask and weights again"
pass after compaction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from piggyback.formats import ArtifactParts, TaskArtifact, bn_state_dict
from piggyback.methods.base import TaskState
from piggyback.methods.compaction import GoalCompaction
from piggyback.methods.growth import GrowthReserve
from piggyback.methods.hosts import TrainingHost
from piggyback.methods.ownership import (
    FREE,
    RESERVED,
    pack_codes,
    unpack_codes,
)
from piggyback.nn import mask_parameters, masked_weights, quantize, reset_masks
from piggyback.optim import GroupedOptimizer

log = logging.getLogger(__name__)

OWN = 1.0
"""``mask_real`` of the weights the current task owns: far above any threshold, never learned."""


class CPG(GoalCompaction):
    """Pick earlier tasks' weights with a mask, train the free ones, compact to a goal."""

    name = "cpg"
    default_lr = {"backbone": 1e-3, "masks": 1e-4, "head": 1e-3, "bn": 1e-3}
    default_optimizer = {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "momentum": 0.9,
        "nesterov": True,
    }
    default_optimizers = {"masks": {"_target_": "torch.optim.Adam", "_partial_": True}}
    default_scheduler = {
        "_target_": "piggyback.optim.FractionStepLR",
        "_partial_": True,
        "milestones": [],
    }
    may_forget = False
    # the pick mask is always binary (1 bit per earlier weight): no threshold_fn option
    mask_option_keys = ("target", "exclude", "threshold", "grad_rescale")

    def __init__(self, *, grow: float = 0.0, max_grows: int = 2, **options: Any) -> None:
        """``options``: the compaction's (``goal``, ``reference``, ``prune_step``,
        ``max_prune``, ``compact_epochs``, ``round_epochs``: ``GoalCompaction``) and the
        owned weights' (``bn``, ``weight_decay``, ...)."""
        options.setdefault("bn", "train")
        options.setdefault("weight_decay", 4e-5)
        super().__init__(**options)
        if isinstance(grow, bool):
            raise ValueError(
                "cpg grow is the fraction of each block's hidden width a growth adds (0.25), "
                f"or 0 for none; got {grow}"
            )
        #: None: no growth; else the reserve this sequence's tasks claim from
        self.growth = GrowthReserve(grow, max_grows) if grow else None
        if self.growth is not None and not self.trains_bn:
            raise ValueError(
                "cpg grow needs method.bn=train: the new units' BatchNorm channels are "
                "stored per task (frozen BN would keep the pretrained statistics only)"
            )

    # ------------------------------------------------------------ the backbone
    def prepare_backbone(self, module: TrainingHost, mask_options: Mapping[str, Any]) -> None:
        """With growth: widen by the whole reserve first (its units owned by nobody)."""
        if self.growth is not None:
            self.widened = self.growth.widen(module.backbone)
            module.pretrained_bn = bn_state_dict(module.backbone)  # + identity channels
        super().prepare_backbone(module, mask_options)
        if self.growth is not None:
            for name, entries in self.growth.reserve_entries(module.backbone).items():
                self.owners[name][entries] = RESERVED

    def freeze(self, module: TrainingHost) -> None:
        super().freeze(module)
        for param in mask_parameters(module.backbone):
            param.requires_grad_(True)

    def backbone_groups(self, module: TrainingHost) -> list[dict[str, Any]]:
        masks = {"name": "masks", "params": list(mask_parameters(module.backbone))}
        masks.update(lr=self.lr["masks"], weight_decay=0.0)
        return [*super().backbone_groups(module), masks]

    # ------------------------------------------------------------------ tasks
    def start_task(self, module: TrainingHost, task: str) -> None:
        self.order.append(task)
        index = self._index(task)
        self.start_owning(module, index)
        cfg = module.mask_cfg
        reset_masks(module.backbone, cfg["mask_init"], cfg["mask_scale"])  # the pick mask
        with torch.no_grad():
            for name, mask in masked_weights(module.backbone):
                owners = self.owners[name].to(mask.mask_real.device)
                mask.mask_real[owners == index] = OWN
                mask.mask_real[owners > index] = 0.0  # FREE: nothing is free right now
        grown = 0
        if self.growth is not None and index > 1 and self.owned(index) == 0:
            grown = int(self._grow(module, task, "no weight is free"))
        self.start_compaction(index, grown)
        super().start_task(module, task)

    @torch.no_grad()
    def _pick(self, module: TrainingHost) -> dict[str, torch.Tensor]:
        """The current task's pick bits, packed, over the weights earlier tasks own."""
        index = self._index(module.task)
        out = {}
        for name, mask in masked_weights(module.backbone):
            earlier = (self.owners[name] < index).to(mask.mask_real.device)
            bits = quantize(mask.mask_real.detach(), mask.threshold, "binarizer")[earlier]
            out[name] = pack_codes(bits.cpu(), 1)
        return out

    def store_task(self, module: TrainingHost, state: TaskState) -> None:
        state.stored["pick"] = self._pick(module)
        super().store_task(module, state)

    @staticmethod
    def _mask(owners: torch.Tensor, index: int, pick: torch.Tensor) -> torch.Tensor:
        """Task ``index``'s 0/1 mask: picked earlier weights and its own ones."""
        mask = owners == index
        earlier = owners < index
        mask[earlier] = unpack_codes(pick, int(earlier.sum()), 1).bool()
        return mask

    def activate_task(self, module: TrainingHost, state: TaskState) -> None:
        index = self._index(module.task)
        for name, mask in masked_weights(module.backbone):
            keep = self._mask(self.owners[name], index, state.stored["pick"][name])
            mask.set_mask(keep.to(mask.mask_real.device))
        super().activate_task(module, state)

    # ------------------------------------------------------- training hooks
    def on_after_backward(self, module: TrainingHost) -> None:
        """Own weights learn; the pick mask learns over earlier weights, and not while pruning."""
        super().on_after_backward(module)
        index = self._index(module.task)
        frozen = self._compacting(module)
        if frozen:
            for optimizer in module.trainer.optimizers:
                if isinstance(optimizer, GroupedOptimizer) and "masks" in optimizer.group_names():
                    optimizer.freeze("masks")  # no step at all, Adam's momentum included
        for name, mask in masked_weights(module.backbone):
            grad = mask.mask_real.grad
            if grad is None:
                continue
            if frozen:
                grad.zero_()
            else:  # where, not a multiply: 0 * nan is nan
                earlier = (self.owners[name] < index).to(grad.device)
                torch.where(earlier, grad, torch.zeros((), dtype=grad.dtype), out=grad)

    def missed_before_pruning(self, module: TrainingHost, why: str) -> bool:
        """Grow (when growth is on and the reserve lasts); else keep all weights, as without."""
        may_grow = self._may_grow(module)
        if may_grow and self._grow(module, module.task, why):
            self.compaction["grown"] += 1
            return True
        log.warning(
            "cpg task %r: %s before pruning; the task keeps all its weights%s",
            module.task,
            why,
            " (the growth reserve is spent)" if may_grow else "",
        )
        return False

    def _may_grow(self, module: TrainingHost) -> bool:
        """Growth is on, and the task is not a first task that owns the whole pretrained
        network: that one *is* the fine-tuned network its goal comes from, so missing the
        goal is noise that more units would not fix (and would spend the reserve on)."""
        first = self._index(module.task) == 1 and self.first_task_trains_pretrained
        return self.growth is not None and not first

    @torch.no_grad()
    def _grow(self, module: TrainingHost, task: str, why: str) -> bool:
        """Claim the next reserve units for ``task``; False when the reserve is spent."""
        assert self.growth is not None
        if not self.growth.can_grow():
            return False
        index = self._index(task)
        entries = self.growth.claim(module.backbone, task)
        masks = dict(masked_weights(module.backbone))
        for name, claimed in entries.items():
            take = claimed & (self.owners[name] == RESERVED)
            self.owners[name][take] = index
            masks[name].mask_real[take.to(masks[name].mask_real.device)] = OWN
        if self.compaction:  # mid-task: pruning fractions count the claimed weights too
            self.compaction["initial_owned"] = self._owned_per_layer(index)
        log.info(
            "cpg task %r grows (%s): +%g of each block's hidden width, widths now %s",
            task,
            why,
            self.growth.fraction,
            self.growth.widths(self.order),
        )
        return True

    def epoch_metrics(self, module: TrainingHost) -> dict[str, float]:
        index = self._index(module.task)
        total = sum(o.numel() for o in self.owners.values())
        earlier = picked = 0
        for name, mask in masked_weights(module.backbone):
            before = (self.owners[name] < index).to(mask.mask_real.device)
            earlier += int(before.sum())
            picked += int((mask.mask_real.detach()[before] > mask.threshold).sum())
        free = sum(int((o == FREE).sum()) for o in self.owners.values())
        return {
            "cpg/free": free / total,
            "cpg/owned": self.owned(index) / total,
            "cpg/picked": picked / earlier if earlier else 0.0,
            "cpg/pruned": float(self.compaction.get("sparsity", 0.0)),
            "cpg/grown": float(self.compaction.get("grown", 0)),
        }

    def checkpoint_state(self, module: TrainingHost) -> dict[str, Any]:
        growth = None if self.growth is None else self.growth.state_dict()
        return {**super().checkpoint_state(module), "growth": growth}

    def load_checkpoint_state(self, module: TrainingHost, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(module, state)
        if self.growth is not None and state.get("growth"):
            self.growth.load_state_dict(state["growth"])

    # --------------------------------------------------------------- artifacts
    def export(self, module: TrainingHost, encoding: str) -> ArtifactParts:
        """Pick bits (1 per earlier-owned weight) + owner index + owned values (+ BN)."""
        parts = super().export(module, encoding)
        index = self._index(module.task)
        for name, packed in self._pick(module).items():
            parts.extra[f"pick/{name}"] = packed
        self.export_ownership(module, parts, index)
        parts.extra_meta["compaction"] = self.results.get(module.task, {})
        if self.growth is not None:  # the hidden widths this task computes with
            parts.extra_meta["widths"] = self.growth.widths(self.order[:index])
        return parts

    @classmethod
    def task_mask(
        cls, name: str, owners: torch.Tensor, index: int, artifact: TaskArtifact
    ) -> torch.Tensor:
        return cls._mask(owners, index, artifact.extra[f"pick/{name}"])
