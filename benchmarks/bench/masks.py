"""Trained-looking binary masks for untrained networks.

Inference and task-switch figures depend on how many mask values are zero and how they
cluster (the ``rice`` codec, ``materialize``); these stand in for trained masks without a
training run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from piggyback.nn.convert import masked_weights


def realistic_masks(
    shapes: list[tuple[int, ...]], zeros: float, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Trained-looking binary masks: zero rate grows with depth, zeros cluster by filter.

    Per-layer rates grow 1 -> 10 (relative) with depth and are scaled so the weighted mean
    is ``zeros``; inside a layer each output filter draws its own rate from a Beta around
    the layer rate, which is how trained Piggyback masks look (see PAPER.md / codec.py).
    """
    base = np.linspace(1.0, 10.0, len(shapes))
    sizes = np.array([np.prod(s) for s in shapes], dtype=np.float64)
    rates = np.clip(base * zeros * sizes.sum() / (base * sizes).sum(), 1e-4, 0.5)
    out = []
    for shape, rate in zip(shapes, rates, strict=True):
        per_filter = rng.beta(rate * 4.0, (1.0 - rate) * 4.0, size=shape[0])
        p = per_filter.reshape((-1,) + (1,) * (len(shape) - 1))
        out.append(torch.from_numpy(rng.random(shape) >= p).float())
    return out


def set_realistic_masks(backbone: nn.Module, zeros: float, seed: int) -> float:
    """Load realistic masks into every masked layer; returns the actual zero fraction."""
    layers = [layer for _, layer in masked_weights(backbone)]
    masks = realistic_masks(
        [tuple(layer.weight.shape) for layer in layers], zeros, np.random.default_rng(seed)
    )
    for layer, mask in zip(layers, masks, strict=True):
        layer.set_mask(mask)
    total = sum(m.numel() for m in masks)
    return 1.0 - sum(float(m.sum()) for m in masks) / total
