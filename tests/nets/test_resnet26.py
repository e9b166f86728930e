"""The decathlon ResNet-26: shapes, layer counts, and what the masking converter relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from piggyback.nets import ResNet26, resnet26


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_output_shape_on_64px_batch():
    model = resnet26(num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(4, 3, 64, 64)).shape == (4, 10)
        assert model(torch.randn(2, 3, 72, 72)).shape == (2, 10)  # gtsrb / omniglot / svhn
        assert model.features(torch.randn(2, 3, 64, 64)).shape == (2, 256)


def test_layer_count_is_26():
    model = resnet26()
    convs = _convs(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # stem + 3 stages x 4 blocks x 2 convs; parameter-free (pool + zero-pad) shortcuts
    assert len(convs) == 25 and len(linears) == 1
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert convs[0].out_channels == 32
    assert [s[0].conv1.out_channels for s in (model.layer1, model.layer2, model.layer3)] == [
        64,
        128,
        256,
    ]


def test_fc_is_last_module_and_linear():
    model = resnet26(num_classes=1000)
    name, last = list(model.named_modules())[-1]
    assert name == "fc" and isinstance(last, nn.Linear)
    assert (last.in_features, last.out_features) == (256, 1000)
    model.fc = nn.Identity()  # how the training app gets features
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 256)


def test_resolution_halves_per_stage():
    model = resnet26().eval()
    shapes = []
    for stage in (model.layer1, model.layer2, model.layer3):
        stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert shapes == [(32, 32), (16, 16), (8, 8)]


def test_conv_shortcut_variant_adds_three_1x1_convs():
    model = ResNet26(num_classes=5, shortcut="conv")
    convs = _convs(model)
    assert len(convs) == 28
    assert sum(c.kernel_size == (1, 1) for c in convs) == 3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_backward_reaches_every_conv():
    model = resnet26(num_classes=3)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in _convs(model))


def test_bad_shortcut():
    with pytest.raises(ValueError, match="shortcut"):
        ResNet26(shortcut="avg")
