"""Kernel / filter / soft (KSM) masks in artifacts, bundles and multi-task models.

Exactly one bit per mask unit (plus a float32 scale per unit for soft masks) is stored, the
round trip predicts bit-identically, plain artifacts stay in the v2 format, and tasks of
different granularity share one backbone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from piggyback.formats import ArtifactError, fingerprint, load_artifact, save_artifact
from piggyback.masks import expand_to_weights, total_sparsity
from piggyback.methods import apply_artifact, extract_artifact
from piggyback.models.multitask import MultiTaskModel, masks_in_network_order
from piggyback.nn import get_masks, mask_model, masked_weights, num_mask_units

VARIANTS = [
    ("element", False),
    ("kernel", False),
    ("filter", False),
    ("element", True),
    ("kernel", True),
    ("filter", True),
]
IDS = [f"{g}{'-soft' if s else ''}" for g, s in VARIANTS]
# (weight shape, units per granularity) of the network below
LAYERS = {
    "0.weight": ((6, 3, 3, 3), {"element": 162, "kernel": 18, "filter": 6}),
    "2.weight": ((6, 3, 5, 5), {"element": 450, "kernel": 18, "filter": 6}),  # groups=2
    "4.weight": ((8, 6, 1, 1), {"element": 48, "kernel": 48, "filter": 8}),
    "7.weight": ((5, 8), {"element": 40, "kernel": 40, "filter": 5}),
}


def _pretrained() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 5, padding=2, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def _trained(granularity: str, soft: bool, seed: int = 1) -> nn.Module:
    backbone = mask_model(_pretrained(), granularity=granularity, soft=soft)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, mask in masked_weights(backbone):
            mask.mask_real.uniform_(-1e-2, 1e-2)
            if soft:
                mask.soft_scale.uniform_(0.5, 1.5)
    return backbone


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def _extract(backbone, head, task, encoding="bits"):
    return extract_artifact(
        backbone, head, task=task, backbone_name="tiny", method="ksm", encoding=encoding
    )


@pytest.mark.parametrize(("granularity", "soft"), VARIANTS, ids=IDS)
def test_storage_is_one_bit_per_unit_plus_scales(granularity, soft):
    backbone = _trained(granularity, soft)
    artifact = _extract(backbone, nn.Linear(5, 3), "t")
    units = {name: units[granularity] for name, (_, units) in LAYERS.items()}
    assert {n: m.numel for n, m in artifact.masks.items()} == units
    assert artifact.num_mask_units == num_mask_units(backbone) == sum(units.values())
    assert artifact.num_masked_weights == sum(math.prod(s) for s, _ in LAYERS.values())
    bits = sum((n + 7) // 8 for n in units.values())
    scales = 4 * sum(units.values()) if soft else 0
    assert artifact.mask_bytes() == bits + scales
    assert artifact.bits_per_masked_weight() == 8 * (bits + scales) / 700
    for name, mask in artifact.masks.items():
        assert mask.weight_shape == LAYERS[name][0]


@pytest.mark.parametrize("encoding", ["bits", "rice"])
@pytest.mark.parametrize(("granularity", "soft"), VARIANTS, ids=IDS)
def test_round_trip_predicts_bit_identically(granularity, soft, encoding, tmp_path):
    backbone = _trained(granularity, soft)
    torch.manual_seed(4)
    head = nn.Linear(5, 3)
    with torch.no_grad():
        expected = head(backbone(_x()))
    artifact = _extract(backbone, head, "t", encoding)
    path = save_artifact(artifact, tmp_path / "t.safetensors")
    with safe_open(str(path), "pt") as handle:
        plain = granularity == "element" and not soft
        assert handle.metadata()["version"] == ("2" if plain else "3")
    loaded = load_artifact(path)
    # applied to a fresh *element* backbone: the stored shapes decide the granularity
    fresh = mask_model(_pretrained())
    loaded_head = apply_artifact(fresh, loaded)
    with torch.no_grad():
        assert torch.equal(loaded_head(fresh(_x())), expected)
    for name, mask in masked_weights(fresh):
        assert mask.unit_shape == loaded.masks[name].shape
        assert (mask.soft_scale is not None) == soft


def test_statistics_count_weights_not_units():
    backbone = _trained("kernel", False)
    with torch.no_grad():
        for _, mask in masked_weights(backbone):
            mask.mask_real.fill_(1e-2)
        dict(masked_weights(backbone))["0.weight"].mask_real[0, 0] = 0  # one 3x3 kernel off
    units = get_masks(backbone)
    weights = get_masks(backbone, per_weight=True)
    assert total_sparsity(units) == 1 / 124  # one of 124 units
    assert total_sparsity(weights) == 9 / 700  # nine of 700 weights
    shapes = {n: s for n, (s, _) in LAYERS.items()}
    assert total_sparsity(expand_to_weights(units, shapes)) == 9 / 700
    artifact = _extract(backbone, nn.Linear(5, 3), "t")
    assert total_sparsity(artifact.weight_masks()) == 9 / 700
    assert total_sparsity(masks_in_network_order(artifact)) == 9 / 700


def test_tasks_of_every_granularity_share_one_model(tmp_path):
    artifacts, expected = [], {}
    for i, (granularity, soft) in enumerate(VARIANTS):
        backbone = _trained(granularity, soft, seed=10 + i)
        head = nn.Linear(5, 3)
        task = f"task_{IDS[i]}"
        with torch.no_grad():
            expected[task] = head(backbone(_x()))
        artifact = _extract(backbone, head, task)
        artifacts.append(load_artifact(save_artifact(artifact, tmp_path / f"{task}.st")))
    model = MultiTaskModel.from_artifacts(artifacts, _pretrained())
    with torch.no_grad():
        for task in [*expected, *reversed(expected)]:  # switching must not leak state
            assert torch.equal(model(_x(), task=task), expected[task])


def test_damaged_shapes_are_refused(tmp_path):
    artifact = _extract(_trained("kernel", True), nn.Linear(5, 3), "t")
    mask = artifact.masks["0.weight"]
    mask.shape = (6, 2, 1, 1)  # does not broadcast onto (6, 3, 3, 3)
    with pytest.raises(ArtifactError, match="does not fit weight"):
        apply_artifact(mask_model(_pretrained()), artifact)
    artifact = _extract(_trained("kernel", True), nn.Linear(5, 3), "t")
    artifact.masks["0.weight"].scale = torch.ones(3)
    with pytest.raises(ArtifactError, match="scales"):
        apply_artifact(mask_model(_pretrained()), artifact)


def test_soft_needs_the_binarizer():
    with pytest.raises(ValueError, match="binarizer"):
        mask_model(_pretrained(), soft=True, threshold_fn="ternarizer")


def test_fingerprint_ignores_soft_scales():
    assert fingerprint(_trained("kernel", True)) == fingerprint(mask_model(_pretrained()))
    assert fingerprint(copy.deepcopy(_trained("filter", True))) == fingerprint(_pretrained())
