"""Mask statistics: how much of the pretrained network each task switches off, and where.

These numbers back the paper's analysis (sparsity per layer, change by depth, overlap between
tasks) and are shared by the notebook, the training logger and the evaluator, so they take
plain mappings instead of models: ``{layer_name: mask}`` for one task (layer names in network
order, which is what "depth" means below) and ``{task: {layer_name: mask}}`` for several.
Masks may be torch tensors or numpy arrays of any dtype, on any device.

Masks of coarser granularity (one value per conv kernel or per filter, ``piggyback.nn``)
have a reduced shape that broadcasts onto the weight. Passed as they are, every function
counts mask *units*; to count *weights* (what storage-free comparisons with element masks
need: a 3x3 kernel unit switches 9 weights off), pass them through
:func:`expand_to_weights` (views, no copy) or use ``TaskArtifact.weight_masks()``.

Convention for values: a weight is *off* where its mask is exactly 0. The pretrained network
corresponds to an all-ones mask, so the fraction of zeros is also the fraction of weights a
task changed by switching them off. For ternary masks (-1/0/1, the reference code's variant)
-1 keeps the weight's magnitude and flips its sign, so it is counted as *on*, not off; pass
``include_sign_flips=True`` to :func:`fraction_changed_by_depth` to count it as changed too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "expand_to_weights",
    "flips",
    "fraction_changed_by_depth",
    "layer_sparsity",
    "overlap_matrix",
    "pairwise_overlap",
    "task_sparsity_table",
    "total_sparsity",
]

MaskLike = Any  # torch.Tensor | np.ndarray


def expand_to_weights(
    masks: Mapping[str, MaskLike], weight_shapes: Mapping[str, Any]
) -> dict[str, MaskLike]:
    """Each reduced-shape mask broadcast to its weight's shape (a view), same order.

    Layers missing from ``weight_shapes`` are returned as they are; a mask that does not
    broadcast onto its weight raises ``ValueError``.
    """
    out: dict[str, MaskLike] = {}
    for name, mask in masks.items():
        shape = weight_shapes.get(name)
        if shape is None:
            out[name] = mask
        elif isinstance(mask, torch.Tensor):
            out[name] = mask.expand(tuple(shape))
        else:
            out[name] = np.broadcast_to(np.asarray(mask), tuple(shape))
    return out


def _flat(mask: MaskLike) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        return mask.detach().reshape(-1).cpu().numpy()
    return np.asarray(mask).reshape(-1)


def _off(mask: MaskLike) -> np.ndarray:
    """Flat bool array, True where the weight is switched off (mask == 0)."""
    return _flat(mask) == 0


def _count_off(mask: MaskLike) -> tuple[int, int]:
    flat = _flat(mask)
    return int(np.count_nonzero(flat == 0)), int(flat.size)


def layer_sparsity(masks: Mapping[str, MaskLike]) -> dict[str, float]:
    """Fraction of zeros per layer, in the mapping's (network) order; 0.0 for an empty layer."""
    out: dict[str, float] = {}
    for name, mask in masks.items():
        zeros, numel = _count_off(mask)
        out[name] = zeros / numel if numel else 0.0
    return out


def total_sparsity(masks: Mapping[str, MaskLike]) -> float:
    """Fraction of zeros over all masked weights (weighted by layer size; 0.0 if none).

    Weighting by numel is what storage and compute care about: a 2M-weight layer at 10 %
    matters more than the 9k-weight stem at 50 %.
    """
    zeros = numel = 0
    for mask in masks.values():
        z, n = _count_off(mask)
        zeros += z
        numel += n
    return zeros / numel if numel else 0.0


def flips(
    before: Mapping[str, MaskLike], after: Mapping[str, MaskLike]
) -> tuple[float, dict[str, float]]:
    """How much a mask moved: ``(fraction changed overall, {layer: fraction changed})``.

    A weight counts as flipped where its quantised value differs (1 -> 0, 0 -> 1, or a
    ternary sign change). The overall fraction is weighted by layer size, like
    :func:`total_sparsity`. A training run that suddenly flips a large part of one layer (a
    collapse under too large a learning rate) shows here before it shows in the accuracy.
    Both mappings must have the same layers with the same sizes.
    """
    if list(before) != list(after):
        raise ValueError(f"mask layers differ: {sorted(set(before) ^ set(after))}")
    changed = numel = 0
    per_layer: dict[str, float] = {}
    for name, old in before.items():
        a, b = _flat(old), _flat(after[name])
        if a.size != b.size:
            raise ValueError(f"layer {name!r} has {a.size} weights before and {b.size} after")
        n = int(np.count_nonzero(a != b))
        per_layer[name] = n / a.size if a.size else 0.0
        changed += n
        numel += a.size
    return (changed / numel if numel else 0.0), per_layer


