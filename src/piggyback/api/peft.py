"""Piggyback masks on any ``nn.Module`` the PEFT way: wrap, train, save, load, switch, merge.

For people who do not use the Hydra app. The names follow Hugging Face PEFT where the
meaning is the same, so code written against PEFT reads the same::

    PEFT                                      here
    LoraConfig(target_modules=...,            MaskConfig(target_modules=...,
               modules_to_save=[...])                    modules_to_save=[...])
    get_peft_model(model, config)             get_masked_model(model, config) (or **options)
    model.print_trainable_parameters()        model.print_trainable_parameters()
    model.save_pretrained(dir)                model.save_pretrained(dir)
    PeftModel.from_pretrained(base, dir)      MaskedModel.from_pretrained(base, dir)
    model.load_adapter(dir, adapter_name)     model.load_task(dir, task_name)
    model.add_adapter(name, config)           model.add_task(name)
    model.set_adapter(name)                   model.set_task(name)
    model.active_adapter                      model.active_task
    model.delete_adapter(name)                model.delete_task(name)
    with model.disable_adapter():             with model.disable_masks():
    model.merge_and_unload()                  model.merge_and_unload()
    model.unload()                            model.unload()
    model.get_base_model()                    model.get_base_model()

Where it differs, and why:

- *Adapter* is *task*: a task is one binary mask per masked weight (1 bit per weight, the
  frozen ``W`` is shared) plus that task's copy of the ``modules_to_save`` (a classifier).
  Nothing is added to the network: a masked layer computes with ``W * M``, so a task's
  outputs are exactly those of the pretrained network with some weights switched off.
- ``target_modules``: names as in PEFT (a list: a module matches when its name is the entry
  or ends with ``.<entry>``; a string: a regular expression the whole name must match;
  ``"all-linear"``: every ``nn.Linear``, the output layer included unless it is in
  ``modules_to_save`` or ``exclude_modules``, where PEFT leaves it out), but ``None`` means
  Piggyback's default, *every* conv / linear / attention weight, not the model type's usual
  LoRA targets. ``None`` masks ``nn.Embedding`` tables only with ``embeddings=True``; an
  embedding named in ``target_modules`` is masked.
- All tasks of one base model mask the same weights (the config is fixed by the first task);
  ``add_task`` takes no config and ``load_task`` refuses a task that masks other weights.
- ``save_pretrained(dir)`` writes *one* task (the active one, or ``task_name``) per folder:
  ``mask_config.json`` (PEFT: ``adapter_config.json``) and ``mask_model.safetensors`` (PEFT:
  ``adapter_model.safetensors``), the latter a piggyback task artifact with its integrity
  digest and the fingerprint of the base weights. Loading refuses a base model whose weights
  differ from the one the task was learned on (PEFT loads onto anything of the right shape).
- ``merge_and_unload`` cannot be undone (a switched-off weight is 0 in the merged model), so
  there is no ``merge_adapter`` / ``unmerge_adapter``; ``inplace=False`` exports a merged
  copy and keeps every task.
- BatchNorm layers of the base model stay in eval mode in ``train()`` (their running
  statistics are shared by every task) unless they are listed in ``modules_to_save``.
- ``from_pretrained`` loads for inference (masks frozen) unless ``is_trainable=True``, as PEFT.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from piggyback.formats import (
    ArtifactError,
    TaskArtifact,
    fingerprint,
    load_artifact,
    load_masks,
    pack_model_masks,
    save_artifact,
)
from piggyback.formats.packed import PackedMask
from piggyback.nn import (
    EMBEDDING_TYPES,
    MaskingError,
    mask_model,
    masked_weights,
    materialize,
    pretrained_weights,
    reset_masks,
    unmask_model,
    weight_names,
)

__all__ = [
    "CONFIG_NAME",
    "CONFIG_FORMAT",
    "WEIGHTS_NAME",
    "MaskConfig",
    "MaskedModel",
    "get_masked_model",
]

CONFIG_NAME = "mask_config.json"
WEIGHTS_NAME = "mask_model.safetensors"
CONFIG_FORMAT = "piggyback-mask-config"
CONFIG_VERSION = 1
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class MaskConfig:
    """Which weights get a mask and how masks learn (PEFT: a ``PeftConfig``).

    ``target_modules`` / ``exclude_modules``: see the module docstring (``None``: every
    conv, linear and attention weight). ``modules_to_save``: modules (matched like targets)
    that train in full and are stored per task, typically the classifier. ``embeddings``:
    mask ``nn.Embedding`` tables too. The rest are Piggyback's mask options
    (``piggyback.nn.mask_model``): ``granularity`` element | kernel | filter, ``soft`` (KSM's
    learned scales), ``threshold`` / ``threshold_fn`` (binarizer | ternarizer), the
    ``mask_init`` (``1s``: start at the pretrained network) and ``mask_scale``.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    embeddings: bool = False
    granularity: str = "element"
    soft: bool = False
    threshold: float = 5e-3
    threshold_fn: str = "binarizer"
    mask_init: str = "1s"
    mask_scale: float = 1e-2
    temperature: float = 1e-2
    #: filled in by :func:`get_masked_model`: the exact parameter names that were masked
    masked_weights: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# ------------------------------------------------------------------ name matching
