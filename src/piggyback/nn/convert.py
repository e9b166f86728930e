"""Mask any network in place — torchvision, timm, ViTs — without per-model code.

:func:`mask_model` picks weight tensors by module type (the paper's choice: every conv and
linear weight, plus ``nn.MultiheadAttention``'s input projection) and PEFT-style name
patterns, and gates each one with :func:`~piggyback.nn.layers.add_weight_mask`. What it
cannot mask correctly it refuses, naming the module and its type, so a mask is never
silently ignored.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from piggyback.nn.layers import (
    DEFAULT_MASK_SCALE,
    MASKS_ATTR,
    WeightMask,
    add_weight_mask,
    is_masked,
    module_masks,
    remove_weight_masks,
)
from piggyback.nn.threshold import DEFAULT_TEMPERATURE, DEFAULT_THRESHOLD

MASKABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,  # Conv1d/2d/3d, ConvTranspose*, and every subclass (timm, ...)
    nn.Linear,  # and subclasses, e.g. MultiheadAttention.out_proj
    nn.MultiheadAttention,
)
"""Module types whose forward is known to read its weights through the attribute."""

EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding,)
"""Also read through the attribute (``F.embedding(x, self.weight)``), but masked only on
request (``embeddings=True``): Piggyback's choice is the layers that compute, and a token
table's rows are the vocabulary, not features."""


class MaskingError(ValueError):
    """A weight cannot be masked so that the mask really acts; the message names it."""


def weight_names(module: nn.Module, embeddings: bool = False) -> tuple[str, ...]:
    """The weight tensors of ``module`` that Piggyback masks by default (with
    ``embeddings``, an ``nn.Embedding``'s table too)."""
    if embeddings and isinstance(module, EMBEDDING_TYPES):
        return ("weight",)
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    if isinstance(module, MASKABLE_TYPES):
        return ("weight",)
    return ()


def _matches(names: Iterable[str], patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for name in names for p in patterns)


