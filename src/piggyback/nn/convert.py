"""Turn any torchvision-style CNN into a masked one without per-model code."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from piggyback.nn.layers import DEFAULT_MASK_SCALE, MaskedConv2d, MaskedLinear, adopt_state
from piggyback.nn.threshold import DEFAULT_THRESHOLD

MASKED_TYPES = (MaskedConv2d, MaskedLinear)


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def mask_model(
    model: nn.Module,
    *,
    mask_init: str = "1s",
    mask_scale: float = DEFAULT_MASK_SCALE,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_fn: str = "binarizer",
    grad_rescale: str = "none",
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Replace, in place, every ``nn.Conv2d``/``nn.Linear`` not matched by ``exclude``.

    ``exclude`` holds qualified module names or ``fnmatch`` patterns (``"fc"``,
    ``"classifier.*"``). Layers that are already masked are left as they are, so calling
    this twice is harmless. Returns ``model`` for chaining.
    """
    exclude = tuple(exclude)
    options = dict(
        mask_init=mask_init,
        mask_scale=mask_scale,
        threshold=threshold,
        threshold_fn=threshold_fn,
        grad_rescale=grad_rescale,
    )
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name
        and isinstance(module, (nn.Conv2d, nn.Linear))
        and not isinstance(module, MASKED_TYPES)
        and not _excluded(name, exclude)
    ]
    for name, module in targets:
        if isinstance(module, nn.Conv2d):
            masked = MaskedConv2d.from_conv(module, **options)
        else:
            masked = MaskedLinear.from_linear(module, **options)
        _set_submodule(model, name, masked)
    return model


def masked_layers(model: nn.Module) -> Iterator[tuple[str, MaskedConv2d | MaskedLinear]]:
    """``(qualified name, layer)`` for every masked layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MASKED_TYPES):
            yield name, module


def num_masked_weights(model: nn.Module) -> int:
    return sum(layer.weight.numel() for _, layer in masked_layers(model))


@torch.no_grad()
def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current thresholded mask of every masked layer."""
    return {name: layer.mask() for name, layer in masked_layers(model)}


@torch.no_grad()
def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Load quantised masks into a masked model; names must match exactly."""
    layers = dict(masked_layers(model))
    missing = sorted(set(layers) - set(masks))
    unknown = sorted(set(masks) - set(layers))
    if missing or unknown:
        raise ValueError(
            f"masks do not match the model's masked layers: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}"
            f"{'...' if len(unknown) > 5 else ''}"
        )
    for name, layer in layers.items():
        layer.set_mask(masks[name])


def reset_masks(
    model: nn.Module, mask_init: str = "1s", mask_scale: float = DEFAULT_MASK_SCALE
) -> None:
    """Start a fresh task: every masked layer back to its initial mask."""
    for _, layer in masked_layers(model):
        layer.reset_mask(mask_init, mask_scale)


def mask_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for _, layer in masked_layers(model):
        yield layer.mask_real


def strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the last ``nn.Linear`` (the 1000-way ImageNet classifier) by ``Identity``.

    Works for resnets, vgg, densenet, mobilenet, efficientnet, ... because torchvision
    defines the classifier last. Returns the model and the feature width the head needs.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to strip")
    name, last = linears[-1]
    _set_submodule(model, name, nn.Identity())
    return model, last.in_features


@torch.no_grad()
def materialize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain model whose conv/linear weights are ``W * M``: original speed, exportable.

    The result has ordinary ``nn.Conv2d``/``nn.Linear`` layers and no mask parameters, so
    ``torch.export``/ONNX and any deployment tool see a standard network.
    """
    target = model if inplace else copy.deepcopy(model)
    for name, layer in list(masked_layers(target)):
        weight = (layer.weight * layer.mask().to(layer.weight.dtype)).detach()
        plain_cls = nn.Conv2d if isinstance(layer, MaskedConv2d) else nn.Linear
        plain = plain_cls.__new__(plain_cls)
        adopt_state(plain, layer)
        params = dict(layer._parameters)
        params.pop("mask_real")
        params["weight"] = nn.Parameter(weight, requires_grad=False)
        plain._parameters = params
        for attr in ("threshold", "threshold_fn", "grad_rescale"):
            plain.__dict__.pop(attr, None)
        _set_submodule(target, name, plain)
    return target
