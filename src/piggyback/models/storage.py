"""How big tasks are on a shared backbone, and the network order of their masks.

Sizes for the storage report (backbone once + every task, against one network per task)
and the layer order that by-depth mask plots need; kept apart from the multi-task model
itself, which re-exports them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from piggyback.backbones import BackboneError, build_backbone
from piggyback.formats import TaskArtifact
from piggyback.nn.convert import frozen_state_dict, weight_names

__all__ = [
    "architecture_bytes",
    "layer_order",
    "masks_in_network_order",
    "state_bytes",
    "storage_summary",
]


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes of a state dict (what safetensors stores, headers aside)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen weights without the per-task ``mask_real`` tensors of masked weights."""
    return frozen_state_dict(backbone)


def architecture_bytes(name: str) -> int:
    """Float32 size of a backbone architecture (classifier stripped), without any download."""
    return state_bytes(_backbone_state(build_backbone(name, weights=None).model))


@functools.lru_cache(maxsize=8)
def layer_order(backbone_name: str) -> tuple[str, ...]:
    """Maskable weight names of an architecture in network order (built offline, no weights)."""
    model = build_backbone(backbone_name, weights=None).model
    return tuple(
        f"{name}.{pname}" if name else pname
        for name, m in model.named_modules()
        for pname in weight_names(m)
    )


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def masks_in_network_order(artifact: TaskArtifact) -> dict[str, torch.Tensor]:
    """The artifact's unpacked masks ordered stem first, as the layers run.

    Kernel- or filter-granular masks come expanded to their weights' shapes (views), so
    statistics and plots count switched-off weights whatever the granularity.

    Artifact files list layers alphabetically (``features.10`` before ``features.3``), which
    would scramble every by-depth plot; the architecture gives the true order, and a natural
    sort is the fallback for architectures that cannot be rebuilt here.
    """
    masks = artifact.weight_masks()
    try:
        rank = {name: i for i, name in enumerate(layer_order(artifact.backbone))}
    except BackboneError:
        rank = {}
    ordered = sorted(masks, key=lambda n: (rank.get(n, len(rank)), _natural(n)))
    return {name: masks[name] for name in ordered}


def storage_summary(artifacts: Sequence[TaskArtifact], backbone_bytes: int) -> dict[str, Any]:
    """Multi-task model (backbone once + every task) against one fine-tuned network per task.

    ``separate_networks_bytes`` is what the paper's "individual networks" baseline stores:
    a full backbone copy plus a head for every task.
    """
    tasks = {a.task: a.task_bytes() for a in artifacts}
    heads = sum(state_bytes(a.head) for a in artifacts)
    total = backbone_bytes + sum(tasks.values())
    separate = len(artifacts) * backbone_bytes + heads
    return {
        "num_tasks": len(artifacts),
        "backbone_bytes": backbone_bytes,
        "task_bytes": tasks,
        "total_bytes": total,
        "separate_networks_bytes": separate,
        "x_backbone": total / backbone_bytes if backbone_bytes else float("nan"),
        "saving_vs_separate": separate / total if total else float("nan"),
    }
