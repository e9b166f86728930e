"""PiggybackModule: one frozen backbone, a learned mask and a head per task.

The module learns one task at a time. Finished tasks are kept in packed form (1 bit per
weight) together with their head and, when trained, their BN state; switching to a task
unpacks its mask into the masked layers. The backbone weights never change, which is the
paper's no-forgetting guarantee: adding task B leaves task A's predictions bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from piggyback.backbones import build_backbone
from piggyback.instantiate import build
from piggyback.masks.artifact import (
    PackedMask,
    TaskArtifact,
    bn_state_dict,
    extract_artifact,
    fingerprint,
    load_bn_state,
    pack_model_masks,
)
from piggyback.masks.stats import layer_sparsity, total_sparsity
from piggyback.nn.convert import get_masks, mask_model, masked_weights, reset_masks

METHODS = ("piggyback", "finetune", "classifier_only")
BN_MODES = ("frozen", "train")
_BN = nn.modules.batchnorm._BatchNorm

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "fused": True}
DEFAULT_SCHEDULER = {
    "_target_": "torch.optim.lr_scheduler.StepLR",
    "_partial_": True,
    "step_size": 15,
    "gamma": 0.1,
}
DEFAULT_LR = {"masks": 1e-4, "head": 1e-4, "bn": 1e-4, "backbone": 1e-3}
DEFAULT_MASK = {
    "mask_init": "1s",
    "mask_scale": 1e-2,
    "threshold": 5e-3,
    "threshold_fn": "binarizer",
    "grad_rescale": "none",
    "target": None,
    "exclude": [],
}


@dataclass
class TaskState:
    """A finished task as the module stores it: packed masks, BN state, label metadata."""

    num_classes: int
    class_names: list[str] | None = None
    masks: dict[str, PackedMask] | None = None
    bn_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # mask_real version counters when ``masks`` was packed: unchanged masks are not re-packed
    packed_versions: list[int] | None = None


def _plain(value: Any) -> Any:
    """Hydra DictConfig/ListConfig -> builtins, so hparams pickle and load with weights_only."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


