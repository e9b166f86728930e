"""Growth for owned-weight methods (CPG): hidden units held in reserve, claimed on demand.

CPG grows the network when a task cannot meet its accuracy goal, or finds no free weight
left (Hung et al. 2019, section 3.3; ``CPG_imagenet_main.py`` widens its filters and
retrains). A network widened *when* a task needs it changes the arithmetic of every earlier
task: a 1x1 conv over 300 input channels whose last 60 columns are zero does not sum the
first 240 in the same order as a conv over 240 channels (measured on this CPU, torch 2.14:
outputs differ by up to 2.8e-5), so the earlier tasks' logits would no longer be
bit-identical. We therefore widen once, before the first task, by the whole growth budget
(``units per growth x max_grows`` in every block that can grow, ``piggyback.nn.widen``) and
hold the new units in **reserve**: their weights carry the owner code ``RESERVED``, which no
task's mask reads, so every task computes on the same shapes from the start and an earlier
task never changes. A task that must grow *claims* the next ``units`` of the reserve in
every block; they become its own weights (producer rows random, consumer columns zero, so
the claim starts from the network the task already had) and train with the rest of its
weights. The price is the reserve's compute (its weights are multiplied by zero masks) and a
budget fixed in advance: when the reserve is spent a task that misses its goal keeps what
it has, as without growth, and says so.

Which widths grow is ``piggyback.nn.widen``'s list (inverted residuals, ResNet blocks, timm
MLPs); a backbone with none of them, or a growing block with a layer left unmasked, is
refused by name before training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from piggyback.nn import masked_weights
from piggyback.nn.widen import WideningError, hidden_widths, unit_entries, widen


class GrowthReserve:
    """The reserve of one sequence: per block, its pretrained width, units per growth, and
    the growths claimed so far (task names, in order)."""

    def __init__(self, fraction: float, max_grows: int) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(
                f"growth must add a fraction in (0, 1] of each block's hidden width, got {fraction}"
            )
        if max_grows < 1:
            raise ValueError(f"max_grows must be >= 1, got {max_grows}")
        self.fraction = float(fraction)
        self.max_grows = int(max_grows)
        self.base: dict[str, int] = {}
        self.units: dict[str, int] = {}
        self.claims: list[str] = []

    @property
    def reserve(self) -> dict[str, int]:
        """Units added to each block for the whole budget."""
        return {block: units * self.max_grows for block, units in self.units.items()}

    def widen(self, backbone: nn.Module) -> dict[str, int]:
        """Widen ``backbone`` (unmasked, pretrained) by the whole reserve; returns it."""
        widths = hidden_widths(backbone)
        if not widths:
            raise WideningError(
                f"cpg grow: {type(backbone).__name__} has no block whose hidden width can "
                "grow (inverted residuals, ResNet blocks, timm MLPs; piggyback.nn.widen); set "
                "method.grow=0"
            )
        self.base = {block: hidden.width for block, hidden in widths.items()}
        self.units = {b: max(1, math.ceil(self.fraction * w)) for b, w in self.base.items()}
        widen(backbone, self.reserve)
        return self.reserve

    def _entries(
        self, backbone: nn.Module, first: int, count: int, masked: set[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per weight of every growing block: the entries of its reserve units ``first`` to
        ``first + count - 1`` (in units of each block's growth). With ``masked``, a weight
        not in it is refused: its reserve units would be read by every task."""
        out: dict[str, torch.Tensor] = {}
        for block, hidden in hidden_widths(backbone).items():
            if block not in self.base:
                continue
            start = self.base[block] + first * self.units[block]
            stop = start + count * self.units[block]
            for name, entries in unit_entries(backbone, hidden, start, stop).items():
                if masked is not None and name not in masked:
                    raise WideningError(
                        f"cpg grow: {name} grows with block {block!r} but has no mask (see "
                        "mask.exclude / mask.target); every layer of a growing block is masked"
                    )
                out[name] = entries
        return out

    def reserve_entries(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        """Per masked weight: the entries of every reserve unit."""
        masked = {name for name, _ in masked_weights(backbone)}
        return self._entries(backbone, 0, self.max_grows, masked)

    def can_grow(self) -> bool:
        return len(self.claims) < self.max_grows

    def claim(self, backbone: nn.Module, task: str) -> dict[str, torch.Tensor]:
        """The next ``units`` of every block for ``task``: per masked weight, its entries."""
        if not self.can_grow():
            raise ValueError("the growth reserve is spent")
        out = self._entries(backbone, len(self.claims), 1)
        self.claims.append(task)
        return out

    def widths(self, tasks: list[str]) -> dict[str, int]:
        """Each block's width as ``tasks`` (a prefix of the sequence) use it."""
        grows = sum(1 for task in self.claims if task in tasks)
        return {block: width + grows * self.units[block] for block, width in self.base.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "units": self.units, "claims": self.claims}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = dict(state["base"])
        self.units = dict(state["units"])
        self.claims = list(state["claims"])
