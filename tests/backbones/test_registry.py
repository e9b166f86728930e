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


@pytest.mark.parametrize(
    ("name", "source", "width", "kwargs"),
    [
        ("vit_b_16", "auto", 768, {"image_size": 32}),
        ("mobilenet_v3_small", "auto", 1024, {}),  # keeps its hidden classifier layer
        ("convnext_tiny", "auto", 768, {}),
        ("swin_t", "auto", 768, {}),
        ("vit_tiny_patch16_224", "auto", 192, {"img_size": 32}),  # timm, found by name
        ("resnet18", "timm", 512, {}),  # the same name, from timm on request
        ("convnext_atto", "timm", 320, {}),
        ("mobilenetv3_small_100", "timm", 1024, {}),  # head_hidden_size, not num_features
    ],
)
def test_classifier_comes_off_through_the_models_own_api(name, source, width, kwargs):
    """timm models lose their head via reset_classifier(0), not "the last nn.Linear"
    (which on a ViT is blocks.11.mlp.fc2); torchvision models at their known place."""
    backbone = build_backbone(name, source=source, weights=None, kwargs=kwargs)
    assert backbone.feature_dim == width
    size = kwargs.get("image_size", kwargs.get("img_size", 64))
    with torch.no_grad():
        features = backbone.model.eval()(torch.randn(2, 3, size, size))
    assert features.shape == (2, width)
    if source == "timm" or name.startswith("vit_tiny"):
        assert backbone.data_config["mean"] and backbone.data_config["input_size"][0] == 3


def test_any_callable_via_target_and_an_explicit_classifier():
    spec = {"_target_": "torch.nn.Sequential"}
    with pytest.raises(BackboneError, match="cannot tell which module"):
        build_backbone("mine", model=torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    backbone = build_backbone("mine", model=net, classifier="2")
    assert backbone.feature_dim == 8 and isinstance(backbone.model[2], torch.nn.Identity)
    with pytest.raises(BackboneError, match="no module 'head'"):
        build_backbone("mine", model=torch.nn.Sequential(torch.nn.Linear(2, 2)), classifier="head")
    made = build_backbone("small", model={"_target_": "piggyback.nets.small_cnn", "width": 8})
    assert made.feature_dim == 32
    with pytest.raises(BackboneError, match="not an nn.Module"):
        build_backbone("x", model={"_target_": "builtins.dict"})
    assert spec  # a plain _target_ dict is what a YAML gives


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some text\n", r"not a readable torch file \(neither a torch.save archive nor a"),
        (bytes(range(256)) * 4, "neither a torch.save archive nor a pickle"),
        ("model", r"holds more than tensors: Unsupported global: .*; save model.state_dict\(\)"),
        ("truncated", "neither a torch.save archive nor a pickle"),
        (None, "holds a Tensor, not a state dict"),
        ("dir", "is a directory"),
    ],
)
def test_bad_checkpoint_files_say_what_was_expected(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content is None:
        torch.save(torch.zeros(3), path)
    elif content in ("model", "truncated"):  # a whole pickled model, or the start of one
        torch.save(torch.nn.Linear(2, 2), path)
        if content == "truncated":
            path.write_bytes(path.read_bytes()[:300])
    elif content == "dir":
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(BackboneError, match=message) as info:
        build_backbone("resnet18", checkpoint=path)
    assert str(path) in str(info.value) and "state dict" in str(info.value)
    assert "ResNet" in str(info.value)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
