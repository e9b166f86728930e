"""HAT (Serra et al., ICML 2018, "Overcoming Catastrophic Forgetting with Hard Attention to the
Task").

Every gated layer has, per task, an embedding ``e`` with one value per output **unit**; the
unit's output is multiplied by the gate ``a = sigmoid(s · e)``. Within every epoch the slope
``s`` anneals linearly from ``1/s_max`` at the first batch to about ``s_max`` at the last (the
reference's ``s = (smax - 1/smax) · i / N + 1/smax``), so the gates become nearly binary.
A weight's gradient is scaled by ``1 - a_out``, where ``a_out`` is the largest gate any earlier
task put on its unit, so units that earlier tasks use stop learning; an attention regulariser
``c · Σ a (1 - a_<t) / Σ (1 - a_<t)`` keeps the new task's gates sparse; the embedding
gradient is compensated for the annealing (``s_max / s · (cosh(clamp(s e, ±50)) + 1) /
(cosh(e) + 1)``), the whole gradient clipped to norm 10000, and the embeddings clamped to
``[-6, 6]`` after each step, as in the reference's ``approaches/hat.py``.

Units, per layer kind (``mask.target`` / ``mask.exclude`` choose the layers, as for every
method):

- a convolution (grouped, depthwise and transposed ones included): an output channel;
- a linear layer: an output feature. For a fused ``qkv`` linear (timm's attention) that is one
  feature of q, k or v: a head dimension can be switched off in q, k and v independently;
- ``nn.MultiheadAttention`` (torchvision's ViT): its forward reads ``in_proj_weight`` and
  ``out_proj.weight`` inside ``F.multi_head_attention_forward``, so the q/k/v features cannot
  be gated; its units are the features of its output (``out_proj``'s rows), and the input
  projection counts as read by all of them: it stops learning once an earlier task uses any
  unit of that attention;
- a layer whose output goes straight into a BatchNorm: the gate multiplies the **BatchNorm's
  output** (a train-mode BatchNorm would otherwise normalise the gate away; the reference's
  AlexNet has no BatchNorm and gates after the activation). The pairing (the BatchNorm
  registered right after the layer, with as many channels) is checked on the first forward.
  LayerNorm and GroupNorm stay frozen and are not gated.

A layer that cannot be gated is refused with its name: a grouped transposed convolution
(its output channels are not rows of its weight), and, on the first forward, a masked layer
whose forward never ran (its weight read directly by a functional call, e.g. torchvision's
Swin attention) or a layer feeding a BatchNorm the pairing did not find. Exclude such layers
with ``mask.exclude``: they stay frozen.

Exactly forget-free: a stored task's gates are binary, ``a = 1[e > 0]`` (the limit of
``sigmoid(s e)`` as ``s`` grows; at ``s_max`` = 400 the two differ only for ``|e| < ~0.05``),
and so are the earlier tasks' gates that scale the gradient (ours, because with real-valued
gates a unit at 1e-9 would still be read by its task and moved by later ones; the reference's
forgetting is near zero, not zero). A unit an earlier task opens keeps its weights (the
whole row of an output unit) and bias exactly; a closed unit outputs exactly 0 for that task,
so what later tasks do with it cannot reach it. The reference also lets a weight learn when
its *input* unit is closed for earlier tasks (``min(a_in, a_out)``); we treat every input as
open (``a_in = 1``, so the factor is ``1 - a_out``) because with BatchNorm biases, residual
sums and LayerNorm in between, a closed unit's input to the next layer is not 0 (ours, sound
on every architecture at the cost of the connections from new units into old ones).
BatchNorm is per task (``bn=train``, stored with the task) or frozen.

Storage per task: its embeddings (one float per unit), the values of the weights and biases
of the units it is the first to open, its head and BN. Tasks are added to a
``MultiTaskModel`` in sequence order onto one shared network (like PackNet).

Hyperparameters and their sources (joansj/hat, ``src/``):

- SGD (no momentum, no weight decay), lr 0.05 for every parameter: ``approaches/hat.py``
  ``_get_optimizer`` and ``run.py`` ``--lr`` default 0.05;
- ``s_max`` 400 and ``c`` 0.75: ``approaches/hat.py`` (``smax``, ``lamb``; "chosen" in the
  grid searches noted there);
- ``clipgrad`` 10000, ``thres_cosh`` 50, ``thres_emb`` 6: ``approaches/hat.py``
  (``__init__``, ``train_epoch``);
- ``embedding_init`` normal, N(0, 1): ``torch.nn.Embedding``'s default in
  ``networks/alexnet_hat.py``; ``uniform``, U(0, 2), is the init that file gives for its
  compression experiments. On the demo's pretrained CNN, N(0, 1) closes about half of every
  layer's units before the first step and needs a few epochs to recover (33 % validation
  accuracy after 2 epochs of 34 batches, 91 % after 7); U(0, 2) opens every unit (81 % after
  2 epochs) but leaves the first task most units (93 %) and later tasks little to train;
- ``anneal``: ``epoch`` is the reference's restart of ``s`` at every epoch; the YAML's
  ``task`` anneals once over the task's steps (ours, because at a few batches an epoch one step
  in every epoch runs with every gate at 0.5; measured in ``conf/method/hat.yaml``);
- schedule: the family's ``FractionStepLR`` (x0.1 after half the epochs; ours, so methods
  compare on one schedule); the reference
  divides the lr by 3 after 5 epochs without a better validation loss and restores the best
  validation epoch, which we do not;
- BN per task and the binary stored gates: ours (see above).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from piggyback.formats import ArtifactError, ArtifactParts, TaskArtifact
from piggyback.methods.base import BN_TYPES, Method, TaskState
from piggyback.methods.hosts import (
    InferenceHost,
    TrainingHost,
    sequence_state,
    untouched_backbone_error,
)
from piggyback.methods.ownership import FREE
from piggyback.nn import mask_model
from piggyback.nn.unit_gates import (
    EMBEDDING,
    FirstForwardCheck,
    Gate,
    attenuation,
    describe_gates,
    first_mask,
    hard_gate,
    install_gates,
    unit_view,
)

EMBEDDING_INITS = ("normal", "uniform")
"""``normal``: N(0, 1), ``torch.nn.Embedding``'s init in the reference's networks (about half
the gates start closed); ``uniform``: U(0, 2), the reference's init for its compression
experiments (every gate starts open: the pretrained network intact)."""

ANNEALS = ("epoch", "task")
"""``epoch``: ``s`` restarts at ``1/s_max`` at every epoch's first batch (the reference);
``task``: ``s`` anneals once over all of a task's steps."""


