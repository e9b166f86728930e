"""PackNet (Mallya & Lazebnik, CVPR 2018): tasks packed into one network by pruning.

The pretrained network is task 0. Each new task trains the weights that are still free,
then prunes a fraction of them by magnitude, retrains briefly, and freezes what it kept.
Task ``t`` runs with the weights owned by tasks ``0..t`` (later tasks' weights masked off),
so it never changes after it is learned. Storage: one network, a per-weight owner index and
the heads. Built on the mask machinery: the owner index becomes a fixed 0/1 mask per task,
and the weights train through it (``dW = dW_eff * M``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from piggyback.methods.base import ArtifactParts, TaskState
from piggyback.methods.hosts import TrainingHost
from piggyback.methods.ownership import (  # re-exported: PackNet's names since version 1
    FREE,
    OwnedWeights,
    owner_bits,
    pack_codes,
    unpack_codes,
)
from piggyback.nn import masked_weights

__all__ = ["FREE", "PackNet", "owner_bits", "pack_codes", "unpack_codes"]


class PackNet(OwnedWeights):
    """Prune-and-freeze continual learning on one network, in a fixed task order.

    Sources (arunmallya/packnet): ``src/scripts/run_sequence.sh`` trains each task 20 epochs
    with SGD (momentum 0.9, ``main.py``), lr 1e-3, x0.1 after 10, prunes 75 % of the task's
    weights per layer (``run_all_sequence.sh``: ``0.75,0.75,-1``), then retrains 10 epochs at
    1e-4. Here the same shape is scaled to the epochs given: the last third of a task's epochs
    retrain (``retrain_epochs=null``) and the lr drops x0.1 after the first third
    (``FractionStepLR`` milestones [1/3], so retraining runs at 0.1x, as the reference's 1e-4).
    BN trains and is stored per task by default (the reference's ``--train_bn``; its sequence
    script also offers ``nobn``: ``method.bn=frozen``). The first task owns and fine-tunes
    every pretrained weight (ours, because: the reference prunes and retrains the ImageNet
    network as task 0, which needs ImageNet data; ``first_task_trains_pretrained=false`` with
    ``initial_prune`` is the old "prune the pretrained network without retraining" reading).
    Every task is pruned, the last one too (ours, because a sequence can be extended later;
    the reference leaves its last task unpruned).
    """

    name = "packnet"
    default_lr = {"backbone": 1e-3, "head": 1e-3, "bn": 1e-3}
    default_optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}
    default_scheduler = {
        "_target_": "piggyback.optim.FractionStepLR",
        "_partial_": True,
        "milestones": [1 / 3],
        "gamma": 0.1,
    }
    may_forget = False
    superposable = False  # W itself changes per task: no masks over one frozen W

    def __init__(
        self,
        *,
        prune: float = 0.75,
        retrain_epochs: int | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("bn", "train")
        super().__init__(**options)
        if not 0.0 <= prune < 1.0:
            raise ValueError(f"packnet prune must be in [0, 1), got {prune}")
        if retrain_epochs is not None and retrain_epochs < 0:
            raise ValueError(f"packnet retrain_epochs must be >= 0 or null, got {retrain_epochs}")
        self.prune = prune
        self.retrain_epochs = retrain_epochs
        self.pruned: set[str] = set()

    def retrain_epochs_of(self, max_epochs: int) -> int:
        """Epochs after pruning: as given, or the last third of the task (the reference's
        10 of 30), at least one when the task has two epochs or more."""
        if self.retrain_epochs is not None:
            return self.retrain_epochs
        return 0 if max_epochs < 2 else max(1, round(max_epochs / 3))

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def _set_masks(self, module_or_net: nn.Module, index: int) -> None:
        """Task ``index`` sees the weights of tasks ``0..index`` (free ones are 255)."""
        for name, mask in masked_weights(module_or_net):
            mask.set_mask((self.owners[name] <= index).to(mask.mask_real.device))

    def start_task(self, module: TrainingHost, task: str) -> None:
        self.order.append(task)
        index = self._index(task)
        self.start_owning(module, index)
        self._set_masks(module.backbone, index)
        super().start_task(module, task)

    def on_train_epoch_start(self, module: TrainingHost) -> None:
        """Prune the current task when only its retraining epochs are left."""
        trainer = module.trainer
        epochs = trainer.max_epochs or 1
        last = epochs - self.retrain_epochs_of(epochs)
        if module.task not in self.pruned and trainer.current_epoch >= max(last, 0):
            self.prune_current(module)

    def prune_current(self, module: TrainingHost) -> None:
        if module.task in self.pruned:
            return
        index = self._index(module.task)
        self.free(module, index, self.prune)
        self._set_masks(module.backbone, index)
        self.pruned.add(module.task)

    def on_train_end(self, module: TrainingHost) -> None:
        self.prune_current(module)  # no retraining epochs were left: prune now
        self.zero_free(module)  # momentum may have nudged pruned weights after pruning

    def activate_task(self, module: TrainingHost, state: TaskState) -> None:
        self._set_masks(module.backbone, self._index(module.task))
        super().activate_task(module, state)

    def epoch_metrics(self, module: TrainingHost) -> dict[str, float]:
        total = sum(o.numel() for o in self.owners.values())
        free = sum(int((o == FREE).sum()) for o in self.owners.values())
        own = sum(int((o == self._index(module.task)).sum()) for o in self.owners.values())
        return {"packnet/free": free / total, "packnet/owned": own / total}

    def checkpoint_state(self, module: TrainingHost) -> dict[str, Any]:
        return {**super().checkpoint_state(module), "pruned": sorted(self.pruned)}

    def load_checkpoint_state(self, module: TrainingHost, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(module, state)
        self.pruned = set(state["pruned"])

    # --------------------------------------------------------------- artifacts
    def export(self, module: TrainingHost, encoding: str) -> ArtifactParts:
        """Owner index (packed) + the values of the weights this task owns, + BN if trained."""
        self.prune_current(module)
        parts = super().export(module, encoding)
        self.export_ownership(module, parts, self._index(module.task))
        return parts
