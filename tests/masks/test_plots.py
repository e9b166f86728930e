"""Mask figures build headless with one series per task and the expected bars / cells."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import io  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from piggyback.masks.plots import (  # noqa: E402
    plot_changed_by_depth,
    plot_layer_sparsity,
    plot_overlap_heatmap,
)

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc6"]


def _task(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(6, 5, generator=g) > 0.1 * (i + 1) for i, name in enumerate(LAYERS)}


@pytest.fixture
def task_masks():
    return {"cubs": _task(0), "cars": _task(1), "flowers": _task(2)}


def _renders(fig: Figure) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG")


def test_layer_sparsity_lines(task_masks):
    fig = plot_layer_sparsity(task_masks)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
    assert all(len(line.get_xdata()) == len(LAYERS) for line in ax.get_lines())
    _renders(fig)


def test_layer_sparsity_bars(task_masks):
    fig = plot_layer_sparsity(task_masks, kind="bar")
    ax = fig.axes[0]
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == 3
    assert all(len(c.patches) == len(LAYERS) for c in containers)
    assert len(ax.patches) == 3 * len(LAYERS)
    _renders(fig)


def test_layer_sparsity_single_task_mapping():
    fig = plot_layer_sparsity(_task(0))
    assert len(fig.axes[0].get_lines()) == 1


def test_layer_sparsity_bad_kind(task_masks):
    with pytest.raises(ValueError, match="kind"):
        plot_layer_sparsity(task_masks, kind="pie")  # type: ignore[arg-type]


def test_overlap_heatmap(task_masks):
    fig = plot_overlap_heatmap(task_masks)
    ax = fig.axes[0]
    assert len(ax.images) == 1
    assert ax.images[0].get_array().shape == (3, 3)
    assert len(ax.texts) == 9
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cubs", "cars", "flowers"]
    assert len(fig.axes) == 2  # heat map + colour bar
    _renders(fig)


def test_changed_by_depth(task_masks):
    fig = plot_changed_by_depth(task_masks, relative_depth=True)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3
    assert list(lines[0].get_xdata()) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    _renders(fig)
