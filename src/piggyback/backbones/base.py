"""What a backbone is, how its classifier comes off, and how a local checkpoint goes on."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGENET_DATA_CONFIG: dict[str, Any] = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}
"""What torchvision's ImageNet weights expect."""

CLASSIFIER_NAMES = ("fc", "classifier", "heads", "head")
"""Where torchvision (and most hand-written) models keep their classifier."""


class BackboneError(RuntimeError):
    """A backbone or its weights cannot be had; the message says what to do instead."""


@dataclass
class Backbone:
    """A feature extractor ready for masking, and what the data pipeline should feed it.

    ``data_config`` holds the pretrained weights' ``mean``, ``std``, ``input_size``
    (C, H, W), ``interpolation`` and ``crop_pct``; empty when the network has no opinion.
    """

    model: nn.Module
    feature_dim: int
    name: str
    data_config: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int | None:
        size = self.data_config.get("input_size")
        if size:
            return int(size[0])
        first = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        return None if first is None else first.in_channels


def _last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def remove_classifier(model: nn.Module, classifier: str | None = None) -> tuple[nn.Module, int]:
    """Take the classifier off ``model`` in place; returns the model and its feature width.

    Through the model's own API where it has one (timm's ``reset_classifier(0)``); else the
    named module (``classifier``) or the one found at torchvision's usual places (``fc``,
    ``classifier``, ``heads``, ``head``). A container there loses only its last ``Linear``
    (VGG keeps fc6/fc7, MobileNetV3 its hidden layer). Anything else is ambiguous: the
    error asks for the classifier's name instead of guessing.
    """
    if classifier is None and hasattr(model, "reset_classifier") and hasattr(model, "num_features"):
        model.reset_classifier(0)
        # Models with a pre-logits head (timm MobileNetV3: 1024) output that, not num_features.
        return model, int(getattr(model, "head_hidden_size", None) or model.num_features)
    modules = dict(model.named_modules())
    if classifier is not None:
        if classifier not in modules or not classifier:
            raise BackboneError(
                f"{type(model).__name__} has no module {classifier!r} to remove as the "
                "classifier (backbone.classifier=<module name>)"
            )
        candidates = [classifier]
    else:
        candidates = [n for n in CLASSIFIER_NAMES if n in modules]
    for name in candidates:
        module = modules[name]
        if isinstance(module, nn.Linear):
            _set_submodule(model, name, nn.Identity())
            return model, module.in_features
        found = _last_linear(module)
        if found is not None:
            inner, linear = found
            _set_submodule(model, f"{name}.{inner}", nn.Identity())
            return model, linear.in_features
    last = _last_linear(model)
    hint = f" (its last Linear is {last[0]!r})" if last else ""
    raise BackboneError(
        f"cannot tell which module of {type(model).__name__} is the classifier{hint}; name it "
        "with backbone.classifier=<module name>"
    )


def torch_load_failure(path: Path, exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words: torch's own message is a
    paragraph that advises ``weights_only=False``, which is wrong for a file that is not a
    checkpoint at all and unsafe for one that is."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # zip, or pickle >= 2
        return "neither a torch.save archive nor a pickle"
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        detail = detail.split(". ", 1)[0].strip()  # torch goes on with allowlisting advice
        return f"it holds more than tensors: {detail}; save model.state_dict() instead"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"damaged or truncated: {first}"


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict (``state_dict``/``model`` wrappers and ``module.`` prefixes
    accepted) with ``weights_only``: no code runs. Every failure is a BackboneError that
    names the file and what was expected."""
    path = Path(path)
    arch = type(model).__name__
    expected = f"expected a state dict (parameter name -> tensor) for {arch}"
    if path.is_dir():
        raise BackboneError(f"backbone checkpoint {path} is a directory; {expected} file")
    if not path.is_file():
        raise BackboneError(f"backbone checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises anything on arbitrary bytes (KeyError, ...)
        reason = torch_load_failure(path, e)
        raise BackboneError(
            f"backbone checkpoint {path} is not a readable torch file ({reason}); {expected}"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(
            f"backbone checkpoint {path} holds a {type(state).__name__}, not a state dict; "
            f"{expected}"
        )
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise BackboneError(
            f"checkpoint {path} does not fit the {arch} architecture: {detail}"
        ) from None
