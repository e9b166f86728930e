"""Masks that gate a module's weight *tensor*, not its class.

A masked module keeps its own ``forward`` and its own class behaviour (timm's
``Conv2dSame`` padding, ``StdConv2d`` weight standardisation, ``nn.MultiheadAttention``
reading ``in_proj_weight`` and ``out_proj.weight`` directly, BEiT reading ``qkv.weight``
through ``F.linear``): every read of the attribute, by the module itself or by anyone else,
returns ``W * M``.

How: the module's class is swapped for a cached subclass that adds one property per masked
parameter name. The property wins over ``nn.Module.__getattr__`` (which is only consulted
when normal lookup fails), so ``module.weight`` computes ``W * M`` while the frozen ``W``
stays in ``module._parameters['weight']`` under its original state-dict key. The learned
mask lives in a :class:`WeightMask` submodule, ``<module>.piggyback.<param>.mask_real``.

Why not ``torch.nn.utils.parametrize`` (measured, torch 2.x): it renames the frozen weight
to ``parametrizations.weight.original`` (every torchvision/timm state dict, checkpoint and
fingerprint key moves) and builds classes that refuse to pickle, which breaks
``ddp_spawn`` and ``multiprocessing``. This subclass pickles (``__reduce_ex__``) and keeps
the keys; otherwise it is the same reparametrization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from piggyback.nn.recompute import mark_recomputable
from piggyback.nn.threshold import (
    DEFAULT_TEMPERATURE,
    DEFAULT_THRESHOLD,
    GRAD_RESCALES,
    THRESHOLD_FNS,
    masked_weight,
    quantize,
    unit_masked_weight,
)

MASK_INITS: tuple[str, ...] = ("1s", "uniform", "weight_based_1s")
GRANULARITIES: tuple[str, ...] = ("element", "kernel", "filter")
"""How many weights share one mask value (one *mask unit*), see :func:`unit_shape`."""
DEFAULT_MASK_SCALE = 1e-2
MASKS_ATTR = "piggyback"
"""Name of the ``nn.ModuleDict`` that holds a masked module's :class:`WeightMask` objects."""


def unit_shape(host: nn.Module, param_name: str, granularity: str) -> tuple[int, ...]:
    """Shape of the mask of ``host.<param_name>`` at ``granularity``; it broadcasts onto W.

    - ``element``: one value per weight (Piggyback), the weight's own shape.
    - ``kernel``: one value per (output, input) pair, i.e. per k x k kernel of a conv
      (KSM): ``(out, in/groups, 1, 1)``. A linear or attention weight is a 1 x 1 conv whose
      kernel is a single weight, so there ``kernel`` is ``element``. We chose this over one
      value per row because a row is already what ``filter`` gives, and because the same
      layer then gets the same mask whether a network writes it as ``nn.Linear`` or as a
      1 x 1 conv (timm and torchvision use both for pointwise layers). Consequence: the
      savings of ``kernel`` come from k x k convs only; on networks made mostly of pointwise
      convs (EfficientNet, MobileNet, ViT) it stores nearly as many bits as ``element``.
    - ``filter``: one value per output channel (per output feature of a linear, per row of
      ``in_proj_weight``, i.e. per q/k/v output feature of attention).
    """
    shape = tuple(host._parameters[param_name].shape)
    if granularity == "element" or len(shape) < 2:
        return shape
    transposed = isinstance(host, nn.modules.conv._ConvTransposeNd)
    if granularity == "kernel":
        return shape[:2] + (1,) * (len(shape) - 2)
    if granularity == "filter":
        if transposed:  # weight (in, out/groups, *k): output channels are dim 1
            if getattr(host, "groups", 1) != 1:
                raise ValueError(
                    "filter granularity on a grouped transposed conv is not supported; "
                    "exclude that layer (mask.exclude)"
                )
            return (1, shape[1]) + (1,) * (len(shape) - 2)
        return (shape[0],) + (1,) * (len(shape) - 1)
    raise ValueError(f"unknown mask granularity {granularity!r}; choose one of {GRANULARITIES}")


