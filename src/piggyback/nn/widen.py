"""Hidden widths that can grow: find them in a network, add units, name a unit's weights.

A *hidden width* is a channel (or feature) count that only one block sees: the expansion
channels of an inverted residual (MobileNet, EfficientNet), the inner width of a ResNet
block, the hidden features of a transformer MLP. Adding units there changes no shape
outside the block, so a method can widen a network without touching its stem, its residual
stream or its head (CPG's growth). Units are added at the end, in three roles:

- **producers** make the hidden channels: new *output* rows (and biases);
- **depthwise** convs and **norms** act per hidden channel: new channels;
- **consumers** read the hidden channels: new *input* columns.

New producer rows and depthwise filters are drawn from a normal with the layer's own
weight std, new consumer columns are zero (so the widened network computes what it did:
Net2Net's function-preserving start, Chen et al. 2016), new BatchNorm channels are the
identity (weight 1, bias 0, running mean 0, running variance 1). This is ours; the CPG
reference grows its VGG/ResNet filters the same way, new filters random, zero towards the
old ones.

Blocks that grow (matched by class name *and* their children, so a look-alike is not
widened by mistake): timm's ``InvertedResidual`` (``conv_pw`` → ``bn1`` → ``conv_dw`` →
``bn2`` → squeeze-excite → ``conv_pwl``), ``BasicBlock`` (torchvision, timm and ours:
``conv1`` → ``bn1`` → ``conv2``), ``Bottleneck`` (the width between ``conv1`` and ``conv2``;
grouped ``conv2``, as in ResNeXt, does not grow) and timm's ``Mlp`` (``fc1`` → ``fc2``, no
hidden norm). What does not grow yet: a stem, a final conv, a ``DepthwiseSeparableConv``
(no hidden width), attention, a Hugging Face BERT MLP, gated MLPs, and any block whose
hidden width feeds a norm over that width (a LayerNorm would change every old unit).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


class WideningError(ValueError):
    """A network (or one of its layers) cannot grow as asked; the message names it."""


@dataclass
class HiddenWidth:
    """The layers of one block that share a hidden width (names relative to the model)."""

    block: str
    width: int
    producers: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)

    def weight_dims(self) -> Iterator[tuple[str, int]]:
        """``(weight name, dimension of the hidden units)`` of every conv/linear weight."""
        for name in self.producers + self.depthwise:
            yield f"{name}.weight", 0
        for name in self.consumers:
            yield f"{name}.weight", 1


def _child(block: nn.Module, name: str) -> nn.Module | None:
    return getattr(block, name, None)


def _is_conv(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Conv2d)


def _plain_conv(module: nn.Module | None) -> bool:
    return _is_conv(module) and module.groups == 1


def _depthwise(module: nn.Module | None) -> bool:
    return (
        _is_conv(module)
        and module.groups == module.in_channels == module.out_channels
        and module.groups > 1
    )


def _inverted_residual(prefix: str, block: nn.Module) -> HiddenWidth | None:
    pw, dw, pwl = (_child(block, n) for n in ("conv_pw", "conv_dw", "conv_pwl"))
    bn1, bn2 = _child(block, "bn1"), _child(block, "bn2")
    if not (_plain_conv(pw) and _depthwise(dw) and _plain_conv(pwl)):
        return None
    if not (isinstance(bn1, _BN) and isinstance(bn2, _BN)):
        return None
    width = HiddenWidth(prefix, pw.out_channels, [f"{prefix}conv_pw"], [f"{prefix}conv_dw"])
    width.norms = [f"{prefix}bn1", f"{prefix}bn2"]
    width.consumers = [f"{prefix}conv_pwl"]
    se = _child(block, "se")
    if se is not None and not isinstance(se, nn.Identity):
        reduce, expand = _child(se, "conv_reduce"), _child(se, "conv_expand")
        if not (_plain_conv(reduce) and _plain_conv(expand)):
            return None  # a squeeze-excite we do not know: its channel count would break
        width.consumers.append(f"{prefix}se.conv_reduce")
        width.producers.append(f"{prefix}se.conv_expand")
    return width


def _resnet_block(prefix: str, block: nn.Module) -> HiddenWidth | None:
    conv1, bn1, conv2 = (_child(block, n) for n in ("conv1", "bn1", "conv2"))
    if not (_plain_conv(conv1) and isinstance(bn1, _BN) and _plain_conv(conv2)):
        return None
    return HiddenWidth(
        prefix, conv1.out_channels, [f"{prefix}conv1"], [], [f"{prefix}bn1"], [f"{prefix}conv2"]
    )


def _mlp(prefix: str, block: nn.Module) -> HiddenWidth | None:
    fc1, fc2, norm = _child(block, "fc1"), _child(block, "fc2"), _child(block, "norm")
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        return None
    if norm is not None and not isinstance(norm, nn.Identity):
        return None
    return HiddenWidth(prefix, fc1.out_features, [f"{prefix}fc1"], consumers=[f"{prefix}fc2"])


_BLOCKS = {
    "InvertedResidual": _inverted_residual,
    "BasicBlock": _resnet_block,
    "Bottleneck": _resnet_block,
    "Mlp": _mlp,
}


def hidden_widths(model: nn.Module) -> dict[str, HiddenWidth]:
    """Every hidden width of ``model`` that :func:`widen` can grow, by block name."""
    out = {}
    for name, module in model.named_modules():
        find = _BLOCKS.get(type(module).__name__)
        found = find(f"{name}." if name else "", module) if find else None
        if found is not None:
            found.block = name
            out[name] = found
    return out


def _grown(old: torch.Tensor, dim: int, new: torch.Tensor) -> nn.Parameter | torch.Tensor:
    out = torch.cat([old.detach(), new.to(old)], dim)
    if isinstance(old, nn.Parameter):
        return nn.Parameter(out, requires_grad=old.requires_grad)
    return out


def _random_like(weight: torch.Tensor, shape: list[int], generator: torch.Generator):
    std = float(weight.detach().float().std()) if weight.numel() > 1 else 1.0
    return torch.randn(shape, generator=generator) * (std or 1.0)


@torch.no_grad()
def _grow_layer(layer: nn.Module, role: str, units: int, generator: torch.Generator) -> None:
    """Add ``units`` hidden units to one layer in its ``role``."""
    if isinstance(layer, _BN):
        layer.num_features += units
        for attr, value in (("weight", 1.0), ("bias", 0.0)):
            if getattr(layer, attr, None) is not None:
                old = getattr(layer, attr)
                setattr(layer, attr, _grown(old, 0, torch.full((units,), value)))
        for attr, value in (("running_mean", 0.0), ("running_var", 1.0)):
            old = getattr(layer, attr, None)
            if old is not None:
                layer.register_buffer(attr, _grown(old, 0, torch.full((units,), value)))
        return
    weight = layer.weight
    if role == "consumer":
        shape = list(weight.shape)
        shape[1] = units
        layer.weight = _grown(weight, 1, torch.zeros(shape))
    else:
        shape = list(weight.shape)
        shape[0] = units
        layer.weight = _grown(weight, 0, _random_like(weight, shape, generator))
        if layer.bias is not None:
            layer.bias = _grown(layer.bias, 0, torch.zeros(units))
    if isinstance(layer, nn.Linear):
        if role == "consumer":
            layer.in_features += units
        else:
            layer.out_features += units
    elif role == "consumer":
        layer.in_channels += units
    elif role == "producer":
        layer.out_channels += units
    else:  # depthwise: one filter per channel
        layer.in_channels += units
        layer.out_channels += units
        layer.groups += units


def widen(model: nn.Module, units: Mapping[str, int], *, seed: int = 0) -> dict[str, int]:
    """Add ``units[block]`` hidden units to each named block of ``model`` (in place, before
    any mask is attached). Returns the blocks' new widths. The new producer values are drawn
    from a generator seeded with ``seed``, so the same call widens two copies identically."""
    widths = hidden_widths(model)
    unknown = sorted(set(units) - set(widths))
    if unknown:
        raise WideningError(
            f"cannot widen {unknown}: not a block whose hidden width can grow (these are: "
            f"{', '.join(_BLOCKS)}; see piggyback.nn.widen)"
        )
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for block in sorted(units, key=list(widths).index):
        count = int(units[block])
        if count < 0:
            raise ValueError(f"cannot widen {block!r} by {count} units")
        hidden = widths[block]
        if count:
            for role, names in (
                ("producer", hidden.producers),
                ("depthwise", hidden.depthwise + hidden.norms),
                ("consumer", hidden.consumers),
            ):
                for name in names:
                    _grow_layer(model.get_submodule(name), role, count, generator)
        out[block] = hidden.width + count
    return out


def unit_entries(
    model: nn.Module, hidden: HiddenWidth, start: int, stop: int
) -> dict[str, torch.Tensor]:
    """Boolean masks over each conv/linear weight of ``hidden``'s layers: the entries that
    belong to hidden units ``start..stop-1`` (producer rows, depthwise filters, consumer
    columns)."""
    out = {}
    for name, dim in hidden.weight_dims():
        module_name, _, pname = name.rpartition(".")
        weight = model.get_submodule(module_name)._parameters[pname]
        entries = torch.zeros(weight.shape, dtype=torch.bool)
        entries.narrow(dim, start, stop - start).fill_(True)
        out[name] = entries
    return out
