"""Widening hidden widths: which blocks grow, by exactly how much, and that nothing else moves."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Mlp
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from piggyback.nn.widen import hidden_widths, unit_entries, widen


def _mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0).eval()


def test_inverted_residuals_with_squeeze_excite_grow_and_compute_the_same():
    model = _mobilenet()
    widths = hidden_widths(model)
    kinds = {type(model.get_submodule(b)).__name__ for b in widths}
    assert kinds == {"InvertedResidual"}  # the first DepthwiseSeparableConv has no width
    with_se = [b for b, h in widths.items() if any("se." in p for p in h.producers)]
    assert with_se, "mobilenetv3 has squeeze-excite blocks"
    block = with_se[0]
    before_width = widths[block].width
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    new = widen(model, {block: 5, next(iter(widths)): 3})
    assert new[block] == before_width + 5
    hidden = hidden_widths(model)[block]
    net = model.get_submodule(block)
    assert net.conv_pw.out_channels == net.conv_dw.groups == net.conv_pwl.in_channels
    assert net.conv_pw.weight.shape[0] == before_width + 5
    assert net.bn1.running_var[-5:].eq(1).all() and net.bn2.weight[-5:].eq(1).all()
    assert net.se.conv_reduce.weight.shape[1] == net.se.conv_expand.weight.shape[0]
    assert net.conv_pwl.weight[:, -5:].eq(0).all() and net.se.conv_reduce.weight[:, -5:].eq(0).all()
    assert hidden.width == before_width + 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    entries = unit_entries(model, hidden, before_width, before_width + 5)
    assert int(entries[f"{block}.conv_pwl.weight"].sum()) == 5 * net.conv_pwl.out_channels
    kernel = net.conv_dw.weight[0].numel()
    assert int(entries[f"{block}.conv_dw.weight"].sum()) == 5 * kernel  # a filter per unit
    pw = entries[f"{block}.conv_pw.weight"]
    assert pw[-5:].all() and not pw[:-5].any()


@pytest.mark.parametrize("block_class", [BasicBlock, Bottleneck])
def test_resnet_blocks_grow_between_conv1_and_conv2(block_class):
    torch.manual_seed(0)
    model = ResNet(block_class, [1, 1, 1, 1], num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    widths = hidden_widths(model)
    assert sorted(widths) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    widen(model, {"layer2.0": 4})
    block = model.layer2[0]
    assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == 132
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_grouped_bottlenecks_and_hidden_norms_do_not_grow():
    resnext = ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8)
    assert hidden_widths(resnext) == {}
    assert hidden_widths(Mlp(8, 16, norm_layer=nn.LayerNorm)) == {}
    mlp = Mlp(8, 16)
    x = torch.randn(3, 8)
    expected = mlp(x)
    widen(mlp, {"": 2})
    assert mlp.fc1.out_features == mlp.fc2.in_features == 18
    torch.testing.assert_close(mlp(x), expected)


def test_widening_is_seeded_and_unknown_blocks_are_refused_by_name():
    a, b = _mobilenet(), _mobilenet()
    block = next(iter(hidden_widths(a)))
    widen(a, {block: 2}, seed=3)
    widen(b, {block: 2}, seed=3)
    key = f"{block}.conv_pw.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    with pytest.raises(ValueError, match=r"cannot widen \['conv_stem'\]"):
        widen(a, {"conv_stem": 1})
    with pytest.raises(ValueError, match="by -1 units"):
        widen(a, {block: -1})
