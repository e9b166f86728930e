"""Compressed ('rice') task artifacts: lossless, under half a bit per weight, raw still read."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from piggyback.backbones import remove_classifier
from piggyback.formats import ArtifactError, PackedMask, fingerprint, load_artifact, save_artifact
from piggyback.methods import apply_artifact, extract_artifact
from piggyback.nn import get_masks, mask_model, masked_weights, reset_masks


def _backbone() -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    model, width = remove_classifier(torchvision.models.resnet18(weights=None))
    return mask_model(model).eval(), width


def _set_masks(backbone: nn.Module, zeros: float, *, clustered: bool, seed: int = 0) -> float:
    """Load masks with ``zeros`` zero fraction; clustered = per-filter rates, as trained masks.

    Returns the actual fraction of ones.
    """
    rng = np.random.default_rng(seed)
    ones = total = 0
    for _, layer in masked_weights(backbone):
        shape = tuple(layer.weight.shape)
        if clustered:
            rate = rng.beta(zeros * 4.0, (1.0 - zeros) * 4.0, size=shape[0])
            rate = rate.reshape((-1,) + (1,) * (len(shape) - 1))
        else:
            rate = zeros
        mask = torch.from_numpy(rng.random(shape) >= rate).float()
        layer.set_mask(mask)
        ones += int(mask.sum())
        total += mask.numel()
    return ones / total


def _predict(backbone: nn.Module, head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return head(backbone(x))


@pytest.fixture(scope="module")
def task():
    """A ResNet-18 task with ~93 % ones in clustered masks, and its head."""
    backbone, width = _backbone()
    ones = _set_masks(backbone, 0.07, clustered=True)
    assert 0.90 <= ones <= 0.96
    torch.manual_seed(1)
    head = nn.Linear(width, 5)
    return backbone, head


def _export(backbone, head, encoding):
    return extract_artifact(backbone, head, task="t", backbone_name="resnet18", encoding=encoding)


def test_rle_round_trip_gives_bit_identical_predictions(task, tmp_path):
    backbone, head = task
    x = torch.randn(2, 3, 64, 64)
    expected = _predict(backbone, head, x)
    path = save_artifact(_export(backbone, head, "rice"), tmp_path / "t.safetensors")
    loaded = load_artifact(path)
    assert {m.encoding for m in loaded.masks.values()} == {"rice"}
    fresh, _ = _backbone()  # same pretrained weights, masks back to all ones
    reset_masks(fresh)
    assert not torch.equal(_predict(fresh, head, x), expected)
    new_head = apply_artifact(fresh, loaded, backbone_fingerprint=fingerprint(fresh))
    assert torch.equal(_predict(fresh, new_head, x), expected)
    masks = get_masks(fresh)
    for name, mask in get_masks(backbone).items():
        assert torch.equal(masks[name], mask)


def test_rle_is_smaller_than_raw_and_under_half_a_bit(task, tmp_path):
    backbone, head = task
    sizes = {}
    for encoding in ("bits", "rice"):
        artifact = _export(backbone, head, encoding)
        sizes[encoding] = (
            artifact.bits_per_masked_weight(),
            os.path.getsize(save_artifact(artifact, tmp_path / f"{encoding}.safetensors")),
        )
    assert sizes["bits"][0] == pytest.approx(1.0, abs=1e-3)
    assert sizes["rice"][0] <= 0.5
    assert sizes["rice"][1] < sizes["bits"][1]


def test_rle_under_half_a_bit_for_iid_zeros_at_90_percent_ones():
    """The hardest case the target covers: unclustered zeros, exactly 10 % of them."""
    backbone, width = _backbone()
    ones = _set_masks(backbone, 0.10, clustered=False, seed=3)
    assert ones == pytest.approx(0.90, abs=1e-3)
    artifact = _export(backbone, nn.Linear(width, 2), "rice")
    assert artifact.bits_per_masked_weight() <= 0.5
    decoded = artifact.unpacked_masks()
    for name, mask in get_masks(backbone).items():
        assert torch.equal(decoded[name], mask)


def test_raw_one_bit_artifacts_are_still_read_and_mix_with_rice(task, tmp_path):
    backbone, head = task
    x = torch.randn(2, 3, 64, 64)
    expected = _predict(backbone, head, x)
    raw = save_artifact(_export(backbone, head, "bits"), tmp_path / "raw.safetensors")
    other, width = _backbone()
    _set_masks(other, 0.05, clustered=True, seed=7)
    rice = save_artifact(_export(other, nn.Linear(width, 3), "rice"), tmp_path / "rice.safetensors")

    fresh, _ = _backbone()
    loaded_raw = load_artifact(raw)
    assert {m.encoding for m in loaded_raw.masks.values()} == {"bits"}
    assert loaded_raw.bits_per_masked_weight() == pytest.approx(1.0, abs=1e-3)
    apply_artifact(fresh, load_artifact(rice))  # switch through a rice task first
    new_head = apply_artifact(fresh, loaded_raw)
    assert torch.equal(_predict(fresh, new_head, x), expected)


@pytest.mark.parametrize(
    "values",
    [
        torch.ones(64, 3, 3, 3),
        torch.zeros(8, 8),
        torch.ones(1000).index_fill_(0, torch.tensor([0, 999]), 0.0),
        (torch.arange(4096) % 2).float().reshape(64, 64),  # incompressible: raw fallback
    ],
    ids=["all_ones", "all_zeros", "edges", "alternating"],
)
def test_packed_rice_edge_cases_are_lossless(values):
    packed = PackedMask.from_mask(values, "binary", "rice")
    assert torch.equal(packed.unpack(), values)
    assert packed.unpack(torch.float16).dtype == torch.float16


def test_rice_refuses_ternary_masks():
    with pytest.raises(ValueError, match="binary masks only"):
        PackedMask.from_mask(torch.tensor([-1.0, 0.0, 1.0]), "ternary", "rice")


def test_damaged_rice_payload_is_refused(task, tmp_path):
    backbone, head = task
    path = save_artifact(_export(backbone, head, "rice"), tmp_path / "t.safetensors")
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x55  # inside the tensor payload
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="integrity"):
        load_artifact(path)


def test_artifacts_and_configs_with_the_old_rle_name_still_work(task, tmp_path):
    """``rice`` was called ``rle``: files written under that name load, the option still works."""
    from piggyback.formats import (
        ARTIFACT_FORMAT,
        FORMAT_VERSION,
        artifact_meta,
        artifact_tensors,
        write_checked_file,
    )

    backbone, head = task
    artifact = _export(backbone, head, "rle")
    assert {m.encoding for m in artifact.masks.values()} == {"rice"}
    meta = artifact_meta(artifact)
    for info in meta["masks"].values():
        info["encoding"] = "rle"  # as an earlier piggyback wrote it
    path = write_checked_file(
        tmp_path / "old.safetensors",
        artifact_tensors(artifact),
        meta,
        file_format=ARTIFACT_FORMAT,
        version=FORMAT_VERSION,
    )
    loaded = load_artifact(path)
    assert {m.encoding for m in loaded.masks.values()} == {"rice"}
    fresh, _ = _backbone()
    apply_artifact(fresh, loaded)
    assert all(
        torch.equal(a, b)
        for a, b in zip(get_masks(fresh).values(), get_masks(backbone).values(), strict=True)
    )
