"""What a task's predictions depend on in the frozen backbone: its fingerprint and BN state.

A fingerprint of the frozen backbone catches masks applied to other weights (which would
otherwise give silent garbage); BN state is what tasks with their own BN store and what tasks
with frozen BN are restored to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from piggyback.formats.checked_file import ArtifactError
from piggyback.nn.convert import frozen_state_dict

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)

FINGERPRINT_SCHEME = "state-v2"
"""Prefix of current fingerprints; artifacts without it carry the v1 (conv/linear) scheme."""


def _hash_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().data)


def fingerprint(
    backbone: nn.Module,
    *,
    bn_state: Mapping[str, torch.Tensor] | None = None,
    exclude: Iterable[str] = (),
) -> str:
    """SHA-256 of everything a task's predictions depend on in the frozen backbone.

    That is the whole state dict except the per-task masks: conv/linear/attention weights
    and biases, BatchNorm affine parameters *and running statistics* (two backbones with the
    same weights but other BN statistics predict differently), embeddings, LayerNorms.
    ``bn_state`` (the pretrained BN state) replaces the live BN tensors, so a backbone that
    currently runs a task with its own trained BN still fingerprints as the pretrained one.
    ``exclude`` names modules whose tensors are left out (per-task modules that train in
    place, such as a classifier of the PEFT-style API's ``modules_to_save``).
    """
    digest = hashlib.sha256()
    state = frozen_state_dict(backbone)
    prefixes = tuple(f"{name}." for name in exclude)
    if prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    if bn_state is not None:
        state.update({k: v for k, v in bn_state.items() if k in state})
    for key, tensor in state.items():
        _hash_tensor(digest, key, tensor)
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"


def legacy_fingerprint(backbone: nn.Module) -> str:
    """The v1 fingerprint (format-1 artifacts): frozen ``nn.Conv2d``/``nn.Linear`` tensors only."""
    digest = hashlib.sha256()
    for name, module in backbone.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        for pname in ("weight", "bias"):
            tensor = module._parameters.get(pname)
            if tensor is not None:
                _hash_tensor(digest, f"{name}.{pname}", tensor)
    return digest.hexdigest()


def bn_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Affine parameters and running statistics of every BatchNorm layer."""
    state: dict[str, torch.Tensor] = {}
    for name, module in backbone.named_modules():
        if isinstance(module, _BN_TYPES):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
    return state


def load_bn_state(backbone: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    modules = dict(backbone.named_modules())
    for full_key, value in state.items():
        name, _, key = full_key.rpartition(".")
        module = modules.get(name)
        if not isinstance(module, _BN_TYPES):
            raise ArtifactError(
                f"artifact has BN state for {name!r}, not a BatchNorm in this model"
            )
        target = module.state_dict()[key] if key in module.state_dict() else None
        if target is None or target.shape != value.shape:
            raise ArtifactError(f"BN state {full_key!r} does not fit this model")
        with torch.no_grad():
            target.copy_(value)
