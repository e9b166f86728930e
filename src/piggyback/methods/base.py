"""What a *method* is: the hooks that differ between Piggyback and its baselines.

A method decides which parameters train (in named groups), what a finished task stores,
how a task is activated on the shared backbone, and how it travels in a task artifact. The
training module, the multi-task model, training and evaluation ask the method object; none
of them compares method names. Hooks are typed against the small protocols of ``hosts``,
never against the hosts' classes, which live in a higher layer. Like an Avalanche plugin, a
new method subclasses :class:`Method` and overrides only the hooks it needs; the class registers
itself under its ``name`` so that artifacts (which record the name) find it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from piggyback.formats import (
    ArtifactParts,
    TaskArtifact,
    bn_state_dict,
    load_bn_state,
    verify_backbone,
)
from piggyback.methods.hosts import InferenceHost, TaskState, TrainingHost

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
BN_MODES = ("frozen", "train")
REGISTRY: dict[str, type[Method]] = {}


class Method:
    """Base class: a frozen backbone, nothing learned in it. Override what differs."""

    name: ClassVar[str] = ""
    default_lr: ClassVar[dict[str, float]] = {"head": 1e-4}
    default_optimizer: ClassVar[dict[str, Any]] = {
        "_target_": "torch.optim.Adam",
        "_partial_": True,
    }
    #: the paper: x0.1 after 15 of its 30 epochs, as a fraction so that any budget keeps it
    default_scheduler: ClassVar[dict[str, Any]] = {
        "_target_": "piggyback.optim.FractionStepLR",
        "_partial_": True,
        "milestones": [0.5],
        "gamma": 0.1,
    }
    #: per-group optimizers and schedules (``{group name: config}``): none by default
    default_optimizers: ClassVar[dict[str, dict[str, Any]]] = {}
    default_schedulers: ClassVar[dict[str, dict[str, Any] | None]] = {}
    #: one network per task (the "individual networks" baseline): a module holds one task
    separate_networks: ClassVar[bool] = False
    #: later tasks can change earlier tasks' predictions (shown by the CL report)
    may_forget: ClassVar[bool] = False
    #: a task is the shared frozen W under a mask, so several tasks can run as one
    #: superposition ``W ⊙ Σ α_i M_i`` (SupSup's one-shot task inference); False for
    #: methods that change W (fine-tuning, PackNet)
    superposable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(
        self,
        *,
        bn: str = "frozen",
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        optimizers: Mapping[str, Mapping[str, Any]] | None = None,
        schedulers: Mapping[str, Mapping[str, Any] | None] | None = None,
        lr: Mapping[str, float] | None = None,
        lr_scale: float = 1.0,
        scale_mask_lr: bool = False,
        name: str | None = None,
    ) -> None:
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; choose one of {BN_MODES}")
        if name is not None and name != self.name:
            raise ValueError(f"method config name {name!r} does not match class {self.name!r}")
        self.bn = bn
        self.optimizer = dict(optimizer or self.default_optimizer)
        # None: the paper's schedule; an empty mapping: a constant learning rate.
        self.scheduler = dict(self.default_scheduler if scheduler is None else scheduler)
        # Several optimizers: a param group named here gets its own optimizer (and, under the
        # same name in ``schedulers``, its own schedule; None there: a constant lr); the other
        # groups share ``optimizer`` and ``scheduler`` (piggyback.optim.GroupedOptimizer).
        self.optimizers = {
            str(k): dict(v) for k, v in {**self.default_optimizers, **(optimizers or {})}.items()
        }
        self.schedulers = {
            str(k): (dict(v) if v else None)
            for k, v in {**self.default_schedulers, **(schedulers or {})}.items()
        }
        stray = sorted(set(self.schedulers) - set(self.optimizers))
        if stray:
            raise ValueError(
                f"method schedulers {stray} name groups without an optimizer of their own; add "
                f"them to method.optimizers or move the schedule to method.scheduler"
            )
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be > 0, got {lr_scale}")
        # One knob for a fair learning-rate sweep across methods with different groups. The
        # binary masks' rate is left out of it unless ``scale_mask_lr`` (the paper's sweep):
        # with Adam a mask moves by about its lr per step whatever its gradient, so its lr
        # only sets how many steps the first flip takes from the init ((1e-2 - 5e-3) / 1e-4
        # = 50 in the paper). Scaling the init and threshold with the lr would leave every
        # mask's trajectory unchanged (the straight-through gradient does not depend on
        # them), so this *is* "a mask scale that follows the learning rate", exactly.
        # At 3-10x, masks flip in bursts within ~5-17 steps and the run can collapse to
        # chance; a head warm-up does not prevent it (docs/methods.md, "Learning-rate sweep").
        self.lr_scale = float(lr_scale)
        self.scale_mask_lr = bool(scale_mask_lr)
        self.lr = {
            k: v * (lr_scale if k != "masks" or scale_mask_lr else 1.0)
            for k, v in {**self.default_lr, **(lr or {})}.items()
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bn={self.bn!r})"

    def check_tasks(self, tasks: list[str]) -> None:
        """Config-time check against the sequence's task names; ``ValueError`` if unusable."""

    # ------------------------------------------------------------ the backbone
    @property
    def trains_bn(self) -> bool:
        return self.bn == "train"

    @property
    def backbone_frozen(self) -> bool:
        """Whether the backbone runs in eval mode under ``no_grad`` (features only)."""
        return False

    def prepare_backbone(self, module: TrainingHost, mask_options: Mapping[str, Any]) -> None:
        """Called once after the pretrained backbone is built: mask it, set requires_grad."""
        self.freeze(module)

    def freeze(self, module: TrainingHost) -> None:
        """Everything frozen except BN when the method trains it."""
        for sub in module.backbone.modules():
            for param in sub.parameters(recurse=False):
                param.requires_grad_(self.trains_bn and isinstance(sub, BN_TYPES))

    def param_groups(self, module: TrainingHost) -> list[dict[str, Any]]:
        """Named optimizer groups (LR monitors show the names); empty groups are dropped."""
        groups = self.backbone_groups(module)
        groups.append(
            {"name": "head", "params": list(module.head.parameters()), "lr": self.lr["head"]}
        )
        return [g for g in groups if g["params"]]

    def backbone_groups(self, module: TrainingHost) -> list[dict[str, Any]]:
        if not self.trains_bn:
            return []
        bns = [m for m in module.backbone.modules() if isinstance(m, BN_TYPES)]
        params = [p for m in bns for p in m.parameters()]
        return [{"name": "bn", "params": params, "lr": self.lr.get("bn", self.lr["head"])}]

    # ------------------------------------------------------------------ tasks
    def start_task(self, module: TrainingHost, task: str) -> None:
        """A new task begins on the current backbone (pretrained BN by default)."""
        load_bn_state(module.backbone, module.pretrained_bn)

    def store_task(self, module: TrainingHost, state: TaskState) -> None:
        """Keep what the finished current task needs to be activated again."""
        if self.trains_bn:
            state.stored["bn_state"] = bn_state_dict(module.backbone)

    def activate_task(self, module: TrainingHost, state: TaskState) -> None:
        """Make the backbone compute a stored task."""
        load_bn_state(module.backbone, state.stored.get("bn_state") or module.pretrained_bn)

    # ------------------------------------------------------- training hooks
    def on_train_epoch_start(self, module: TrainingHost) -> None:
        """Per-epoch hook (PackNet prunes here)."""

    def on_train_batch_start(self, module: TrainingHost, batch_idx: int) -> None:
        """Before each training batch's forward; ``batch_idx`` counts from 0 in each epoch
        (WSN picks its top-k masks here, HAT anneals its gates' slope)."""

    def on_train_batch_end(self, module: TrainingHost) -> None:
        """After each optimizer step of the current task."""

    def on_after_backward(self, module: TrainingHost) -> None:
        """Gradient hook (PackNet keeps earlier tasks' weights out of the update)."""

    def regularizer(self, module: TrainingHost) -> torch.Tensor | None:
        """A term added to the training loss after each forward (HAT's attention
        regulariser); None adds nothing."""
        return None

    def on_validation_epoch_end(self, module: TrainingHost) -> None:
        """After each validation pass (CPG reads ``val/acc`` to decide how far to prune)."""

    def on_train_end(self, module: TrainingHost) -> None:
        """End of a task's training (PackNet prunes here when no retraining is left)."""

    def epoch_metrics(self, module: TrainingHost) -> dict[str, float]:
        """Extra scalars logged at the end of each training epoch."""
        return {}

    def checkpoint_state(self, module: TrainingHost) -> dict[str, Any]:
        """Method state that a Lightning checkpoint must carry beyond the state dict."""
        return {}

    def load_checkpoint_state(self, module: TrainingHost, state: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`."""

    # --------------------------------------------------------------- artifacts
    def export(self, module: TrainingHost, encoding: str) -> ArtifactParts:
        """The tensors of the current task's artifact (besides its head)."""
        bn = bn_state_dict(module.backbone) if self.trains_bn else {}
        return ArtifactParts(bn_state=bn)

    @classmethod
    def apply(
        cls,
        backbone: nn.Module,
        artifact: TaskArtifact,
        pretrained_bn: Mapping[str, torch.Tensor] | None,
    ) -> None:
        """Make a (fingerprint-checked) backbone compute ``artifact``'s task."""
        if artifact.bn_state:
            load_bn_state(backbone, artifact.bn_state)
        elif pretrained_bn is not None:
            load_bn_state(backbone, pretrained_bn)

    # ------------------------------------------------------ multi-task model
    @classmethod
    def attach(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        """Prepare ``model`` to hold ``artifact`` (called once when the task is added)."""

    @classmethod
    def activate(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        """Switch ``model``'s shared backbone to ``artifact``'s task."""
        verify_backbone(
            model.backbone,
            artifact,
            backbone_fingerprint=model.fingerprint,
            pretrained_bn=model.pretrained_bn,
        )
        cls.apply(model.backbone, artifact, model.pretrained_bn)

    @classmethod
    def network(cls, model: InferenceHost, task: str) -> nn.Module:
        """The network that computes ``task``'s features in ``model``."""
        return model.backbone

    @classmethod
    def superposition(
        cls, model: InferenceHost, artifact: TaskArtifact
    ) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
        """The network on which ``model`` superposes tasks (the shared backbone; WSN's own
        shared network) and ``artifact``'s masks on it (see :meth:`superposition_masks`)."""
        return model.backbone, cls.superposition_masks(artifact)

    @classmethod
    def superposition_masks(cls, artifact: TaskArtifact) -> dict[str, torch.Tensor] | None:
        """The task's quantised masks (int8, by weight name) for a superposition of tasks;
        None: the pretrained weights (every mask all ones)."""
        return None