def _matcher(spec: list[str] | str | None, what: str):
    """PEFT's rule: a string is a regular expression over the whole module name; a list
    matches a name equal to an entry or ending with ``.<entry>``."""
    if spec is None:
        return None, []
    if isinstance(spec, str):
        if spec == "all-linear":
            return (lambda name, module: isinstance(module, nn.Linear)), []
        pattern = re.compile(spec)
        return (lambda name, module: pattern.fullmatch(name) is not None), []
    entries = [str(e) for e in spec]
    if not entries:
        raise MaskingError(f"{what} is an empty list; leave it out (None) for the default")

    def match(name: str, module: nn.Module) -> bool:
        return any(name == e or name.endswith(f".{e}") for e in entries)

    return match, entries


def _resolve(model: nn.Module, config: MaskConfig) -> tuple[list[str], list[str]]:
    """(exact parameter names to mask, exact module names to save) for ``config``."""
    save_match, save_entries = _matcher(config.modules_to_save, "modules_to_save")
    saved = [n for n, m in model.named_modules() if n and save_match and save_match(n, m)]
    for entry in save_entries:
        if not any(n == entry or n.endswith(f".{entry}") for n in saved):
            raise MaskingError(f"modules_to_save entry {entry!r} matches no module of the model")
    saved = [n for n in saved if not any(n.startswith(f"{s}.") for s in saved)]  # outermost
    target_match, target_entries = _matcher(config.target_modules, "target_modules")
    exclude_match, _ = _matcher(config.exclude_modules, "exclude_modules")
    chosen, hits = [], set()
    for name, module in model.named_modules():
        pnames = weight_names(module, config.embeddings)
        if not pnames and target_match is not None and isinstance(module, EMBEDDING_TYPES):
            pnames = ("weight",)  # a targeted embedding is masked even without the flag
        if not pnames or any(name == s or name.startswith(f"{s}.") for s in saved):
            continue
        if target_match is not None:
            if not target_match(name, module):
                continue
            hits.update(e for e in target_entries if name == e or name.endswith(f".{e}"))
        if exclude_match is not None and exclude_match(name, module):
            continue
        chosen += [f"{name}.{p}" if name else p for p in pnames]
    missing = [e for e in target_entries if e not in hits]
    if missing:
        raise MaskingError(
            f"target_modules {missing} match no conv, linear, attention or embedding module "
            "of the model (a container such as a whole attention block is not a target: "
            "name its layers)"
        )
    if not chosen:
        raise MaskingError("the config selects no weight to mask")
    return chosen, saved


# ------------------------------------------------------------------ the model
@dataclass
class _Task:
    masks: dict[str, PackedMask] | None = None  # None: the live (active) task
    saved: dict[str, torch.Tensor] = field(default_factory=dict)


