"""Mask statistics on hand-built masks, where every fraction and Jaccard value is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from piggyback.masks.stats import (
    flips,
    fraction_changed_by_depth,
    layer_sparsity,
    overlap_matrix,
    pairwise_overlap,
    task_sparsity_table,
    total_sparsity,
)


def _mask(numel: int, zeros: list[int], shape=None, dtype=torch.bool) -> torch.Tensor:
    m = torch.ones(numel, dtype=dtype)
    m[zeros] = 0
    return m.reshape(shape) if shape else m


@pytest.fixture
def one_task():
    return {
        "conv1": _mask(10, [0, 1], shape=(2, 5)),  # 2/10 off
        "layer1.conv": _mask(40, [], shape=(4, 10)),  # 0/40
        "fc": _mask(50, list(range(25))),  # 25/50
    }


@pytest.fixture
def three_tasks():
    # 20 weights in two layers: zero sets over the flat concatenation (a: layer, b: layer2)
    return {
        "a": {"l1": _mask(10, [0, 1, 2, 3]), "l2": _mask(10, [])},  # {0,1,2,3}
        "b": {"l1": _mask(10, [2, 3]), "l2": _mask(10, [0, 1])},  # {2,3,10,11}
        "c": {"l1": _mask(10, []), "l2": _mask(10, [])},  # {}
        "d": {"l1": _mask(10, []), "l2": _mask(10, [])},  # {}
    }


def test_layer_sparsity_exact(one_task):
    assert layer_sparsity(one_task) == {"conv1": 0.2, "layer1.conv": 0.0, "fc": 0.5}
    assert list(layer_sparsity(one_task)) == ["conv1", "layer1.conv", "fc"]


def test_total_sparsity_weighted_by_numel(one_task):
    assert total_sparsity(one_task) == pytest.approx(27 / 100)
    assert total_sparsity({}) == 0.0
    assert layer_sparsity({"empty": torch.ones(0)}) == {"empty": 0.0}


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32])
def test_dtypes_and_numpy(one_task, dtype):
    converted = {k: v.to(dtype) for k, v in one_task.items()}
    assert layer_sparsity(converted) == layer_sparsity(one_task)
    as_numpy = {k: v.numpy() for k, v in converted.items()}
    assert total_sparsity(as_numpy) == pytest.approx(0.27)


def test_task_sparsity_table(one_task, three_tasks):
    rows = task_sparsity_table({"t1": one_task, **three_tasks})
    assert [r["task"] for r in rows] == ["t1", "a", "b", "c", "d"]
    assert rows[0] == {"task": "t1", "masked_weights": 100, "zeros": 27, "fraction_zeros": 0.27}
    assert rows[1]["zeros"] == 4 and rows[1]["fraction_zeros"] == pytest.approx(0.2)
    assert rows[3]["zeros"] == 0 and rows[3]["fraction_zeros"] == 0.0


def test_fraction_changed_by_depth(one_task):
    assert fraction_changed_by_depth(one_task) == [
        (0, "conv1", 0.2),
        (1, "layer1.conv", 0.0),
        (2, "fc", 0.5),
    ]


def test_ternary_counts_zeros_as_off_and_minus_one_as_on():
    tern = {"l": torch.tensor([1, -1, -1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.int8)}
    assert layer_sparsity(tern) == {"l": 0.2}
    assert fraction_changed_by_depth(tern) == [(0, "l", 0.2)]
    assert fraction_changed_by_depth(tern, include_sign_flips=True) == [(0, "l", 0.4)]


def test_pairwise_overlap_exact(three_tasks):
    ov = pairwise_overlap(three_tasks)
    # a={0,1,2,3}, b={2,3,10,11}: |∩|=2, |∪|=6
    assert ov[("a", "b")] == pytest.approx(2 / 6)
    assert ov[("b", "a")] == ov[("a", "b")]
    assert ov[("a", "c")] == 0.0  # one set empty, the other not
    assert ov[("c", "d")] == 1.0  # both empty: defined as 1.0
    assert len(ov) == 4 * 3  # ordered pairs of distinct tasks
    assert ("a", "a") not in ov


def test_overlap_matrix(three_tasks):
    tasks, mat = overlap_matrix(three_tasks)
    assert tasks == ["a", "b", "c", "d"]
    expected = np.array(
        [
            [1.0, 1 / 3, 0.0, 0.0],
            [1 / 3, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 1.0],
            [0.0, 0.0, 1.0, 1.0],
        ]
    )
    np.testing.assert_allclose(mat, expected)
    assert np.array_equal(mat, mat.T)


def test_identical_masks_overlap_one_and_missing_layer_is_all_ones():
    m = {"l1": _mask(8, [1, 5]), "l2": _mask(4, [0])}
    assert pairwise_overlap({"x": m, "y": dict(m)})[("x", "y")] == 1.0
    # y does not mask l2: treated as pretrained (all ones) there
    ov = pairwise_overlap({"x": m, "y": {"l1": m["l1"]}})
    assert ov[("x", "y")] == pytest.approx(2 / 3)


def test_layer_size_mismatch_raises():
    with pytest.raises(ValueError, match="different backbones"):
        pairwise_overlap({"x": {"l": torch.ones(4)}, "y": {"l": torch.ones(5)}})


def test_flips_exact_on_hand_made_changes():
    before = {"a": _mask(10, [0]), "b": _mask(30, [], shape=(5, 6))}
    after = {"a": _mask(10, [1, 2, 3]), "b": _mask(30, [], shape=(5, 6))}
    overall, per_layer = flips(before, after)
    # a: weight 0 switched back on, weights 1-3 off (4 of 10); b unchanged; 4 of 40 overall
    assert per_layer == {"a": 0.4, "b": 0.0}
    assert overall == 4 / 40
    ternary = torch.tensor([1.0, 0.0, -1.0, 1.0])
    assert flips({"t": ternary}, {"t": torch.tensor([-1.0, 0.0, -1.0, 1.0])}) == (0.25, {"t": 0.25})
    assert flips({}, {}) == (0.0, {})
    with pytest.raises(ValueError, match="layers differ"):
        flips(before, {"a": after["a"]})
    with pytest.raises(ValueError, match="'a' has 10 weights before and 9 after"):
        flips(before, {"a": _mask(9, []), "b": after["b"]})
