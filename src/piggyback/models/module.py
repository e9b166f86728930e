"""PiggybackModule: one frozen backbone, a learned mask and a head per task.

The module learns one task at a time. Finished tasks are kept in packed form (1 bit per
weight) together with their head and, when trained, their BN state; switching to a task
unpacks its mask into the masked layers. The backbone weights never change, which is the
paper's no-forgetting guarantee: adding task B leaves task A's predictions bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from piggyback.backbones import build_backbone
from piggyback.formats import (
    TaskArtifact,
    artifact_from_model,
    bn_state_dict,
    fingerprint,
)
from piggyback.methods import Method, TaskState, build_method
from piggyback.models.prototypes import feature_mean, moving_weights, pretrained_view
from piggyback.models.stored_state import decode_stored, encode_stored
from piggyback.nn import recompute_masked_weights
from piggyback.optim import build_optimizer, build_scheduler
from piggyback.utils.inputs import Inputs
from piggyback.utils.instantiate import build

_BN = nn.modules.batchnorm._BatchNorm

DEFAULT_MASK = {
    "mask_init": "1s",
    "mask_scale": 1e-2,
    "threshold": 5e-3,
    "threshold_fn": "binarizer",
    "grad_rescale": "none",
    "target": None,
    "exclude": [],
    "granularity": "element",
    "soft": False,
    "temperature": 1e-2,
    "embeddings": False,
}


def _plain(value: Any) -> Any:
    """Hydra DictConfig/ListConfig -> builtins, so hparams pickle and load with weights_only."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class PiggybackModule(L.LightningModule):
    """A frozen pretrained backbone, one head per task, and a method deciding the rest.

    ``method`` is a registered name (``"piggyback"``, ``"packnet"``, ...), a config with a
    ``_target_`` (``conf/method/*.yaml``) or a :class:`~piggyback.methods.Method`;
    ``bn``/``optimizer``/``scheduler``/``lr`` override the method's own settings.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        task: str,
        num_classes: int,
        method: str | dict[str, Any] | Method = "piggyback",
        bn: str | None = None,
        mask: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        lr: dict[str, float] | None = None,
        class_names: list[str] | None = None,
        channels_last: bool = False,
        log_layer_sparsity: bool = True,
        recompute_masked_weights: bool = False,
    ) -> None:
        super().__init__()
        backbone, mask, optimizer, scheduler, lr, method = map(
            _plain, (backbone, mask, optimizer, scheduler, lr, method)
        )
        overrides = {"bn": bn, "optimizer": optimizer, "lr": lr}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if scheduler is not None:
            overrides["scheduler"] = scheduler
        self.method: Method = build_method(method, **overrides)
        self.mask_cfg = {**DEFAULT_MASK, **(mask or {})}
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "task": task,
                "num_classes": num_classes,
                "method": method if not isinstance(method, Method) else method.name,
                "bn": bn,  # the overrides as given: the method spec holds the rest
                "mask": self.mask_cfg,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "lr": lr,
                "class_names": _plain(class_names),
                "channels_last": channels_last,
                "log_layer_sparsity": log_layer_sparsity,
                "recompute_masked_weights": recompute_masked_weights,
            }
        )
        self.channels_last = channels_last
        self.log_layer_sparsity = log_layer_sparsity
        self.recompute_masked_weights = recompute_masked_weights

        built = build_backbone(**backbone)
        self.backbone_name = built.name
        self.feature_dim = built.feature_dim
        self.backbone_data_config = built.data_config  # feeds the data transforms
        self.backbone = built.model
        # Fingerprint and BN statistics of the *pretrained* weights: artifacts are checked
        # against the former, tasks with frozen BN are restored to the latter.
        self.backbone_fingerprint = fingerprint(self.backbone)
        self.pretrained_bn = bn_state_dict(self.backbone)
        self.method.prepare_backbone(self, self.mask_cfg)
        self._pristine = moving_weights(self.backbone)

        self.heads = nn.ModuleDict()
        self.metrics = nn.ModuleDict()
        self.tasks: dict[str, TaskState] = {}
        self.task: str | None = None
        self.add_task(task, num_classes, class_names=class_names)
        self._enforce_frozen_modes()

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def bn_mode(self) -> str:
        return "train" if self.method.trains_bn else "frozen"

    # ----------------------------------------------------------------- parameters
    def param_groups(self) -> list[dict[str, Any]]:
        """Named groups (masks / bn / backbone / head) so LR monitors show readable names."""
        return self.method.param_groups(self)

    def configure_optimizers(self):
        per_group = {name: build(spec) for name, spec in self.method.optimizers.items()}
        optimizer = build_optimizer(self.param_groups(), build(self.method.optimizer), per_group)
        schedules = {k: build(v) if v else None for k, v in self.method.schedulers.items()}
        default = build(self.method.scheduler) if self.method.scheduler else None
        trainer = self._trainer
        epochs = trainer.max_epochs if trainer is not None else None
        epochs = epochs if epochs and epochs > 0 else None  # -1: no limit, no fractions
        scheduler = build_scheduler(optimizer, default, schedules, total_epochs=epochs)
        if scheduler is None:
            return optimizer
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
        """Start learning ``task``: the method prepares the backbone, the head is fresh."""
        if task in self.tasks:
            raise ValueError(f"task {task!r} already exists; known tasks: {sorted(self.tasks)}")
        if self.method.separate_networks and self.tasks:
            raise ValueError(
                f"method {self.method.name!r} trains a separate network per task: "
                "build a new module"
            )
        self.commit_task()
        self._register_task(task, TaskState(num_classes=num_classes, class_names=class_names))
        self.task = task
        self.method.start_task(self, task)
        self._set_trainable_heads()

    def _set_trainable_heads(self) -> None:
        for name, head in self.heads.items():
            head.requires_grad_(name == self.task)

    def commit_task(self) -> None:
        """Store the current task (e.g. its packed masks) so another task can run."""
        if self.task is not None:
            self.method.store_task(self, self.tasks[self.task])

    @torch.no_grad()
    def set_task(self, task: str) -> None:
        """Make the module compute ``task``; the backbone itself is never reloaded."""
        if task == self.task:
            return
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known tasks: {sorted(self.tasks)}")
        self.commit_task()
        self.task = task
        self.method.activate_task(self, self.tasks[task])
        self._set_trainable_heads()

    # -------------------------------------------------------------------- forward
    def _enforce_frozen_modes(self) -> None:
        """Keep frozen parts in eval mode: frozen BN must not update its running statistics."""
        if self.method.backbone_frozen:
            self.backbone.eval()
        elif self.bn_mode == "frozen":
            for module in self.backbone.modules():
                if isinstance(module, _BN):
                    module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self._enforce_frozen_modes()
        return self

    def features(self, x: Inputs) -> torch.Tensor:
        """The backbone's features of the inputs as the data gives them: an image tensor, or
        a mapping of tensors (a text batch) that the backbone takes as it is."""
        if self.channels_last and isinstance(x, torch.Tensor):
            x = x.contiguous(memory_format=torch.channels_last)
        if self.method.backbone_frozen:
            with torch.no_grad():
                return self.backbone(x)
        with recompute_masked_weights(self.recompute_masked_weights):
            return self.backbone(x)

    def forward(self, x: Inputs, task: str | None = None) -> torch.Tensor:
        if task is not None:
            self.set_task(task)
        return self.head(self.features(x))

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def _step(self, batch, stage: str) -> dict[str, torch.Tensor]:
        """``loss``: what is minimised (the cross-entropy plus the method's regulariser, e.g.
        HAT's attention term); ``task_loss``: the cross-entropy alone, logged as
        ``<stage>/loss`` so that it compares across methods and with the chance level that
        the collapse check measures against."""
        x, y = batch[0], batch[1]
        logits = self(x)
        task_loss = nn.functional.cross_entropy(logits, y)
        loss = task_loss
        if stage == "train" and (extra := self.method.regularizer(self)) is not None:
            self.log("train/regularizer", extra, on_step=False, on_epoch=True, batch_size=len(y))
            loss = task_loss + extra
        metrics = self.metrics[self.task][f"{stage}_metrics"]
        metrics.update(logits.detach(), y)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss", task_loss, on_step=on_step, on_epoch=True, prog_bar=True,
            batch_size=len(y),
        )  # fmt: skip
        for name, metric in metrics.items():
            self.log(
                f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc"
            )
        return {"loss": loss, "task_loss": task_loss.detach()}

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(dim=1)

    def on_fit_start(self) -> None:
        # A module left in eval mode (e.g. by a test pass before fit) would train with BN
        # reading its running statistics and never updating them: training is train mode,
        # less what the method keeps frozen.
        self.train()

    def on_train_epoch_start(self) -> None:
        # Lightning >= 2.2 restores each submodule's own mode instead of calling .train()
        # on the whole module, so the ``train`` override alone is not enough.
        self._enforce_frozen_modes()
        self.method.on_train_epoch_start(self)

    def on_after_backward(self) -> None:
        self.method.on_after_backward(self)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.method.on_train_batch_start(self, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.method.on_train_batch_end(self)

    def on_validation_epoch_end(self) -> None:
        self.method.on_validation_epoch_end(self)

    def on_train_end(self) -> None:
        self.method.on_train_end(self)
        loader = self.trainer.train_dataloader
        if loader is not None:
            batches = self.trainer.num_training_batches
            limit = None if math.isinf(batches) else int(batches)
            self.tasks[self.task].prototype = self.feature_mean(loader, limit)

    # ------------------------------------------------------------ task inference
    def pretrained_network(self) -> AbstractContextManager[nn.Module]:
        """The backbone as it was pretrained, for a ``with`` block (everything put back on
        exit); see :func:`piggyback.models.prototypes.pretrained_view`."""
        return pretrained_view(self.backbone, self.pretrained_bn, self._pristine)

    def feature_mean(self, batches: Iterable[Any], limit: int | None = None) -> torch.Tensor:
        """Mean pretrained feature over ``batches``: the task's prototype (task inference)."""
        if self.task is None:
            raise ValueError("no task selected: the prototype belongs to a task")
        with self.pretrained_network() as net:
            return feature_mean(net, batches, self.device, self.task, limit)

    def on_train_epoch_end(self) -> None:
        metrics = self.method.epoch_metrics(self)
        if metrics:
            self.log_dict(metrics)

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
        return artifact_from_model(
            self.backbone,
            self.head,
            self.method.export(self, encoding),
            task=self.task,
            backbone_name=self.backbone_name,
            method=self.method.name,
            backbone_fingerprint=self.backbone_fingerprint,
            class_names=self.tasks[self.task].class_names,
            config=config,
            metrics=metrics,
            prototype=self.tasks[self.task].prototype,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.commit_task()
        checkpoint["piggyback"] = {
            "task": self.task,
            "fingerprint": self.backbone_fingerprint,
            "pretrained_bn": self.pretrained_bn,
            "method_state": self.method.checkpoint_state(self),
            "tasks": {
                name: {
                    "num_classes": s.num_classes,
                    "class_names": s.class_names,
                    "stored": encode_stored(s.stored),
                    "prototype": s.prototype,
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
        self.method.load_checkpoint_state(self, saved.get("method_state") or {})
        for name, info in saved["tasks"].items():
            stored = decode_stored(info["stored"])
            state = TaskState(info["num_classes"], info["class_names"], stored)
            state.prototype = info.get("prototype")
            self._register_task(name, state)
        # The current task's live mask and BN come with the state dict itself.
        self.task = saved["task"]
        self._set_trainable_heads()

    def task_names(self) -> Iterator[str]:
        return iter(self.tasks)
