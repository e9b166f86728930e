"""A batch's inputs as one thing, whether a tensor (images) or a mapping of tensors (text).

Image DataModules yield ``(x, y)`` with ``x`` a tensor; text DataModules yield ``(inputs, y)``
with ``inputs`` a mapping such as ``{"input_ids", "attention_mask", "token_type_ids"}``, each
``[batch, length]``. The training module, task prototypes, task inference and evaluation pass
inputs to the backbone as they come; these helpers do the few things they need to do with
them besides (move, count, pick rows, join batches) without asking which kind they hold.

Joining or stacking mappings whose tensors differ in length (text batches padded to their
own longest sequence) pads the shorter ones on the right with ``pad_values[key]`` (default 0),
the same right padding a tokenizer applies: with ``attention_mask`` 0 there, the extra
positions change nothing a masked-attention model computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
"""What a backbone takes: a tensor, or a mapping of tensors that share the batch dimension."""

__all__ = [
    "Inputs",
    "concat_inputs",
    "inputs_device",
    "move_inputs",
    "num_inputs",
    "select_inputs",
    "stack_inputs",
]


def move_inputs(x: Any, device: torch.device | str) -> Any:
    """``x`` on ``device`` (a tensor, or every tensor of a mapping)."""
    if isinstance(x, Mapping):
        return {k: move_inputs(v, device) for k, v in x.items()}
    return x.to(device)


def num_inputs(x: Inputs) -> int:
    """How many inputs the batch holds (its first dimension)."""
    if isinstance(x, Mapping):
        first = next(iter(x.values()), None)
        return 0 if first is None else len(first)
    return len(x)


def inputs_device(x: Inputs) -> torch.device:
    """The device the batch lives on."""
    if isinstance(x, Mapping):
        return next(iter(x.values())).device
    return x.device


def select_inputs(x: Inputs, index: Any) -> Inputs:
    """Rows ``index`` (a slice, a list of positions, an index tensor) of the batch."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def _pad_to(tensor: torch.Tensor, length: int, value: int | float) -> torch.Tensor:
    if tensor.dim() < 2 or tensor.shape[1] == length:
        return tensor
    # F.pad lists the last dimension first: pad dimension 1 on the right only
    pad = [0, 0] * (tensor.dim() - 2) + [0, length - tensor.shape[1]]
    return F.pad(tensor, pad, value=value)


def concat_inputs(
    batches: Sequence[Inputs], pad_values: Mapping[str, int | float] | None = None
) -> Inputs:
    """One batch from several, along the batch dimension; mappings are right-padded to the
    longest length (dimension 1) first, with ``pad_values[key]`` (default 0)."""
    if not batches:
        raise ValueError("no batches to join")
    if not isinstance(batches[0], Mapping):
        return torch.cat(list(batches))  # type: ignore[arg-type]
    pads = dict(pad_values or {})
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]  # type: ignore[index]
        length = max(p.shape[1] if p.dim() > 1 else 0 for p in parts)
        out[key] = torch.cat([_pad_to(p, length, pads.get(key, 0)) for p in parts])
    return out


def stack_inputs(
    items: Sequence[Inputs], pad_values: Mapping[str, int | float] | None = None
) -> Inputs:
    """A batch from single inputs (``[C, H, W]`` images, or mappings of ``[length]``
    tensors, padded on the right to the longest)."""
    if not items:
        raise ValueError("no inputs to stack")
    if not isinstance(items[0], Mapping):
        return torch.stack(list(items))  # type: ignore[arg-type]
    rows = [{k: torch.as_tensor(v).unsqueeze(0) for k, v in item.items()} for item in items]
    return concat_inputs(rows, pad_values)
