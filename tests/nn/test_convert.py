import copy

import pytest
import torch
import torchvision
from torch import nn

from piggyback.nn import (
    MaskedConv2d,
    MaskedLinear,
    get_masks,
    mask_model,
    masked_layers,
    materialize,
    num_masked_weights,
    set_masks,
    strip_classifier,
)


def _count(model):
    convs = sum(isinstance(m, MaskedConv2d) for _, m in masked_layers(model))
    fcs = sum(isinstance(m, MaskedLinear) for _, m in masked_layers(model))
    return convs, fcs


@pytest.mark.parametrize(
    ("name", "convs", "fcs"),
    [
        ("resnet50", 53, 0),
        ("vgg16", 13, 2),
        ("vgg16_bn", 13, 2),
        ("densenet121", 120, 0),
    ],
)
def test_paper_backbones_layer_counts(name, convs, fcs):
    model = getattr(torchvision.models, name)(weights=None)
    model, _ = strip_classifier(model)
    mask_model(model)
    assert _count(model) == (convs, fcs)
    for _, layer in masked_layers(model):
        trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
        assert trainable == ["mask_real"]


def test_resnet50_masked_weight_count():
    model, width = strip_classifier(torchvision.models.resnet50(weights=None))
    mask_model(model)
    assert width == 2048
    assert num_masked_weights(model) == 23_454_912  # PAPER.md: about 23.5M


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]
)
def test_1s_init_is_bit_identical_on_other_cnns(name):
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None).eval()
    masked = mask_model(copy.deepcopy(original)).eval()
    assert len(list(masked_layers(masked))) > 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(masked(x), original(x))


def test_1s_init_bit_identical_resnet50_and_vgg16_bn():
    for name, size in (("resnet50", 64), ("vgg16_bn", 32)):
        torch.manual_seed(0)
        original = getattr(torchvision.models, name)(weights=None).eval()
        masked = mask_model(copy.deepcopy(original)).eval()
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert torch.equal(masked(x), original(x)), name


def test_exclude_by_name_and_pattern():
    model = torchvision.models.resnet18(weights=None)
    mask_model(model, exclude=["fc", "layer4.*", "conv1"])
    names = [n for n, _ in masked_layers(model)]
    assert "fc" not in names and "conv1" not in names
    assert not any(n.startswith("layer4") for n in names)
    assert "layer1.0.conv1" in names
    assert isinstance(model.fc, nn.Linear) and not isinstance(model.fc, MaskedLinear)


def test_mask_model_is_idempotent():
    model = mask_model(torchvision.models.resnet18(weights=None))
    layer = model.layer1[0].conv1
    mask_model(model)
    assert model.layer1[0].conv1 is layer


def test_uniform_init_masks_off_weights():
    torch.manual_seed(0)
    model = mask_model(
        torchvision.models.resnet18(weights=None), mask_init="uniform", threshold=0.0
    )
    masks = get_masks(model)
    zeros = sum((m == 0).sum().item() for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(zeros / total - 0.5) < 0.01


def test_materialize_gives_plain_model_with_same_outputs():
    torch.manual_seed(0)
    model = mask_model(torchvision.models.resnet18(weights=None), mask_init="uniform").eval()
    plain = materialize(model).eval()
    assert not list(masked_layers(plain))
    assert all(not n.endswith("mask_real") for n, _ in plain.named_parameters())
    assert type(plain.layer1[0].conv1) is nn.Conv2d and type(plain.fc) is nn.Linear
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)
    assert list(masked_layers(model))  # original untouched


def test_materialized_model_exports_with_torch_export():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)
    )
    mask_model(model, mask_init="uniform")
    plain = materialize(model).eval()
    x = torch.randn(1, 3, 4, 4)
    exported = torch.export.export(plain, (x,))
    assert torch.allclose(exported.module()(x), plain(x))


def test_set_masks_checks_layer_names():
    model = mask_model(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    masks = get_masks(model)
    set_masks(model, masks)
    masks.pop("1")
    with pytest.raises(ValueError, match="missing"):
        set_masks(model, masks)


def test_strip_classifier_needs_a_linear():
    with pytest.raises(ValueError, match="no nn.Linear"):
        strip_classifier(nn.Sequential(nn.Conv2d(3, 3, 1)))
