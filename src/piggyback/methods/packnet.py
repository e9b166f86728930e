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
        self.pruned: set[str] = set()

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def _set_masks(self, module_or_net: nn.Module, index: int) -> None:
        """Task ``index`` sees the weights of tasks ``0..index`` (free ones are 255)."""
        for name, mask in masked_weights(module_or_net):
            mask.set_mask((self.owners[name] <= index).to(mask.mask_real.device))

    def start_task(self, module: TrainingHost, task: str) -> None:
        self.order.append(task)
        index = self._index(task)
        if index == 1 and self.initial_prune > 0:
            self.free(module, 0, self.initial_prune)  # free room in the pretrained net
        self.claim_free(module, index)
        self._set_masks(module.backbone, index)
        super().start_task(module, task)

    def on_train_epoch_start(self, module: TrainingHost) -> None:
        """Prune the current task when only its retraining epochs are left."""
        trainer = module.trainer
        last = (trainer.max_epochs or 1) - self.retrain_epochs
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