class PiggybackModule(L.LightningModule):
    def __init__(
        self,
        backbone: dict[str, Any],
        task: str,
        num_classes: int,
        method: str = "piggyback",
        bn: str = "frozen",
        mask: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        lr: dict[str, float] | None = None,
        class_names: list[str] | None = None,
        channels_last: bool = False,
        log_layer_sparsity: bool = True,
    ) -> None:
        super().__init__()
        backbone, mask, optimizer, scheduler, lr = map(
            _plain, (backbone, mask, optimizer, scheduler, lr)
        )
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; choose one of {BN_MODES}")
        self.mask_cfg = {**DEFAULT_MASK, **(mask or {})}
        self.lr_cfg = {**DEFAULT_LR, **(lr or {})}
        self.optimizer_cfg = optimizer or DEFAULT_OPTIMIZER
        self.scheduler_cfg = scheduler if scheduler is not None else DEFAULT_SCHEDULER
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "task": task,
                "num_classes": num_classes,
                "method": method,
                "bn": bn,
                "mask": self.mask_cfg,
                "optimizer": self.optimizer_cfg,
                "scheduler": self.scheduler_cfg,
                "lr": self.lr_cfg,
                "class_names": _plain(class_names),
                "channels_last": channels_last,
                "log_layer_sparsity": log_layer_sparsity,
            }
        )
        self.method = method
        self.bn_mode = "train" if method == "finetune" else bn
        self.channels_last = channels_last
        self.log_layer_sparsity = log_layer_sparsity

        built = build_backbone(**backbone)
        self.backbone_name = built.name
        self.feature_dim = built.feature_dim
        self.backbone = built.model
        # Fingerprint and BN statistics of the *pretrained* weights: artifacts are checked
        # against the former, tasks with frozen BN are restored to the latter.
        self.backbone_fingerprint = fingerprint(self.backbone)
        self.pretrained_bn = bn_state_dict(self.backbone)
        if method == "piggyback":
            mask_model(self.backbone, **self.mask_cfg)
        self._freeze_backbone()

        self.heads = nn.ModuleDict()
        self.metrics = nn.ModuleDict()
        self.tasks: dict[str, TaskState] = {}
        self.task: str | None = None
        self.add_task(task, num_classes, class_names=class_names)
        self._enforce_frozen_modes()

    # ----------------------------------------------------------------- parameters
    def _freeze_backbone(self) -> None:
        train_bn = self.bn_mode == "train" and self.method != "classifier_only"
        for module in self.backbone.modules():
            for name, param in module.named_parameters(recurse=False):
                if self.method == "finetune":
                    param.requires_grad_(True)
                elif name == "mask_real":
                    param.requires_grad_(self.method == "piggyback")
                elif isinstance(module, _BN):
                    param.requires_grad_(train_bn)
                else:
                    param.requires_grad_(False)

    def mask_parameters(self) -> list[nn.Parameter]:
        return [layer.mask_real for _, layer in masked_weights(self.backbone)]

    def bn_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.backbone.modules() if isinstance(m, _BN) for p in m.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        """Named groups (masks / bn / backbone / head) so LR monitors show readable names."""
        lr = self.lr_cfg
        groups: list[dict[str, Any]] = []
        if self.method == "piggyback":
            groups.append({"name": "masks", "params": self.mask_parameters(), "lr": lr["masks"]})
            if self.bn_mode == "train":
                groups.append({"name": "bn", "params": self.bn_parameters(), "lr": lr["bn"]})
        elif self.method == "finetune":
            params = [p for p in self.backbone.parameters() if p.requires_grad]
            groups.append({"name": "backbone", "params": params, "lr": lr["backbone"]})
        head_lr = lr["backbone"] if self.method == "finetune" else lr["head"]
        groups.append({"name": "head", "params": list(self.head.parameters()), "lr": head_lr})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = build(self.optimizer_cfg)(self.param_groups())
        if not self.scheduler_cfg:
            return optimizer
        scheduler = build(self.scheduler_cfg)(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # ---------------------------------------------------------------------- tasks
    @property
    def head(self) -> nn.Linear:
        return self.heads[self.task]

    def _new_metrics(self, num_classes: int) -> nn.ModuleDict:
        def collection() -> MetricCollection:
            return MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                    "acc_top5": MulticlassAccuracy(
                        num_classes, top_k=min(5, num_classes), average="micro"
                    ),
                }
            )

        # "train" would clash with nn.Module.train inside a ModuleDict, hence the suffix.
        return nn.ModuleDict(
            {f"{stage}_metrics": collection() for stage in ("train", "val", "test")}
        )

    def _register_task(self, task: str, state: TaskState) -> None:
        if task not in self.heads:
            self.heads[task] = nn.Linear(self.feature_dim, state.num_classes)
        if task not in self.metrics:
            self.metrics[task] = self._new_metrics(state.num_classes)
        self.tasks[task] = state

    def add_task(
        self, task: str, num_classes: int, *, class_names: list[str] | None = None
    ) -> None:
        """Start learning ``task``: fresh mask (per ``mask.mask_init``), fresh head."""
        if task in self.tasks:
            raise ValueError(f"task {task!r} already exists; known tasks: {sorted(self.tasks)}")
        if self.method == "finetune" and self.tasks:
            raise ValueError(
                "method 'finetune' trains a separate network per task: build a new module"
            )
        self.commit_task()
        self._register_task(task, TaskState(num_classes=num_classes, class_names=class_names))
        self.task = task
        reset_masks(self.backbone, self.mask_cfg["mask_init"], self.mask_cfg["mask_scale"])
        load_bn_state(self.backbone, self.pretrained_bn)
        self._set_trainable_heads()

    def _set_trainable_heads(self) -> None:
        for name, head in self.heads.items():
            head.requires_grad_(name == self.task)

    def _mask_versions(self) -> list[int]:
        return [layer.mask_real._version for _, layer in masked_weights(self.backbone)]

    def commit_task(self) -> None:
        """Store the current task's mask (packed) and BN state so another task can run."""
        if self.task is None or self.method == "finetune":
            return
        state = self.tasks[self.task]
        versions = self._mask_versions()
        if versions and (state.masks is None or state.packed_versions != versions):
            state.masks = pack_model_masks(self.backbone)
            state.packed_versions = versions
        if self.bn_mode == "train":
            state.bn_state = bn_state_dict(self.backbone)

    @torch.no_grad()
    def set_task(self, task: str) -> None:
        """Make the module compute ``task``; the backbone itself is never reloaded."""
        if task == self.task:
            return
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known tasks: {sorted(self.tasks)}")
        self.commit_task()
        state = self.tasks[task]
        for name, layer in masked_weights(self.backbone):
            layer.set_mask(state.masks[name].unpack(dtype=None))
        load_bn_state(self.backbone, state.bn_state or self.pretrained_bn)
        state.packed_versions = self._mask_versions()
        self.task = task
        self._set_trainable_heads()

    # -------------------------------------------------------------------- forward
    def _enforce_frozen_modes(self) -> None:
        """Keep frozen parts in eval mode: frozen BN must not update its running statistics."""
        if self.method == "classifier_only":
            self.backbone.eval()
        elif self.bn_mode == "frozen":
            for module in self.backbone.modules():
                if isinstance(module, _BN):
                    module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self._enforce_frozen_modes()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning >= 2.2 restores each submodule's own mode instead of calling .train()
        # on the whole module, so the override above is not enough on its own.
        self._enforce_frozen_modes()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.method == "classifier_only":
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        if task is not None:
            self.set_task(task)
        return self.head(self.features(x))

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        metrics = self.metrics[self.task][f"{stage}_metrics"]
        metrics.update(logits.detach(), y)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y)
        )
        for name, metric in metrics.items():
            self.log(
                f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc"
            )
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(dim=1)

    def on_train_epoch_end(self) -> None:
        if self.method != "piggyback":
            return
        masks = get_masks(self.backbone)
        self.log("masks/zeros", total_sparsity(masks))
        if self.log_layer_sparsity:
            per_layer = layer_sparsity(masks)
            self.log_dict({f"masks/zeros/{name}": value for name, value in per_layer.items()})

    # --------------------------------------------------------------- persistence
    def export_task(
        self,
        task: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        encoding: str = "bits",
    ) -> TaskArtifact:
        """The task artifact of ``task`` (default: the current one)."""
        if task is not None:
            self.set_task(task)
        state = self.tasks[self.task]
        return extract_artifact(
            self.backbone,
            self.head,
            task=self.task,
            backbone_name=self.backbone_name,
            method=self.method,
            backbone_fingerprint=self.backbone_fingerprint,
            class_names=state.class_names,
            include_bn=self.bn_mode == "train",
            config=config,
            metrics=metrics,
            encoding=encoding,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.commit_task()
        checkpoint["piggyback"] = {
            "task": self.task,
            "fingerprint": self.backbone_fingerprint,
            "pretrained_bn": self.pretrained_bn,
            "tasks": {
                name: {
                    "num_classes": s.num_classes,
                    "class_names": s.class_names,
                    "bn_state": s.bn_state,
                    "masks": None
                    if s.masks is None
                    else {
                        n: {"data": m.data, "shape": list(m.shape), "kind": m.kind}
                        for n, m in s.masks.items()
                    },
                }
                for name, s in self.tasks.items()
            },
        }
        # The state dict carries every weight, so rebuilding needs no download.
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            hparams["backbone"] = {**hparams["backbone"], "weights": None, "checkpoint": None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("piggyback")
        if saved is None:
            return
        self.backbone_fingerprint = saved["fingerprint"]
        self.pretrained_bn = saved["pretrained_bn"]
        for name, info in saved["tasks"].items():
            masks = None
            if info["masks"] is not None:
                masks = {
                    n: PackedMask(m["data"], tuple(m["shape"]), m["kind"])
                    for n, m in info["masks"].items()
                }
            state = TaskState(info["num_classes"], info["class_names"], masks, info["bn_state"])
            self._register_task(name, state)
        # The current task's live mask and BN come with the state dict itself.
        self.task = saved["task"]
        self._set_trainable_heads()

    def task_names(self) -> Iterator[str]:
        return iter(self.tasks)
