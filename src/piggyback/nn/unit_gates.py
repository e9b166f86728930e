"""HAT's unit gates (Serra et al., ICML 2018): which output units of a masked network's
layers a task embedding gates, the forward hooks that gate them, and the gradient factor that
protects the units earlier tasks used.

A layer's units are its output channels (convolutions; at the BatchNorm right after the layer
where there is one, so that normalisation does not undo the gate), its output features
(linears), or its embedding dimension (``nn.MultiheadAttention``, gated at the attention's
output; the fused input projection is read by every unit). The method (``piggyback.methods.hat``)
owns the embeddings' training, annealing and storage; this module only knows layers.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from piggyback.nn.convert import MaskingError, masked_modules
from piggyback.nn.layers import module_masks

_BN = nn.modules.batchnorm._BatchNorm

EMBEDDING = "hat_embedding"
"""Name of the live task's embedding, registered on the gated layer's first weight mask."""

RULES = ("rows", "cols", "vector", "any")
"""How a parameter's entries map onto its layer's units: by output row (conv, linear), by
column (a transposed conv's output channels are dim 1), one per unit (a bias), or all of them
read by every unit (``nn.MultiheadAttention``'s input projection)."""


def unit_view(units: torch.Tensor, rule: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``units`` (one value per unit) shaped to broadcast onto a parameter of ``shape``."""
    if rule == "rows":
        return units.reshape(-1, *[1] * (len(shape) - 1))
    if rule == "cols":
        return units.reshape(1, -1, *[1] * (len(shape) - 2))
    if rule == "vector":
        return units
    if rule == "any":
        return units.max().reshape([1] * len(shape))
    raise ValueError(f"unknown unit rule {rule!r}; one of {RULES}")


def attenuation(used: torch.Tensor, rule: str, shape: tuple[int, ...]) -> torch.Tensor:
    """HAT's gradient factor ``1 - min(a_in, a_out)`` with ``a_in = 1``: ``1 - a_out``, where
    ``a_out`` (``used``) is the largest gate earlier tasks put on each unit."""
    return 1.0 - unit_view(used, rule, shape)


def hard_gate(embedding: torch.Tensor) -> torch.Tensor:
    """A stored task's gate: ``1[e > 0]``, the limit of ``sigmoid(s e)`` for large ``s``."""
    return (embedding > 0).to(embedding.dtype)


def first_mask(module: nn.Module) -> nn.Module:
    return next(iter(module_masks(module).values()))


class Gate:
    """A forward hook that multiplies one layer's output units by the active task's gate.

    ``fixed`` (a stored task's 0/1 gate) wins; otherwise the live embedding gives
    ``sigmoid(slope · e)`` while ``layer`` trains and the binary gate when it evaluates. Under
    a view of ``piggyback.nn.superpose`` (the pretrained view that task prototypes are
    computed in) the layer computes something other than its task and is not gated.
    """

    def __init__(self, layer: nn.Module, owner: nn.Module | None, channel_dim: bool) -> None:
        self.layer = layer
        self.owner = owner  # the WeightMask holding the embedding (None: inference network)
        self.channel_dim = channel_dim  # conv and BatchNorm outputs: units on dim 1
        self.fixed: torch.Tensor | None = None
        self.slope = 1.0

    @property
    def embedding(self) -> torch.Tensor:
        return self.owner._parameters[EMBEDDING]

    def value(self) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        if self.layer.training:
            return torch.sigmoid(self.slope * self.embedding)
        return hard_gate(self.embedding.detach())

    def viewed(self) -> bool:
        return self.owner is not None and "effective_weight" in vars(self.owner)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.viewed():
            return output
        if isinstance(output, tuple):  # nn.MultiheadAttention: (attn_output, weights)
            return (self._gate(output[0]), *output[1:])
        return self._gate(output)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.value().to(x.dtype)
        if self.channel_dim:
            gate = gate.reshape(1, -1, *[1] * (x.dim() - 2))
        return x * gate


def describe_gates(backbone: nn.Module) -> dict[str, dict[str, Any]]:
    """The gated units of a masked backbone: ``{layer: {units, at, channel_dim, params}}``.

    ``at`` is the module whose output is gated (the layer, or the BatchNorm right after it);
    ``params`` maps each trained parameter's qualified name to its unit rule.
    """
    modules = dict(backbone.named_modules())
    order = [n for n in modules if ".piggyback" not in f".{n}" and n]
    gates: dict[str, dict[str, Any]] = {}
    masked = dict(masked_modules(backbone))
    for name, module in masked.items():
        parent_name, _, attr = name.rpartition(".")
        parent = modules.get(parent_name)
        if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
            continue  # gated at its attention's output (below)
        params: dict[str, str] = {}
        if isinstance(module, nn.MultiheadAttention):
            units, channel_dim = module.embed_dim, False
            for pname in module_masks(module):
                params[f"{name}.{pname}"] = "any"
            if module.in_proj_bias is not None and "in_proj_weight" in module_masks(module):
                params[f"{name}.in_proj_bias"] = "any"
            out = module.out_proj
            if module_masks(out):
                params[f"{name}.out_proj.weight"] = "rows"
                if out.bias is not None:
                    params[f"{name}.out_proj.bias"] = "vector"
        elif isinstance(module, nn.modules.conv._ConvNd):
            units, channel_dim = module.out_channels, True
            transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
            if transposed and module.groups != 1:
                raise MaskingError(
                    f"hat cannot gate {name!r} ({type(module).__name__}): the output channels "
                    "of a grouped transposed convolution are not slices of its weight; "
                    f"exclude it (mask.exclude=[{name}])"
                )
            params[f"{name}.weight"] = "cols" if transposed else "rows"
            if module.bias is not None:
                params[f"{name}.bias"] = "vector"
        elif isinstance(module, nn.Linear):
            units, channel_dim = module.out_features, False
            params[f"{name}.weight"] = "rows"
            if module.bias is not None:
                params[f"{name}.bias"] = "vector"
        else:
            raise MaskingError(
                f"hat cannot gate {name!r} ({type(module).__name__}): only convolutions, "
                f"linear layers and nn.MultiheadAttention have output units here; exclude it "
                f"(mask.exclude=[{name}])"
            )
        at = name
        following = order[order.index(name) + 1 :]
        after = next((n for n in following if not n.startswith(f"{name}.")), None)
        if (
            after is not None
            and isinstance(modules[after], _BN)
            and modules[after].num_features == units
        ):
            at, channel_dim = after, True
        gates[name] = {"units": units, "at": at, "channel_dim": channel_dim, "params": params}
    return gates


class FirstForwardCheck:
    """Checks, on the first forward, what the gates assume about the network: every gated
    layer's forward runs, and BatchNorms take a gated layer's output only where its gate sits
    after them. Removes its hooks when done."""

    def __init__(self, backbone: nn.Module, gates: Mapping[str, Mapping[str, Any]]) -> None:
        self.gates = gates
        self.outputs: dict[int, tuple[str, weakref.ref]] = {}
        self.fired: set[str] = set()
        modules = dict(backbone.named_modules())
        self.handles = [backbone.register_forward_hook(self.finish)]
        for name in gates:
            self.handles.append(modules[name].register_forward_hook(self._recorder(name)))
        for name, module in modules.items():
            if isinstance(module, _BN):
                self.handles.append(module.register_forward_pre_hook(self._checker(name)))

    def _recorder(self, name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self.fired.add(name)
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor):
                self.outputs[id(out)] = (name, weakref.ref(out))

        return record

    def _checker(self, bn_name: str):
        def check(module: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            entry = self.outputs.get(id(x))
            producer = entry[0] if entry is not None and entry[1]() is x else None
            paired = [n for n, g in self.gates.items() if g["at"] == bn_name]
            if producer is not None and self.gates[producer]["at"] != bn_name:
                self.close()
                raise MaskingError(
                    f"hat: {producer!r} feeds BatchNorm {bn_name!r}, which would normalise its "
                    f"gate away, but the BatchNorm is not registered right after it; exclude "
                    f"the layer (mask.exclude=[{producer}])"
                )
            if paired and producer != paired[0]:
                self.close()
                raise MaskingError(
                    f"hat: BatchNorm {bn_name!r}, registered right after {paired[0]!r}, does not "
                    f"take that layer's output, so its units cannot be gated after it; exclude "
                    f"the layer (mask.exclude=[{paired[0]}])"
                )

        return check

    def finish(self, module: nn.Module, args: Any, output: Any) -> None:
        missing = sorted(set(self.gates) - self.fired)
        self.close()
        if missing:
            raise MaskingError(
                f"hat gates a layer's output in the layer's forward, but the forward of "
                f"{missing[:5]} never ran (their weights are read directly, e.g. by a "
                f"functional attention); exclude them (mask.exclude=[...])"
            )

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.outputs.clear()


def install_gates(
    net: nn.Module, gates: Mapping[str, Mapping[str, Any]], owners: bool
) -> dict[str, Gate]:
    """Hooks that gate each layer's units (at the layer or its BatchNorm); ``owners``: the
    embeddings live on the layers' weight masks (the training network)."""
    modules = dict(net.named_modules())
    out = {}
    for name, info in gates.items():
        layer = modules[name]
        gate = Gate(layer, first_mask(layer) if owners else None, bool(info["channel_dim"]))
        modules[info["at"]].register_forward_hook(gate)
        out[name] = gate
    return out
