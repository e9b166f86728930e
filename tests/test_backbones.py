"""Backbones: local checkpoints, the offline message, and classifier stripping."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from piggyback.backbones import BackboneError, build_backbone


def test_local_checkpoint_is_loaded_and_classifier_stripped(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    backbone = build_backbone("resnet18", checkpoint=path)
    assert backbone.feature_dim == 512
    assert isinstance(backbone.model.fc, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(backbone.model.eval()(x), reference(x))


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(BackboneError, match="does not fit"):
        build_backbone("resnet50", checkpoint=path)
    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone("resnet50", checkpoint=tmp_path / "missing.pth")


def test_offline_download_says_how_to_supply_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneError) as info:
        build_backbone("resnet18", weights="DEFAULT")
    message = str(info.value)
    assert "offline" in message and "backbone.checkpoint=" in message
    assert str(tmp_path) in message  # names the cache folder to copy the file into


def test_unknown_backbone_and_weights():
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("resnet5000", weights=None)
    with pytest.raises(BackboneError, match="no torchvision weights"):
        build_backbone("resnet18", weights="NOT_A_WEIGHT")
    with pytest.raises(BackboneError, match="checkpoint"):
        build_backbone("resnet26", weights="DEFAULT")


@pytest.mark.parametrize(
    ("name", "width"),
    [("vgg16", 4096), ("densenet121", 1024), ("small_cnn", 128), ("resnet26", 256)],
)
def test_feature_widths(name, width):
    assert build_backbone(name, weights=None).feature_dim == width
