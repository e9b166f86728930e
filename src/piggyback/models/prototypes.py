"""The pretrained view of a training backbone and the task prototype computed through it.

Nearest-mean task inference (``piggyback.taskinfer``) compares an input's *pretrained*
feature with each task's mean pretrained feature over its training images (a few KB in its
artifact). The module computes that mean when a task finishes training, while its backbone
carries masks, task BN and, for fine-tuning and PackNet, trained weights: the view below
swaps the pretrained state in for a ``with`` block and puts everything back on exit.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from piggyback.formats import bn_state_dict, load_bn_state
from piggyback.nn import pretrained_weights
from piggyback.utils.inputs import move_inputs, num_inputs

_BN = nn.modules.batchnorm._BatchNorm

__all__ = ["feature_mean", "moving_weights", "pretrained_view"]


def moving_weights(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the backbone weights its method will train (none for Piggyback).

    Masks and BN are not weights here: the pretrained view ignores masks and restores the
    pretrained BN anyway. Only fine-tuning and PackNet move W, and only they pay for a copy.
    """
    bn_params = {
        id(p) for m in backbone.modules() if isinstance(m, _BN) for p in m.parameters(False)
    }
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in backbone.named_parameters()
        if p.requires_grad and not name.endswith("mask_real") and id(p) not in bn_params
    }


@contextmanager
def pretrained_view(
    backbone: nn.Module,
    pretrained_bn: Mapping[str, torch.Tensor],
    pristine: Mapping[str, torch.Tensor],
) -> Iterator[nn.Module]:
    """``backbone`` as it was pretrained: unmasked, pretrained BN in eval mode, and the
    ``pristine`` weight values (from :func:`moving_weights`) swapped in. Everything is put
    back on exit."""
    modes = {m: m.training for m in backbone.modules()}
    bn = bn_state_dict(backbone)
    params = dict(backbone.named_parameters())
    trained = {n: params[n].detach().clone() for n in pristine}
    try:
        with torch.no_grad():
            for name, value in pristine.items():
                params[name].copy_(value)
        load_bn_state(backbone, pretrained_bn)
        backbone.eval()
        with pretrained_weights(backbone):
            yield backbone
    finally:
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
        load_bn_state(backbone, bn)
        for module, mode in modes.items():
            module.training = mode


@torch.no_grad()
def feature_mean(
    net: nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    task: str,
    limit: int | None = None,
) -> torch.Tensor:
    """Mean feature of ``net`` over ``batches`` (``(x, y, ...)``, ``x`` a tensor or a mapping
    of tensors), in float64 then float32.

    Under DDP each rank averages its own shard (rank 0 writes the artifact)."""
    total, count = None, 0
    for batch in itertools.islice(batches, limit):
        x = move_inputs(batch[0], device)
        features = net(x).flatten(1).double()
        total = features.sum(0) if total is None else total + features.sum(0)
        count += num_inputs(x)
    if total is None:
        raise ValueError(f"task {task!r}: no training batch to compute its prototype")
    return (total / count).float().cpu()