def _qualified(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _check_maskable(model: nn.Module, module_name: str, module: nn.Module, pname: str) -> None:
    """Refuse, with the module's name and type, whatever a mask could not really act on."""
    where = (
        f"{_qualified(module_name, pname)!r} ({type(module).__module__}.{type(module).__name__})"
    )
    if not isinstance(module, MASKABLE_TYPES + EMBEDDING_TYPES):
        raise MaskingError(
            f"cannot mask {where}: only conv, linear, embedding and nn.MultiheadAttention "
            "weights are known to be read through their attribute; exclude it or target its "
            "sub-layers"
        )
    if hasattr(module, "parametrizations"):
        raise MaskingError(
            f"cannot mask {where}: it is already reparametrized by torch.nn.utils.parametrize "
            "(weight_norm, spectral_norm, ...); remove that first or exclude the layer"
        )
    param = module._parameters.get(pname)
    if param is None:
        raise MaskingError(
            f"cannot mask {where}: it has no parameter {pname!r} (a hook-computed weight such "
            "as the old torch.nn.utils.weight_norm, or no weight at all); exclude it"
        )
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise MaskingError(f"cannot mask {where}: lazy module not initialised; run one forward")


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return {k: v for k, v in owners.items() if len(v) > 1}


def mask_model(
    model: nn.Module,
    *,
    mask_init: str = "1s",
    mask_scale: float = DEFAULT_MASK_SCALE,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_fn: str = "binarizer",
    grad_rescale: str = "none",
    target: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    granularity: str = "element",
    soft: bool = False,
    temperature: float = DEFAULT_TEMPERATURE,
    embeddings: bool = False,
) -> nn.Module:
    """Gate, in place, every conv/linear/attention weight of ``model`` by a learned mask.

    ``target`` (default: all of them) and ``exclude`` hold ``fnmatch`` patterns matched
    against module names (``"layer4.*"``, ``"fc"``) and parameter names
    (``"*.in_proj_weight"``). Wildcards select maskable weights only; an exact parameter
    name of anything else is attempted and refused if it cannot work. A ``target`` pattern
    that matches nothing is an error, so a typo cannot leave a model unmasked. Weights
    already masked are left as they are, so calling this twice is harmless. Returns
    ``model`` for chaining.

    ``granularity`` (``element`` | ``kernel`` | ``filter``, see
    :func:`~piggyback.nn.layers.unit_shape`) sets how many weights share one mask value;
    ``soft`` adds KSM's learned scale per unit, trained with the softmax trick at
    ``temperature`` (see :class:`~piggyback.nn.layers.WeightMask`).

    ``embeddings=True`` adds every ``nn.Embedding`` table (a transformer's token, position
    and segment embeddings) to the weights that are masked by default and that wildcards
    select; without it they stay unmasked (an exact parameter name still masks one).
    """
    exclude = tuple(exclude)
    patterns = None if target is None else tuple(target)
    options = dict(
        mask_init=mask_init,
        mask_scale=mask_scale,
        threshold=threshold,
        threshold_fn=threshold_fn,
        grad_rescale=grad_rescale,
        granularity=granularity,
        soft=bool(soft),
        temperature=temperature,
    )
    chosen: list[tuple[str, nn.Module, str]] = []
    used_patterns: set[str] = set()
    for module_name, module in model.named_modules():
        if module_name.endswith(MASKS_ATTR) or isinstance(module, WeightMask):
            continue
        defaults = weight_names(module, embeddings)
        if patterns is None:
            candidates = defaults
        else:
            candidates = []
            own = [n for n, _ in module.named_parameters(recurse=False)]
            for pname in own:
                qualified = _qualified(module_name, pname)
                hit = [p for p in patterns if fnmatch.fnmatchcase(qualified, p)]
                if pname in defaults:
                    hit += [p for p in patterns if fnmatch.fnmatchcase(module_name, p)]
                else:  # wildcards pick maskable weights only; an exact name is a request
                    hit = [p for p in hit if p == qualified]
                if hit:
                    used_patterns.update(hit)
                    candidates.append(pname)
        for pname in candidates:
            if _matches((module_name, _qualified(module_name, pname)), exclude):
                continue
            if pname in module_masks(module):
                continue
            _check_maskable(model, module_name, module, pname)
            chosen.append((module_name, module, pname))
    if patterns is not None and (unused := sorted(set(patterns) - used_patterns)):
        raise MaskingError(f"mask target patterns {unused} match no parameter of the model")
    shared = _shared_parameters(model)
    for module_name, module, pname in chosen:
        names = shared.get(id(module._parameters[pname]))
        if names:
            raise MaskingError(
                f"cannot mask {_qualified(module_name, pname)!r}: the same tensor is also "
                f"used as {[n for n in names if n != _qualified(module_name, pname)]}, which "
                "would read it unmasked; untie the weights or exclude it"
            )
    for _, module, pname in chosen:
        add_weight_mask(module, pname, **options)
    return model


def masked_weights(model: nn.Module) -> Iterator[tuple[str, WeightMask]]:
    """``(parameter name, mask)`` for every masked weight, in module order.

    The name is the frozen parameter's own qualified name (``layer1.0.conv1.weight``,
    ``encoder.layers.0.self_attention.in_proj_weight``).
    """
    for module_name, module in model.named_modules():
        for pname, mask in module_masks(module).items():
            yield _qualified(module_name, pname), mask


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(module name, module)`` for every module that has at least one masked weight."""
    for name, module in model.named_modules():
        if is_masked(module):
            yield name, module


def num_masked_weights(model: nn.Module) -> int:
    """Weights gated by a mask (whatever the granularity)."""
    return sum(mask.weight.numel() for _, mask in masked_weights(model))


def num_mask_units(model: nn.Module) -> int:
    """Mask values (one stored bit each): the weights for ``element`` granularity."""
    return sum(mask.mask_real.numel() for _, mask in masked_weights(model))


@torch.no_grad()
def get_masks(model: nn.Module, *, per_weight: bool = False) -> dict[str, torch.Tensor]:
    """The current thresholded mask of every masked weight, by parameter name.

    Masks have their granularity's unit shape; ``per_weight=True`` expands each to its
    weight's shape (a view), so statistics count weights rather than mask units.
    """
    masks = {name: (mask, mask.mask()) for name, mask in masked_weights(model)}
    if not per_weight:
        return {name: m for name, (_, m) in masks.items()}
    return {name: m.expand(layer.weight.shape) for name, (layer, m) in masks.items()}


@torch.no_grad()
def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Load quantised masks into a masked model; names must match exactly."""
    current = dict(masked_weights(model))
    missing = sorted(set(current) - set(masks))
    unknown = sorted(set(masks) - set(current))
    if missing or unknown:
        raise ValueError(
            f"masks do not match the model's masked weights: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}"
            f"{'...' if len(unknown) > 5 else ''}"
        )
    for name, mask in current.items():
        mask.set_mask(masks[name])


def reset_masks(
    model: nn.Module, mask_init: str = "1s", mask_scale: float = DEFAULT_MASK_SCALE
) -> None:
    """Start a fresh task: every mask back to its initial value."""
    for _, mask in masked_weights(model):
        mask.reset_mask(mask_init, mask_scale)


def mask_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The real-valued masks (``mask_real``) of every masked weight."""
    for _, mask in masked_weights(model):
        yield mask.mask_real


def scale_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The per-unit scales of soft (KSM) masks; nothing for plain masks."""
    for _, mask in masked_weights(model):
        if mask.soft_scale is not None:
            yield mask.soft_scale


def frozen_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the per-task ``mask_real`` / ``soft_scale`` tensors."""
    marker = f"{MASKS_ATTR}."
    return {
        k: v
        for k, v in model.state_dict().items()
        if not (
            k.endswith((".mask_real", ".soft_scale"))
            and (k.startswith(marker) or f".{marker}" in k)
        )
    }


def unmask_model(model: nn.Module) -> nn.Module:
    """Remove every mask in place, restoring the untouched pretrained modules."""
    for _, module in list(masked_modules(model)):
        remove_weight_masks(module, apply=False)
    return model


@torch.no_grad()
def materialize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain model whose masked weights are ``W * M``: original classes, exportable.

    The result has no mask parameters and the modules' own classes, so ``torch.export``,
    ONNX and any deployment tool see a standard network at full speed.
    """
    target = model if inplace else copy.deepcopy(model)
    for _, module in list(masked_modules(target)):
        remove_weight_masks(module, apply=True)
    return target