def granularity_of(weight_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> str:
    """Name of the granularity a stored mask shape implies (``custom`` if none fits)."""
    weight_shape, mask_shape = tuple(weight_shape), tuple(mask_shape)
    if mask_shape == weight_shape:
        return "element"
    if mask_shape == weight_shape[:2] + (1,) * (len(weight_shape) - 2):
        return "kernel"
    if 1 in mask_shape[:2] and sum(s != 1 for s in mask_shape) == 1:
        return "filter"
    return "custom"


def check_unit_shape(weight_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
    """Refuse a mask shape that does not broadcast onto the weight one value per unit."""
    ok = len(mask_shape) == len(weight_shape) and all(
        m in (w, 1) for m, w in zip(mask_shape, weight_shape, strict=True)
    )
    if not ok:
        raise ValueError(
            f"mask of shape {tuple(mask_shape)} does not fit weight of shape {tuple(weight_shape)}"
        )


class WeightMask(nn.Module):
    """The learned real-valued mask of one weight tensor and its threshold rule.

    ``weight`` is the frozen tensor it gates (kept by the host module, not registered here,
    so the state dict holds it once under its original name). ``mask_real`` has the
    granularity's reduced shape (:func:`unit_shape`) and broadcasts onto the weight.

    ``soft=True`` is KSM's soft mask (Yang et al., CVPR 2021): every unit also learns a real
    scale ``soft_scale`` (initialised to 1, so the ``1s`` start is still exactly the
    pretrained network) and the layer computes ``W * (b * s)`` with ``b`` the unit's binary
    mask. The binary part is trained with KSM's softmax trick instead of the plain
    straight-through estimate (see :func:`~piggyback.nn.threshold.softmax_binarizer`;
    ``temperature`` is its T). Where we differ from the paper, as far as its public
    descriptions let us reconstruct it: the paper describes the soft mask as a superposition
    of the binary mask and a scaled real tensor generated from the same real mask, and runs
    the relaxed (softmax) value in the training forward pass; we keep a free per-unit scale
    multiplied onto the binary unit (a unit switched off stays exactly off and costs its one
    bit plus the scale) and keep the hard 0/1 in the forward pass, using the relaxation for
    the gradient only, so that what trains is exactly what is stored and evaluated.
    """

    def __init__(
        self,
        host: nn.Module,
        param_name: str,
        *,
        mask_init: str = "1s",
        mask_scale: float = DEFAULT_MASK_SCALE,
        threshold: float = DEFAULT_THRESHOLD,
        threshold_fn: str = "binarizer",
        grad_rescale: str = "none",
        granularity: str = "element",
        soft: bool = False,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        super().__init__()
        if threshold_fn not in THRESHOLD_FNS:
            raise ValueError(
                f"unknown threshold_fn {threshold_fn!r}; choose one of {THRESHOLD_FNS}"
            )
        if grad_rescale not in GRAD_RESCALES:
            raise ValueError(
                f"unknown grad_rescale {grad_rescale!r}; choose one of {GRAD_RESCALES}"
            )
        # A plain attribute, not a submodule: the host owns this mask, not the other way.
        self.__dict__["_host"] = host
        self.param_name = param_name
        self.threshold = float(threshold)
        self.threshold_fn = threshold_fn
        self.grad_rescale = grad_rescale
        if soft and threshold_fn != "binarizer":
            raise ValueError("soft (KSM) masks are binary: use threshold_fn 'binarizer'")
        if not temperature > 0:
            raise ValueError(f"mask temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        shape = unit_shape(host, param_name, granularity)
        self.granularity = granularity
        weight = self.weight
        self.mask_real = nn.Parameter(
            torch.empty(shape, dtype=weight.dtype, device=weight.device), requires_grad=True
        )
        self.soft_scale: nn.Parameter | None = None
        if soft:
            self.soft_scale = nn.Parameter(torch.ones_like(self.mask_real), requires_grad=True)
        self.reset_mask(mask_init, mask_scale)

    @property
    def soft(self) -> bool:
        return self.soft_scale is not None

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(self.mask_real.shape)

    @property
    def weight(self) -> nn.Parameter:
        """The frozen pretrained tensor this mask multiplies."""
        return self._host._parameters[self.param_name]

    @torch.no_grad()
    def reset_mask(self, mask_init: str = "1s", mask_scale: float = DEFAULT_MASK_SCALE) -> None:
        """Re-initialise ``mask_real``; ``1s`` (scale > threshold) starts at the pretrained net."""
        if mask_init == "1s":
            self.mask_real.fill_(mask_scale)
        elif mask_init == "uniform":
            self.mask_real.uniform_(-mask_scale, mask_scale)
        elif mask_init == "weight_based_1s":
            self.mask_real.fill_(self.weight.abs().mean().item())
        else:
            raise ValueError(f"unknown mask_init {mask_init!r}; choose one of {MASK_INITS}")
        if self.soft_scale is not None:
            self.soft_scale.fill_(1.0)

    def mask(self) -> torch.Tensor:
        """The current thresholded mask (same shape and dtype as ``mask_real``)."""
        return quantize(self.mask_real.detach(), self.threshold, self.threshold_fn)

    @torch.no_grad()
    def multiplier(self) -> torch.Tensor:
        """What the weight is multiplied by, per unit: the mask, times the scale when soft."""
        mask = self.mask()
        return mask if self.soft_scale is None else mask * self.soft_scale.detach()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Load a quantised mask (0/1 or -1/0/1) so that ``mask()`` returns exactly it.

        Storing the mask's own values as ``mask_real`` works for both quantisers: 1 > τ,
        0 ≤ τ and ≥ 0, and -1 < 0. A mask of another granularity (any shape that broadcasts
        onto the weight one value per unit) replaces the mask tensor: a multi-task model may
        hold tasks of different granularity. ``scale`` (a soft task's per-unit scales) makes
        the mask soft; ``None`` makes it plain.
        """
        shape = tuple(mask.shape)
        if shape != self.unit_shape:
            check_unit_shape(tuple(self.weight.shape), shape)
            real = self.mask_real
            self.mask_real = nn.Parameter(
                torch.empty(shape, dtype=real.dtype, device=real.device),
                requires_grad=real.requires_grad,
            )
            self.granularity = granularity_of(tuple(self.weight.shape), shape)
        self.mask_real.copy_(mask)  # converts dtype (and device) in the same pass
        if scale is None:
            self.soft_scale = None
            return
        if tuple(scale.shape) != shape:
            raise ValueError(f"mask scales of shape {tuple(scale.shape)} do not fit mask {shape}")
        if self.soft_scale is None or tuple(self.soft_scale.shape) != shape:
            self.soft_scale = nn.Parameter(
                torch.empty(shape, dtype=self.mask_real.dtype, device=self.mask_real.device),
                requires_grad=self.mask_real.requires_grad,
            )
        self.soft_scale.copy_(scale)

    def effective_weight(self, *, owns_grad: bool = False) -> torch.Tensor:
        """``W * M`` with the straight-through mask gradient (the pretrained W gets none).

        ``owns_grad`` is for forwards that feed the result straight into one conv/linear
        (see :data:`_OWN_GRAD_FORWARDS`); every other read gets the always-safe default.
        Reduced-shape and soft masks take the broadcasting path (:func:`unit_masked_weight`).
        """
        if self.soft_scale is not None or self.unit_shape != tuple(self.weight.shape):
            weight = unit_masked_weight(
                self.weight,
                self.mask_real,
                self.threshold,
                self.threshold_fn,
                self.grad_rescale,
                scale=self.soft_scale,
                temperature=self.temperature if self.soft_scale is not None else None,
            )
        else:
            weight = masked_weight(
                self.weight,
                self.mask_real,
                self.threshold,
                self.threshold_fn,
                self.grad_rescale,
                owns_grad=owns_grad,
            )
        # inside piggyback.nn.recompute_masked_weights: autograd keeps a recipe, not W * M
        return mark_recomputable(weight, self.effective_weight, self._versions)

    def _versions(self) -> tuple:
        """What ``W * M`` is computed from: changed in place, a saved recipe is stale."""
        scale = self.soft_scale
        return (
            self.weight._version,
            id(self.weight),
            self.mask_real._version,
            id(self.mask_real),
            None if scale is None else (scale._version, id(scale)),
            self.threshold,
            self.threshold_fn,
            self.temperature,
        )

    def extra_repr(self) -> str:
        soft = f", soft (T={self.temperature:g})" if self.soft else ""
        return (
            f"{self.param_name}, threshold_fn={self.threshold_fn}, threshold={self.threshold:g}"
            f", granularity={self.granularity}{soft}"
        )


def _masked_property(param_name: str) -> property:
    def read(module: nn.Module) -> torch.Tensor:
        return module._modules[MASKS_ATTR][param_name].effective_weight()

    return property(read, doc=f"``{param_name} * mask`` (frozen tensor gated by its mask)")


class MaskedModuleMixin:
    """Marks a module whose weights are gated; pickles back into the same cached class."""

    _piggyback_base: type[nn.Module]
    _piggyback_params: tuple[str, ...]

    def __reduce_ex__(self, protocol):
        return (
            _new_masked_instance,
            (self._piggyback_base, self._piggyback_params),
            self.__getstate__(),
        )


def _conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = self._modules[MASKS_ATTR]["weight"].effective_weight(owns_grad=True)
    return self._conv_forward(x, weight, self.bias)


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = self._modules[MASKS_ATTR]["weight"].effective_weight(owns_grad=True)
    return F.linear(x, weight, self.bias)


_OWN_GRAD_FORWARDS = {
    nn.Conv1d.forward: _conv_forward,
    nn.Conv2d.forward: _conv_forward,
    nn.Conv3d.forward: _conv_forward,
    nn.Linear.forward: _linear_forward,
}
"""Forwards we know read ``weight`` exactly once, straight into conv/linear.

For them (and only them: a subclass with its own forward keeps it) the masked class runs
the same computation but tells the straight-through node that the weight gradient it will
receive is a fresh buffer nobody else holds, so the mask gradient is written into it instead
of a new weight-sized tensor. Measured with ``benchmarks/run.py --quick`` (resnet18, CPU):
the backward pass is 1.22x finetune's without this and 1.10x with it.
"""

_CLASS_CACHE: dict[tuple[type, tuple[str, ...]], type] = {}


def masked_class(base: type[nn.Module], param_names: tuple[str, ...]) -> type[nn.Module]:
    """The subclass of ``base`` whose ``param_names`` attributes read as ``W * M`` (cached)."""
    key = (base, tuple(sorted(param_names)))
    if key not in _CLASS_CACHE:
        namespace = {name: _masked_property(name) for name in key[1]}
        fast = _OWN_GRAD_FORWARDS.get(base.forward)
        if fast is not None and "weight" in key[1]:
            namespace["forward"] = fast
        namespace.update(
            _piggyback_base=base,
            _piggyback_params=key[1],
            __module__=base.__module__,
            __qualname__=f"Masked{base.__qualname__}",
        )
        _CLASS_CACHE[key] = type(f"Masked{base.__name__}", (MaskedModuleMixin, base), namespace)
    return _CLASS_CACHE[key]


def _new_masked_instance(base: type[nn.Module], param_names: tuple[str, ...]) -> nn.Module:
    cls = masked_class(base, param_names)
    return cls.__new__(cls)


def is_masked(module: nn.Module) -> bool:
    return isinstance(module, MaskedModuleMixin)


def module_masks(module: nn.Module) -> dict[str, WeightMask]:
    """``{param name: WeightMask}`` of one module (empty when it is not masked)."""
    if not is_masked(module):
        return {}
    return dict(module._modules[MASKS_ATTR].items())


def add_weight_mask(module: nn.Module, param_name: str, **mask_options) -> WeightMask:
    """Gate ``module.<param_name>`` by a new mask; the module keeps its forward and keys."""
    existing = module_masks(module)
    if param_name in existing:
        return existing[param_name]
    for param in module.parameters(recurse=False):  # W and the unmasked bias stay frozen
        param.requires_grad_(False)
    mask = WeightMask(module, param_name, **mask_options)
    if MASKS_ATTR not in module._modules:
        module.add_module(MASKS_ATTR, nn.ModuleDict())
    module._modules[MASKS_ATTR][param_name] = mask
    base = module._piggyback_base if is_masked(module) else type(module)
    module.__class__ = masked_class(base, (*existing, param_name))
    return mask


@torch.no_grad()
def remove_weight_masks(module: nn.Module, *, apply: bool = True) -> None:
    """Undo :func:`add_weight_mask`: plain class, no mask parameters.

    ``apply=True`` bakes ``W * M`` into the weights (what :func:`materialize` needs);
    ``apply=False`` restores the untouched pretrained weights.
    """
    if not is_masked(module):
        return
    for name, mask in module_masks(module).items():
        weight = mask.weight
        if apply:
            weight = (weight * mask.multiplier().to(weight.dtype)).detach()
        module._parameters[name] = nn.Parameter(weight, requires_grad=False)
    module.__class__ = module._piggyback_base
    del module._modules[MASKS_ATTR]
