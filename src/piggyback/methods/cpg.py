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

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from piggyback.formats import ArtifactParts, TaskArtifact, bn_state_dict, load_bn_state
from piggyback.methods.base import TaskState
from piggyback.methods.growth import GrowthReserve
from piggyback.methods.hosts import TrainingHost
from piggyback.methods.ownership import (
    FREE,
    RESERVED,
    OwnedWeights,
    pack_codes,
    prune_smallest,
    unpack_codes,
)
from piggyback.nn import mask_parameters, masked_weights, quantize, reset_masks
from piggyback.optim import GroupedOptimizer

log = logging.getLogger(__name__)

OWN = 1.0
"""``mask_real`` of the weights the current task owns: far above any threshold, never learned."""


def _fraction(label: str, value: float) -> float:
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(
            f"cpg {label} must be an accuracy as a fraction in (0, 1] (0.83, not 83), got {value}"
        )
    return float(value)


def reference_accuracies(path: str | Path) -> dict[str, float]:
    """``{task: val/acc}`` from a run's ``metrics.json`` (a fine-tuning run of the same tasks)."""
    file = Path(path)
    try:
        tasks = json.loads(file.read_text())["tasks"]
        return {str(task): float(record["val/acc"]) for task, record in tasks.items()}
    except FileNotFoundError:
        raise ValueError(f"cpg reference file {file} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cpg reference {file} is not a run's metrics.json with val/acc per task ({exc!r})"
        ) from None