class MaskedModel(nn.Module):
    """A base model with Piggyback masks and any number of tasks (PEFT: ``PeftModel``).

    Build it with :func:`get_masked_model` or :meth:`from_pretrained`. ``model(...)`` calls
    the base model with the active task's masks (and ``modules_to_save``). The base model is
    changed in place (its masked layers gain a mask each), as PEFT changes it.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MaskConfig,
        task_name: str = "default",
        *,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.config = copy.deepcopy(config)
        wanted, self.saved_modules = _resolve(model, self.config)
        if self.config.masked_weights:  # a saved task: exactly the weights it masked
            wanted = list(self.config.masked_weights)
        # fingerprint before anything trains: the pretrained weights every task builds on
        self.base_fingerprint = fingerprint(model, exclude=self.saved_modules)
        self._original_saved = self._saved_state()
        mask_model(
            model,
            target=wanted,
            granularity=self.config.granularity,
            soft=self.config.soft,
            threshold=self.config.threshold,
            threshold_fn=self.config.threshold_fn,
            mask_init=self.config.mask_init,
            mask_scale=self.config.mask_scale,
            temperature=self.config.temperature,
        )
        self.config.masked_weights = [name for name, _ in masked_weights(model)]
        self._tasks: dict[str, _Task] = {task_name: _Task()}
        self.active_task = task_name
        self._trainable = trainable
        self._set_requires_grad()

    # ----------------------------------------------------------- PEFT-like basics
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model itself (masked in place)."""
        return self.base_model

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def train(self, mode: bool = True) -> MaskedModel:
        """As ``nn.Module.train``, but the base model's BatchNorm layers stay in eval mode
        (their statistics are shared by every task) unless they are in ``modules_to_save``."""
        super().train(mode)
        for name, module in self.base_model.named_modules():
            if isinstance(module, _BN) and not self._is_saved(name):
                module.eval()
        return self

    def _is_saved(self, name: str) -> bool:
        return any(name == s or name.startswith(f"{s}.") for s in self.saved_modules)

    def _set_requires_grad(self) -> None:
        for name, param in self.base_model.named_parameters():
            learns = name.endswith((".mask_real", ".soft_scale")) or self._is_saved(name)
            param.requires_grad_(self._trainable and learns)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; masks count one per mask value."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ----------------------------------------------------------- tasks
    def _saved_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name in self.saved_modules:
            module = self.base_model.get_submodule(name)
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
        return state

    @torch.no_grad()
    def _load_saved(self, state: dict[str, torch.Tensor]) -> None:
        live = {}
        for name in self.saved_modules:
            module = self.base_model.get_submodule(name)
            live.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        if set(state) != set(live):
            diff = sorted(set(state) ^ set(live))[:5]
            raise ArtifactError(f"the task's modules_to_save do not fit this model ({diff})")
        for key, value in state.items():
            live[key].copy_(value)

    def _store_active(self) -> None:
        task = self._tasks[self.active_task]
        task.masks = pack_model_masks(self.base_model)
        task.saved = self._saved_state()

    @torch.no_grad()
    def _activate(self, name: str) -> None:
        task = self._tasks[name]
        if task.masks is not None:
            load_masks(self.base_model, task.masks, name)
        self._load_saved(task.saved or self._original_saved)
        task.masks = None  # live now
        self.active_task = name

    def _known(self, name: str) -> None:
        if name not in self._tasks:
            raise KeyError(f"unknown task {name!r}; this model has {self.tasks}")

    def set_task(self, task_name: str) -> None:
        """Compute ``task_name`` (PEFT: ``set_adapter``): its masks and saved modules are
        loaded into the base model; the weights themselves never change."""
        self._known(task_name)
        if task_name == self.active_task:
            return
        self._store_active()
        self._activate(task_name)

    def add_task(self, task_name: str) -> None:
        """A new task with fresh masks (at their init) and the original ``modules_to_save``,
        made the active task (PEFT's ``add_adapter`` does not activate; here the new task is
        the one that trains next). It masks the same weights as every other task."""
        if task_name in self._tasks:
            raise ValueError(f"task {task_name!r} already exists; known tasks: {self.tasks}")
        self._store_active()
        reset_masks(self.base_model, self.config.mask_init, self.config.mask_scale)
        self._load_saved(self._original_saved)
        self._tasks[task_name] = _Task()
        self.active_task = task_name
        self._trainable = True  # a new task is there to be trained
        self._set_requires_grad()

    def delete_task(self, task_name: str) -> None:
        self._known(task_name)
        if len(self._tasks) == 1:
            raise ValueError("cannot delete the only task; unload() the masks instead")
        if task_name == self.active_task:
            self.set_task(next(t for t in self._tasks if t != task_name))
        del self._tasks[task_name]

    @contextmanager
    def disable_masks(self) -> Iterator[None]:
        """Inside the block the model is the pretrained one: masks ignored, the original
        ``modules_to_save`` (PEFT: ``disable_adapter``)."""
        current = self._saved_state()
        try:
            self._load_saved(self._original_saved)
            with pretrained_weights(self.base_model):
                yield
        finally:
            self._load_saved(current)

    # ----------------------------------------------------------- export
    def merge_and_unload(self, task_name: str | None = None, *, inplace: bool = True) -> nn.Module:
        """The base model computing ``task_name`` (default: the active task) with plain
        weights ``W * M``: its own classes, no mask parameters, ready for ``torch.export`` or
        ONNX. ``inplace=True`` (PEFT's behaviour) turns the wrapped model itself into it and
        this wrapper is done; ``inplace=False`` returns a merged copy and keeps every task."""
        if task_name is not None:
            self.set_task(task_name)
        merged = materialize(self.base_model, inplace=inplace)
        merged.requires_grad_(False)
        if inplace:
            self._tasks.clear()
        return merged

    def unload(self) -> nn.Module:
        """The base model as it was pretrained: masks removed, original ``modules_to_save``."""
        self._load_saved(self._original_saved)
        model = unmask_model(self.base_model)
        self._tasks.clear()
        return model

    # ----------------------------------------------------------- files
    def _artifact(self, task_name: str) -> TaskArtifact:
        self._known(task_name)
        if task_name == self.active_task:
            masks, saved = pack_model_masks(self.base_model), self._saved_state()
        else:
            task = self._tasks[task_name]
            masks, saved = task.masks, task.saved or self._original_saved
        return TaskArtifact(
            task=task_name,
            num_classes=0,  # the classifier, if any, is among the saved modules
            method="piggyback",
            backbone=_model_name(self.base_model),
            fingerprint=self.base_fingerprint,
            head={},
            masks=dict(masks or {}),
            weights={k: v.detach().to("cpu").contiguous() for k, v in saved.items()},
            threshold_fn=self.config.threshold_fn,
            threshold=self.config.threshold,
            extra_meta={"modules_to_save": list(self.saved_modules)},
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        task_name: str | None = None,
        *,
        overwrite: bool = True,
    ) -> Path:
        """Write ``task_name`` (default: the active task) into ``save_directory``: the
        config JSON and the task file (masks at 1 bit per weight, the saved modules).
        Returns the folder."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        name = task_name or self.active_task
        artifact = self._artifact(name)
        save_artifact(artifact, folder / WEIGHTS_NAME, overwrite=overwrite)
        config = {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "task_name": name,
            "base_model_class": type(self.base_model).__name__,
            "base_model_name_or_path": _model_name(self.base_model),
            "base_model_fingerprint": self.base_fingerprint,
            "modules_to_save_resolved": list(self.saved_modules),
            **self.config.to_dict(),
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        task_name: str | None = None,
        *,
        is_trainable: bool = False,
    ) -> MaskedModel:
        """Put the task saved in folder ``model_id`` onto ``model`` (the same pretrained base
        it was learned on: its weights are checked) and make it the active task."""
        config, stored_name = _read_config(model_id)
        name = task_name or stored_name
        wrapped = cls(model, config, name, trainable=is_trainable)
        wrapped._load_into(name, model_id)
        return wrapped

    def load_task(
        self,
        model_id: str | os.PathLike,
        task_name: str | None = None,
        *,
        activate: bool = False,
    ) -> str:
        """Add the task saved in folder ``model_id`` (PEFT: ``load_adapter``); it becomes the
        active task only with ``activate=True``, as PEFT. Returns its name."""
        config, stored_name = _read_config(model_id)
        name = task_name or stored_name
        if name in self._tasks:
            raise ValueError(f"task {name!r} already exists; pass another task_name")
        if sorted(config.masked_weights) != sorted(self.config.masked_weights):
            raise ArtifactError(
                f"{model_id}: the task masks other weights than this model's tasks; tasks "
                "learned with other target_modules cannot share one base model"
            )
        previous = self.active_task
        self._store_active()
        self._tasks[name] = _Task()
        self.active_task = name
        self._load_into(name, model_id)
        if not activate:
            self.set_task(previous)
        return name

    @torch.no_grad()
    def _load_into(self, name: str, model_id: str | os.PathLike) -> None:
        artifact = load_artifact(Path(model_id) / WEIGHTS_NAME)
        if artifact.fingerprint != self.base_fingerprint:
            raise ArtifactError(
                f"{model_id}: task {artifact.task!r} was learned on other base weights "
                f"({artifact.backbone!r}, fingerprint {artifact.fingerprint[:18]}…, this "
                f"model {self.base_fingerprint[:18]}…); load the base model it was trained on"
            )
        load_masks(self.base_model, artifact.masks, name)
        self._load_saved(dict(artifact.weights))


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else type(model).__name__


def _read_config(model_id: str | os.PathLike) -> tuple[MaskConfig, str]:
    path = Path(model_id) / CONFIG_NAME
    if not path.is_file():
        raise ArtifactError(f"{path} not found: not a folder written by save_pretrained")
    data = json.loads(path.read_text())
    if data.get("format") != CONFIG_FORMAT:
        raise ArtifactError(f"{path} is not a piggyback mask config")
    if int(data.get("version", 0)) > CONFIG_VERSION:
        raise ArtifactError(f"{path} has version {data['version']}; update piggyback")
    return MaskConfig.from_dict(data), str(data["task_name"])


def get_masked_model(
    model: nn.Module,
    config: MaskConfig | None = None,
    task_name: str = "default",
    **options: Any,
) -> MaskedModel:
    """Mask ``model`` for a first task (PEFT: ``get_peft_model``); returns the wrapper.

    Pass a :class:`MaskConfig` or its fields as keywords
    (``get_masked_model(bert, target_modules=["query", "value"])``). Only the masks (and
    ``modules_to_save``) train; at the ``1s`` init the model computes exactly what it did.
    """
    if config is None:
        config = MaskConfig(**options)
    elif options:
        config = MaskConfig(**{**config.to_dict(), **options})
    return MaskedModel(model, config, task_name)