def task_sparsity_table(
    task_masks: Mapping[str, Mapping[str, MaskLike]],
) -> list[dict[str, Any]]:
    """One row per task: ``task``, ``masked_weights``, ``zeros``, ``fraction_zeros``.

    Rows are plain dicts so they go straight into a logger table, a CSV or a DataFrame.
    """
    rows: list[dict[str, Any]] = []
    for task, masks in task_masks.items():
        zeros = numel = 0
        for mask in masks.values():
            z, n = _count_off(mask)
            zeros += z
            numel += n
        rows.append(
            {
                "task": task,
                "masked_weights": numel,
                "zeros": zeros,
                "fraction_zeros": zeros / numel if numel else 0.0,
            }
        )
    return rows


def fraction_changed_by_depth(
    masks: Mapping[str, MaskLike], *, include_sign_flips: bool = False
) -> list[tuple[int, str, float]]:
    """``(depth, layer, fraction switched off)`` in network order, depth counted from 0.

    Piggyback starts from the all-ones mask, so this is how far each layer moved away from the
    pretrained network; the paper's observation is that later layers change more. With
    ``include_sign_flips`` a ternary -1 also counts as changed.
    """
    out: list[tuple[int, str, float]] = []
    for depth, (name, mask) in enumerate(masks.items()):
        flat = _flat(mask)
        changed = (flat != 1) if include_sign_flips else (flat == 0)
        frac = float(np.count_nonzero(changed)) / flat.size if flat.size else 0.0
        out.append((depth, name, frac))
    return out


def _off_vectors(
    task_masks: Mapping[str, Mapping[str, MaskLike]],
) -> tuple[list[str], list[np.ndarray]]:
    """One flat 'off' vector per task over the union of layers, in a common layer order.

    A layer absent from a task is treated as all ones (that task uses the pretrained weights
    there); a layer whose size differs between tasks cannot be compared and raises.
    """
    tasks = list(task_masks)
    layers: dict[str, int] = {}
    for task in tasks:
        for name, mask in task_masks[task].items():
            numel = int(np.size(mask)) if not isinstance(mask, torch.Tensor) else mask.numel()
            if layers.setdefault(name, numel) != numel:
                raise ValueError(
                    f"layer {name!r} has {numel} weights in task {task!r} but {layers[name]} in "
                    "another task; masks of different backbones cannot be compared"
                )
    vectors = []
    for task in tasks:
        parts = []
        for name, numel in layers.items():
            mask = task_masks[task].get(name)
            parts.append(_off(mask) if mask is not None else np.zeros(numel, dtype=bool))
        vectors.append(np.concatenate(parts) if parts else np.zeros(0, dtype=bool))
    return tasks, vectors


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def pairwise_overlap(
    task_masks: Mapping[str, Mapping[str, MaskLike]],
) -> dict[tuple[str, str], float]:
    """Jaccard index |off_a ∩ off_b| / |off_a ∪ off_b| of the switched-off weights.

    Keys are both orders ``(a, b)`` and ``(b, a)`` for every pair of distinct tasks (the value
    is symmetric), so callers can look up either way. Two tasks that switch nothing off have
    identical (empty) zero sets, so their Jaccard index is defined as 1.0, not 0/0.
    """
    tasks, vectors = _off_vectors(task_masks)
    out: dict[tuple[str, str], float] = {}
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            value = _jaccard(vectors[i], vectors[j])
            out[(tasks[i], tasks[j])] = value
            out[(tasks[j], tasks[i])] = value
    return out


def overlap_matrix(
    task_masks: Mapping[str, Mapping[str, MaskLike]],
) -> tuple[list[str], np.ndarray]:
    """Symmetric task x task Jaccard matrix (diagonal 1.0) for heat maps and tables."""
    tasks, vectors = _off_vectors(task_masks)
    mat = np.eye(len(tasks), dtype=np.float64)
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            mat[i, j] = mat[j, i] = _jaccard(vectors[i], vectors[j])
    return tasks, mat