class HAT(Method):
    """Hard attention to the task: per-task gates on every layer's output units."""

    name = "hat"
    default_lr = {"backbone": 0.05, "embeddings": 0.05, "head": 0.05, "bn": 0.05}
    default_optimizer = {"_target_": "torch.optim.SGD", "_partial_": True}
    may_forget = False
    superposable = False  # gates act on layer outputs (after BatchNorm), not on one W

    def __init__(
        self,
        *,
        s_max: float = 400.0,
        c: float = 0.75,
        clipgrad: float = 10000.0,
        thres_cosh: float = 50.0,
        thres_emb: float = 6.0,
        embedding_init: str = "normal",
        anneal: str = "epoch",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if anneal not in ANNEALS:
            raise ValueError(f"hat anneal must be one of {ANNEALS}, got {anneal!r}")
        self.anneal = anneal
        if not s_max >= 1:
            raise ValueError(f"hat s_max must be >= 1, got {s_max}")
        for label, value in (("c", c), ("clipgrad", clipgrad)):
            if not value >= 0:
                raise ValueError(f"hat {label} must be >= 0, got {value}")
        for label, value in (("thres_cosh", thres_cosh), ("thres_emb", thres_emb)):
            if not value > 0:
                raise ValueError(f"hat {label} must be > 0, got {value}")
        if embedding_init not in EMBEDDING_INITS:
            raise ValueError(
                f"hat embedding_init must be one of {EMBEDDING_INITS}, got {embedding_init!r}"
            )
        self.embedding_init = embedding_init
        self.s_max = float(s_max)
        self.c = float(c)
        self.clipgrad = float(clipgrad)
        self.thres_cosh = float(thres_cosh)
        self.thres_emb = float(thres_emb)
        self.slope = 1.0 / self.s_max
        self.gate_info: dict[str, dict[str, Any]] = {}
        self.gates: dict[str, Gate] = {}
        self.owners: dict[str, torch.Tensor] = {}  # per layer, per unit: first task, or FREE
        self.used: dict[str, torch.Tensor] = {}  # per layer: 1 where an earlier task opened
        self.order: list[str] = []

    # ------------------------------------------------------------ the backbone
    def prepare_backbone(self, module: TrainingHost, mask_options: Mapping[str, Any]) -> None:
        """Pick the layers (``mask.target``/``exclude``), their units and gates."""
        from_cfg = {k: mask_options[k] for k in ("target", "exclude") if k in mask_options}
        mask_model(module.backbone, **from_cfg)  # all-ones masks: they only mark the layers
        self.gate_info = describe_gates(module.backbone)
        layers = dict(module.backbone.named_modules())
        for name, info in self.gate_info.items():
            owner = first_mask(layers[name])
            owner.register_parameter(EMBEDDING, nn.Parameter(torch.zeros(info["units"])))
            self.owners[name] = torch.full((info["units"],), FREE, dtype=torch.uint8)
        self.gates = install_gates(module.backbone, self.gate_info, owners=True)
        FirstForwardCheck(module.backbone, self.gate_info)
        self.freeze(module)

    def _params(self, module: TrainingHost) -> list[tuple[str, str, nn.Parameter]]:
        """``(layer, rule, parameter)`` of every trained weight and bias."""
        named = dict(module.backbone.named_parameters())
        return [
            (layer, rule, named[pname])
            for layer, info in self.gate_info.items()
            for pname, rule in info["params"].items()
        ]

    def _embeddings(self) -> list[nn.Parameter]:
        return [gate.embedding for gate in self.gates.values()]

    def freeze(self, module: TrainingHost) -> None:
        module.backbone.requires_grad_(False)
        for _, _, param in self._params(module):
            param.requires_grad_(True)
        for embedding in self._embeddings():
            embedding.requires_grad_(True)
        if self.trains_bn:
            for sub in module.backbone.modules():
                if isinstance(sub, BN_TYPES):
                    sub.requires_grad_(True)

    def backbone_groups(self, module: TrainingHost) -> list[dict[str, Any]]:
        weights = [p for _, _, p in self._params(module)]
        groups = [
            {"name": "backbone", "params": weights, "lr": self.lr["backbone"], "weight_decay": 0.0},
            {
                "name": "embeddings",
                "params": self._embeddings(),
                "lr": self.lr["embeddings"],
                "weight_decay": 0.0,
            },
        ]
        return groups + super().backbone_groups(module)

    # ------------------------------------------------------------------ tasks
    def _index(self, task: str) -> int:
        return self.order.index(task) + 1

    def _set_used(self, index: int) -> None:
        self.used = {n: (o < index).float() for n, o in self.owners.items()}

    def start_task(self, module: TrainingHost, task: str) -> None:
        self.order.append(task)
        self._set_used(self._index(task))
        with torch.no_grad():
            for gate in self.gates.values():
                gate.fixed = None
                if self.embedding_init == "normal":
                    gate.embedding.normal_(0.0, 1.0)
                else:
                    gate.embedding.uniform_(0.0, 2.0)
        super().start_task(module, task)

    def store_task(self, module: TrainingHost, state: TaskState) -> None:
        """Keep the task's embeddings; the newest task owns the free units it opens."""
        index = self._index(module.task)
        if index == len(self.order) and all(g.fixed is None for g in self.gates.values()):
            state.stored["embeddings"] = {
                n: g.embedding.detach().cpu().clone() for n, g in self.gates.items()
            }
            for name, gate in self.gates.items():
                owners = self.owners[name]
                mine = owners >= index
                opened = hard_gate(gate.embedding.detach().cpu()).bool()
                owners[mine] = torch.where(opened[mine], index, FREE).to(owners.dtype)
        super().store_task(module, state)

    def activate_task(self, module: TrainingHost, state: TaskState) -> None:
        live = self._index(module.task) == len(self.order)
        device = next(iter(self._embeddings())).device
        for name, gate in self.gates.items():
            stored = state.stored.get("embeddings", {}).get(name)
            gate.fixed = None if live or stored is None else hard_gate(stored).to(device)
        self._set_used(self._index(module.task))
        super().activate_task(module, state)

    # ------------------------------------------------------- training hooks
    def on_train_batch_start(self, module: TrainingHost, batch_idx: int) -> None:
        """The slope anneals from 1/s_max to s_max within every epoch (reference: ``s``), or
        once over the task's epochs (``anneal="task"``)."""
        trainer = module.trainer
        batches = trainer.num_training_batches
        step, steps = batch_idx, batches
        if self.anneal == "task" and trainer.max_epochs and trainer.max_epochs > 0:
            step, steps = trainer.current_epoch * batches + batch_idx, batches * trainer.max_epochs
        progress = step / steps if math.isfinite(steps) and steps > 0 else 1.0
        self.slope = (self.s_max - 1.0 / self.s_max) * progress + 1.0 / self.s_max
        for gate in self.gates.values():
            gate.slope = self.slope

    def regularizer(self, module: TrainingHost) -> torch.Tensor | None:
        """``c`` times the new task's mean gate over the units earlier tasks leave free."""
        if not self.c or not self.gates:
            return None
        total = count = None
        for name, gate in self.gates.items():
            gates = torch.sigmoid(self.slope * gate.embedding)
            free = 1.0 - self.used[name].to(gates.device)
            part, n = (gates * free).sum(), free.sum()
            total = part if total is None else total + part
            count = n if count is None else count + n
        return self.c * total / count.clamp_min(1.0)

    @torch.no_grad()
    def on_after_backward(self, module: TrainingHost) -> None:
        """Attenuate the weights of earlier tasks' units, compensate the embeddings' gradient
        for the annealing, clip (reference order)."""
        for layer, rule, param in self._params(module):
            if param.grad is not None:
                used = self.used[layer].to(param.grad.device, param.grad.dtype)
                param.grad.mul_(attenuation(used, rule, tuple(param.shape)))
        s = self.slope
        for embedding in self._embeddings():
            if embedding.grad is not None:
                e = embedding.detach()
                num = torch.cosh(torch.clamp(s * e, -self.thres_cosh, self.thres_cosh)) + 1
                embedding.grad.mul_(self.s_max / s * num / (torch.cosh(e) + 1))
        if self.clipgrad:
            params = [p for p in module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clipgrad)

    @torch.no_grad()
    def on_train_batch_end(self, module: TrainingHost) -> None:
        for embedding in self._embeddings():
            embedding.clamp_(-self.thres_emb, self.thres_emb)

    def epoch_metrics(self, module: TrainingHost) -> dict[str, float]:
        units = sum(o.numel() for o in self.owners.values())
        opened = sum(int(hard_gate(g.embedding.detach()).sum()) for g in self.gates.values())
        used = sum(float(u.sum()) for u in self.used.values())
        return {"hat/open": opened / units, "hat/used": used / units, "hat/slope": self.slope}

    def checkpoint_state(self, module: TrainingHost) -> dict[str, Any]:
        return {"owners": self.owners, "order": self.order}

    def load_checkpoint_state(self, module: TrainingHost, state: dict[str, Any]) -> None:
        self.owners = state["owners"]
        self.order = list(state["order"])
        if module.task in self.order:
            self._set_used(self._index(module.task))

    # --------------------------------------------------------------- artifacts
    def export(self, module: TrainingHost, encoding: str) -> ArtifactParts:
        """Embeddings, the values of the units the task opens first, BN when trained."""
        parts = super().export(module, encoding)
        index = self._index(module.task)
        stored = module.tasks[module.task].stored.get("embeddings", {})
        named = dict(module.backbone.named_parameters())
        opened_units = total = 0
        for name, gate in self.gates.items():
            live = gate.fixed is None
            embedding = gate.embedding.detach().cpu() if live else stored[name]
            parts.extra[f"embedding/{name}"] = embedding.clone()
            opened = hard_gate(embedding).bool()
            before = self.owners[name] < index
            new = opened & ~before
            for pname, rule in self.gate_info[name]["params"].items():
                param = named[pname].detach().cpu()
                if rule == "any":
                    take = bool(new.any()) and not bool(before.any())
                    keep = torch.full(param.shape, take)
                else:
                    keep = unit_view(new, rule, tuple(param.shape)).expand(param.shape)
                parts.extra[f"values/{pname}"] = param[keep].clone()
            opened_units += int(opened.sum())
            total += opened.numel()
        parts.extra_meta = {
            **(parts.extra_meta or {}),
            "index": index,
            "previous_tasks": self.order[: index - 1],
            "gates": self.gate_info,
            "s_max": self.s_max,
            "open": opened_units / max(total, 1),
        }
        return parts

    @classmethod
    def apply(
        cls,
        backbone: nn.Module,
        artifact: TaskArtifact,
        pretrained_bn: Mapping[str, torch.Tensor] | None,
    ) -> None:
        why = "its units' weights were trained by it and by every task before it"
        raise untouched_backbone_error("HAT", artifact, why)

    # ------------------------------------------------------ multi-task model
    @classmethod
    def attach(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        """Write the weights of the units the task opens first into the model's one shared,
        gated network (tasks in sequence order)."""
        state = sequence_state(model, cls.name, "HAT", artifact, owners={}, gates={})
        info = artifact.extra_meta["gates"]
        if cls.name not in model.method_networks:
            net = model.separate_network(None)
            net.requires_grad_(False)
            model.method_networks[cls.name] = net
            state["hooks"] = install_gates(net, info, owners=False)
            state["owners"] = {
                n: torch.full((g["units"],), FREE, dtype=torch.uint8) for n, g in info.items()
            }
        net = model.method_networks[cls.name]
        named = dict(net.named_parameters())
        index = len(state["tasks"]) + 1
        gates = {}
        with torch.no_grad():
            for name, gate_info in info.items():
                owners = state["owners"][name]
                opened = hard_gate(artifact.extra[f"embedding/{name}"].float()).bool()
                before = owners < index
                new = opened & ~before
                for pname, rule in gate_info["params"].items():
                    param = named[pname]
                    if rule == "any":
                        take = bool(new.any()) and not bool(before.any())
                        keep = torch.full(param.shape, take)
                    else:
                        keep = unit_view(new, rule, tuple(param.shape)).expand(param.shape)
                    values = artifact.extra[f"values/{pname}"]
                    if values.numel() != int(keep.sum()):
                        raise ArtifactError(
                            f"task {artifact.task!r}: {values.numel()} values for {pname!r}, "
                            f"its gates open {int(keep.sum())}"
                        )
                    param[keep.to(param.device)] = values.to(param)
                owners[new] = index
                gates[name] = opened.float()
        state["tasks"].append(artifact.task)
        state["gates"][artifact.task] = gates

    @classmethod
    def activate(cls, model: InferenceHost, artifact: TaskArtifact) -> None:
        net = model.method_networks[cls.name]
        state = model.method_state[cls.name]
        device = next(iter(net.parameters())).device
        for name, hook in state["hooks"].items():
            hook.fixed = state["gates"][artifact.task][name].to(device)
        Method.apply(net, artifact, model.pretrained_bn)

    @classmethod
    def network(cls, model: InferenceHost, task: str) -> nn.Module:
        return model.method_networks[cls.name]
