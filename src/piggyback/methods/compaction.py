"""Compaction to a goal (CPG's step 2, Hung et al., NeurIPS 2019): a task's own weights are
pruned gradually at the end of the task and the sparsest state that still meets the goal is kept.

The last ``compact_epochs`` epochs of a task run in rounds of ``round_epochs``: each round
prunes more of the task's own weights (per layer, by magnitude, as a fraction of what the task
owned before compacting; by default evenly spaced up to ``max_prune``) and retrains the rest.
After every round the validation accuracy is compared with the task's **goal**, ``goal x
reference``; the first round below it ends compaction and the state of the last round that met
it (weights, ownership, masks, head, BN) is restored (ivclab/CPG
``tools/choose_appropriate_pruning_ratio_for_next_task.py``: no accuracy loss allowed). The
pruned weights are released (zero, ``FREE``) to later tasks. A task that misses its goal before
any pruning keeps all its weights, unless a subclass does something about it
(:meth:`GoalCompaction.missed_before_pruning`: CPG grows).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from piggyback.formats import bn_state_dict, load_bn_state
from piggyback.methods.hosts import TrainingHost
from piggyback.methods.ownership import FREE, OwnedWeights, prune_smallest
from piggyback.nn import masked_weights

log = logging.getLogger(__name__)


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


class GoalCompaction(OwnedWeights):
    """Owned weights that compact each task to its goal (the module docstring). CPG is the
    method built on it, and its messages name CPG's options (``method.goal``, ...)."""

    def __init__(
        self,
        *,
        goal: float = 1.0,
        reference: float | str | Mapping[str, float] | None = None,
        prune_step: float | None = None,
        max_prune: float = 0.95,
        compact_epochs: int = 2,
        round_epochs: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(**options)
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

    def start_compaction(self, index: int, grown: int = 0) -> None:
        """A new task's compaction state (before its first epoch)."""
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

    def missed_before_pruning(self, module: TrainingHost, why: str) -> bool:
        """The task missed its goal with nothing pruned; True if that changed the network
        (train on and judge again next round). Here: it keeps all its weights."""
        log.warning(
            "cpg task %r: %s before pruning; the task keeps all its weights", module.task, why
        )
        return False

    def _compacting(self, module: TrainingHost) -> bool:
        return self.compaction.get("rounds", 0) > 0

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
        """A round boundary: prune further if the state just trained met the goal; hand a
        goal missed before any pruning to :meth:`missed_before_pruning`."""
        state = self.compaction
        state["slots"] += 1
        acc = state["val_acc"].get(epoch - 1)
        if not self._evaluate(module, acc):
            if state["snapshot"] is None:
                why = f"validation accuracy {acc} is below its goal {state['goal_acc']}"
                if self.missed_before_pruning(module, why):
                    state["done"] = False  # something changed (new units): judge again
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

    def checkpoint_state(self, module: TrainingHost) -> dict[str, Any]:
        return {
            **super().checkpoint_state(module),
            "results": self.results,
            "compaction": self.compaction,
        }

    def load_checkpoint_state(self, module: TrainingHost, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(module, state)
        self.results = dict(state["results"])
        self.compaction = state["compaction"]