class CPG(OwnedWeights):
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

    def __init__(
        self,
        *,
        goal: float = 1.0,
        reference: float | str | Mapping[str, float] | None = None,
        prune_step: float | None = None,
        max_prune: float = 0.95,
        compact_epochs: int = 2,
        round_epochs: int = 1,
        grow: float = 0.0,
        max_grows: int = 2,
        **options: Any,
    ) -> None:
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
        if not goal > 0:
            raise ValueError(f"cpg goal must be > 0 (a fraction of the reference), got {goal}")
        if isinstance(reference, str):
            reference = reference_accuracies(reference)
        if isinstance(reference, Mapping):
            reference = {str(k): _fraction(f"reference.{k}", v) for k, v in reference.items()}
        elif reference is not None:
            reference = _fraction("reference", reference)
        if not 0.0 < max_prune < 1.0:
            raise ValueError(f"cpg max_prune must be in (0, 1), got {max_prune}")
        if prune_step is not None and not 0.0 < prune_step < 1.0:
            raise ValueError(f"cpg prune_step must be in (0, 1) or null, got {prune_step}")
        if compact_epochs < 0 or round_epochs < 1:
            raise ValueError(
                f"cpg needs compact_epochs >= 0 and round_epochs >= 1, got {compact_epochs} "
                f"and {round_epochs}"
            )
        self.goal = float(goal)
        self.reference = reference
        self.prune_step = prune_step
        self.max_prune = max_prune
        self.compact_epochs = compact_epochs
        self.round_epochs = round_epochs
        self.results: dict[str, dict[str, Any]] = {}  # task -> pruned, goal, history
        self.compaction: dict[str, Any] = {}

    def check_tasks(self, tasks: list[str]) -> None:
        """A per-task reference must name every task of the sequence (checked before training)."""
        if isinstance(self.reference, Mapping):
            missing = [t for t in tasks if t not in self.reference]
            if missing:
                raise ValueError(
                    f"cpg reference has no accuracy for tasks {missing}; give one per task "
                    "(method.reference={task: accuracy}) or method.reference=null"
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
        self.compaction = {
            "val_acc": {},  # epoch -> validation accuracy
            "rounds": 0,
            "sparsity": 0.0,
            "done": False,
            "restore": False,
            "goal_acc": None,
            "history": [],  # [sparsity, val acc] of every evaluated state
            "snapshot": None,
            "initial_owned": self._owned_per_layer(index),
            "finished": False,
            "slots": 0,  # round boundaries passed: a pruning round or a growth
            "grown": grown,
        }
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
    def _compacting(self, module: TrainingHost) -> bool:
        return self.compaction.get("rounds", 0) > 0

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

    def on_validation_epoch_end(self, module: TrainingHost) -> None:
        trainer = module.trainer
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        acc = self.validation_accuracy(module)
        if acc is not None:
            self.compaction["val_acc"][int(trainer.current_epoch)] = acc

    def validation_accuracy(self, module: TrainingHost) -> float | None:
        """This epoch's ``val/acc`` (Lightning has computed it when the hook runs)."""
        acc = module.trainer.callback_metrics.get("val/acc")
        return None if acc is None else float(acc)

    def _first_round_epoch(self, module: TrainingHost) -> int:
        return max((module.trainer.max_epochs or 1) - self.compact_epochs, 1)

    def rounds_total(self, module: TrainingHost) -> int:
        first = self._first_round_epoch(module)
        return max(math.ceil(((module.trainer.max_epochs or 1) - first) / self.round_epochs), 0)

    def round_target(self, round_index: int, rounds: int) -> float:
        """The pruned fraction after round ``round_index`` (1-based) of ``rounds``: steps of
        ``prune_step``, or, by default, evenly spaced up to ``max_prune``."""
        if self.prune_step is not None:
            return min(round_index * self.prune_step, self.max_prune)
        return self.max_prune * round_index / max(rounds, 1)

    def on_train_epoch_start(self, module: TrainingHost) -> None:
        """Start the compaction rounds that are due by this epoch (once each, resume-safe)."""
        state = self.compaction
        state["finished"] = False  # training runs (again, after a resume)
        trainer = module.trainer
        epoch = int(trainer.current_epoch)
        if self.compact_epochs and epoch == 0 and not trainer.limit_val_batches:
            raise ValueError(
                "cpg compacts each task by its validation accuracy, but validation is off "
                "(trainer.limit_val_batches=0); enable it or set method.compact_epochs=0"
            )
        first = self._first_round_epoch(module)
        rounds_total = self.rounds_total(module)
        due = 0 if epoch < first else min((epoch - first) // self.round_epochs + 1, rounds_total)
        while state["slots"] < due and not state["done"]:
            self._next_round(module, epoch)
        if state["done"] and state["rounds"]:
            trainer.should_stop = True

    def _evaluate(self, module: TrainingHost, acc: float | None) -> bool:
        """Record the state just trained; keep a snapshot of it when it meets the goal."""
        state = self.compaction
        if state["goal_acc"] is None:
            reference = self.reference
            if isinstance(reference, Mapping):
                reference = reference[module.task]
            if reference is None:
                reference = acc  # the accuracy before pruning
            state["goal_acc"] = None if reference is None else self.goal * reference
        state["history"].append([state["sparsity"], acc])
        if acc is not None and state["goal_acc"] is not None and acc >= state["goal_acc"]:
            state["snapshot"] = self._snapshot(module, acc)
            return True
        state["done"] = True
        state["restore"] = state["snapshot"] is not None
        return False

    def _next_round(self, module: TrainingHost, epoch: int) -> None:
        """A round boundary: prune further if the state just trained met the goal; grow (or
        give up) if the task missed it before any pruning."""
        state = self.compaction
        state["slots"] += 1
        acc = state["val_acc"].get(epoch - 1)
        if not self._evaluate(module, acc):
            if state["snapshot"] is None:
                why = f"validation accuracy {acc} is below its goal {state['goal_acc']}"
                may_grow = self._may_grow(module)
                if may_grow and self._grow(module, module.task, why):
                    state["done"] = False  # train the new units, judge again next round
                    state["grown"] += 1
                else:
                    log.warning(
                        "cpg task %r: %s before pruning; the task keeps all its weights%s",
                        module.task,
                        why,
                        " (the growth reserve is spent)" if may_grow else "",
                    )
            return
        target = self.round_target(state["rounds"] + 1, self.rounds_total(module))
        if target <= state["sparsity"]:
            state["done"] = True  # max_prune reached: nothing left to try
            return
        self._prune_to(module, target)
        state["rounds"] += 1
        state["sparsity"] = target
        state["round_start"] = epoch

    def _owned_per_layer(self, index: int) -> dict[str, int]:
        return {name: int((owners == index).sum()) for name, owners in self.owners.items()}

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

    @torch.no_grad()
    def _prune_to(self, module: TrainingHost, target: float) -> None:
        """Per layer: keep ``1 - target`` of what the task owned before compacting."""
        index = self._index(module.task)
        initial = self.compaction["initial_owned"]
        for name, mask in masked_weights(module.backbone):
            own = self.owners[name] == index
            keep = int(round((1.0 - target) * initial[name]))
            pruned = prune_smallest(mask.weight.cpu(), own, int(own.sum()) - keep)
            self._release(mask, name, pruned)
            mask.mask_real[pruned.to(mask.mask_real.device)] = 0.0

    def on_train_end(self, module: TrainingHost) -> None:
        """Judge the last round, restore the sparsest state that met the goal, free the rest."""
        state = self.compaction
        if state.get("finished", True):
            return
        if state["rounds"] and not state["done"]:
            latest = max(state["val_acc"], default=-1)
            acc = state["val_acc"][latest] if latest >= state["round_start"] else None
            self._evaluate(module, acc)
        if state["restore"]:
            self._restore(module, state["snapshot"])
        self.zero_free(module)  # momentum may have nudged pruned weights after pruning
        index = self._index(module.task)
        initial = sum(state["initial_owned"].values())
        self.results[module.task] = {
            "pruned": 1.0 - self.owned(index) / initial if initial else 0.0,
            "goal_accuracy": state["goal_acc"],
            "history": state["history"],  # [pruned fraction, val acc] per evaluated state
            "grown": state.get("grown", 0),  # growths this task claimed
        }
        state["finished"] = True

    def _snapshot(self, module: TrainingHost, acc: float) -> dict[str, Any]:
        index = self._index(module.task)
        snap: dict[str, Any] = {"acc": acc, "sparsity": self.compaction["sparsity"]}
        snap["owned"] = {n: o == index for n, o in self.owners.items()}
        snap["values"], snap["mask_real"] = {}, {}
        for name, mask in masked_weights(module.backbone):
            own = snap["owned"][name].to(mask.weight.device)
            snap["values"][name] = mask.weight.detach()[own].cpu().clone()
            snap["mask_real"][name] = mask.mask_real.detach().cpu().clone()
        snap["head"] = {k: v.detach().cpu().clone() for k, v in module.head.state_dict().items()}
        snap["bn"] = bn_state_dict(module.backbone) if self.trains_bn else {}
        return snap

    @torch.no_grad()
    def _restore(self, module: TrainingHost, snap: dict[str, Any]) -> None:
        index = self._index(module.task)
        for name, mask in masked_weights(module.backbone):
            owners = self.owners[name]
            owners[owners == index] = FREE
            owners[snap["owned"][name]] = index
            own = snap["owned"][name].to(mask.weight.device)
            mask.weight[own] = snap["values"][name].to(mask.weight)
            mask.mask_real.copy_(snap["mask_real"][name])
        module.head.load_state_dict(snap["head"])
        if snap["bn"]:
            load_bn_state(module.backbone, snap["bn"])
        self.compaction["sparsity"] = snap["sparsity"]

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
        return {
            **super().checkpoint_state(module),
            "results": self.results,
            "compaction": self.compaction,
            "growth": None if self.growth is None else self.growth.state_dict(),
        }

    def load_checkpoint_state(self, module: TrainingHost, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(module, state)
        self.results = dict(state["results"])
        self.compaction = state["compaction"]
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
