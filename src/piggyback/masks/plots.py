"""Figures for mask analysis (notebook, logger images, evaluation reports).

Figures are built with :class:`matplotlib.figure.Figure` directly rather than through pyplot,
so they work headless (no display, no global figure registry to leak in long runs) and can be
saved with ``fig.savefig`` or handed to a logger. Each function accepts ``{task: {layer:
mask}}``; a single task's ``{layer: mask}`` is accepted too and shown as one series.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure

from piggyback.masks.stats import fraction_changed_by_depth, layer_sparsity, overlap_matrix

__all__ = ["plot_changed_by_depth", "plot_layer_sparsity", "plot_overlap_heatmap"]


def _as_task_masks(masks: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    if not masks:
        return {}
    if all(isinstance(v, Mapping) for v in masks.values()):
        return dict(masks)
    if any(isinstance(v, Mapping) for v in masks.values()):
        raise ValueError("expected {task: {layer: mask}} or {layer: mask}, got a mix of both")
    return {"mask": masks}


def _layer_order(task_masks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    order: dict[str, None] = {}
    for masks in task_masks.values():
        for name in masks:
            order.setdefault(name, None)
    return list(order)


def plot_layer_sparsity(
    task_masks: Mapping[str, Any],
    *,
    kind: Literal["line", "bar"] = "line",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Percentage of zeros per layer, one series per task (x axis labelled with layer names).

    ``kind="line"`` stays readable for ten tasks x 53 layers; ``"bar"`` draws grouped bars
    (one bar container per task), clearer for a few tasks. Layers a task does not mask are
    left out of its series.
    """
    task_masks = _as_task_masks(task_masks)
    layers = _layer_order(task_masks)
    x = np.arange(len(layers))
    fig = Figure(figsize=figsize or (max(6.0, 0.22 * len(layers) + 2), 4.0), layout="constrained")
    ax = fig.subplots()
    n_tasks = max(1, len(task_masks))
    width = 0.8 / n_tasks
    for i, (task, masks) in enumerate(task_masks.items()):
        sp = layer_sparsity(masks)
        xs = np.array([x[layers.index(name)] for name in sp], dtype=float)
        ys = 100.0 * np.array(list(sp.values()), dtype=float)
        if kind == "bar":
            ax.bar(xs - 0.4 + width * (i + 0.5), ys, width=width, label=str(task))
        elif kind == "line":
            ax.plot(xs, ys, marker="o", markersize=3, label=str(task))
        else:
            raise ValueError(f"kind must be 'line' or 'bar', got {kind!r}")
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=90, fontsize=6)
    ax.set_xlim(-0.6, max(len(layers) - 0.4, 0.6))
    ax.set_ylabel("weights switched off (%)")
    ax.set_title("Mask sparsity per layer")
    ax.grid(axis="y", alpha=0.3)
    if task_masks:
        ax.legend(fontsize=7, ncols=min(5, len(task_masks)))
    return fig


def plot_overlap_heatmap(
    task_masks: Mapping[str, Mapping[str, Any]],
    *,
    figsize: tuple[float, float] | None = None,
    annotate: bool = True,
) -> Figure:
    """Jaccard overlap of the switched-off weights between tasks, annotated per cell."""
    tasks, mat = overlap_matrix(_as_task_masks(task_masks))
    size = max(3.5, 0.6 * len(tasks) + 2)
    fig = Figure(figsize=figsize or (size + 1, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_yticks(np.arange(len(tasks)))
    ax.set_xticklabels(tasks, rotation=45, ha="right")
    ax.set_yticklabels(tasks)
    if annotate:
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                value = mat[i, j]
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if value > 0.6 else "white",
                )
    fig.colorbar(image, ax=ax, label="Jaccard index of zeroed weights")
    ax.set_title("Mask overlap between tasks")
    return fig


def plot_changed_by_depth(
    task_masks: Mapping[str, Any],
    *,
    relative_depth: bool = False,
    include_sign_flips: bool = False,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Fraction of weights changed from the pretrained network against layer depth.

    ``relative_depth`` maps depth to [0, 1] so backbones of different depth share one axis
    (the paper's "later layers change more" comparison).
    """
    task_masks = _as_task_masks(task_masks)
    fig = Figure(figsize=figsize or (7.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for task, masks in task_masks.items():
        rows = fraction_changed_by_depth(masks, include_sign_flips=include_sign_flips)
        depth = np.array([r[0] for r in rows], dtype=float)
        if relative_depth and len(rows) > 1:
            depth = depth / (len(rows) - 1)
        ax.plot(depth, [100.0 * r[2] for r in rows], marker="o", markersize=3, label=str(task))
    ax.set_xlabel("relative depth" if relative_depth else "layer depth (index)")
    ax.set_ylabel("weights changed (%)")
    ax.set_title("Change from the pretrained network by depth")
    ax.grid(alpha=0.3)
    if task_masks:
        ax.legend(fontsize=7)
    return fig
