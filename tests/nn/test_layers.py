import pytest
import torch
import torch.nn.functional as F
from torch import nn

from piggyback.nn import (
    binarizer,
    mask_model,
    masked_weight,
    module_masks,
    ternarizer,
)


def masked(module: nn.Module, **options):
    """Gate ``module.weight`` in place; returns the module and its WeightMask."""
    mask_model(module, **options)
    return module, module_masks(module)["weight"]


def _conv(**kw):
    torch.manual_seed(0)
    return nn.Conv2d(**{"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"stride": 2, "padding": 1},
        {"padding": 2, "dilation": 2, "bias": False},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": 1, "padding_mode": "circular", "stride": (1, 2)},
        {"groups": 2, "padding": "same"},
        {"in_channels": 6, "groups": 6, "padding": 1},  # depthwise
    ],
)
def test_conv_forward_equals_functional_with_masked_weight(kw):
    conv = _conv(**kw)
    reference = _conv(**kw)
    layer, layer_m = masked(conv, mask_init="uniform", mask_scale=1e-2)
    x = torch.randn(2, conv.in_channels, 9, 11)
    mask = (layer_m.mask_real > 5e-3).float()
    assert 0 < mask.mean() < 1
    reference.weight.data.mul_(mask)
    assert torch.allclose(layer(x), reference(x), atol=1e-6)
    # and against F.conv2d written out
    if conv.padding_mode == "zeros":
        expected = F.conv2d(
            x,
            layer_m.weight * mask,
            conv.bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_linear_forward_equals_functional():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    layer, layer_m = masked(lin, mask_init="uniform")
    x = torch.randn(4, 5)
    mask = (layer_m.mask_real > 5e-3).float()
    assert torch.equal(layer(x), F.linear(x, layer_m.weight * mask, lin.bias))


def test_mask_gradient_is_straight_through_times_weight():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    layer, layer_m = masked(lin, mask_init="uniform")
    x = torch.randn(4, 3)
    upstream = torch.randn(4, 2)
    (layer(x) * upstream).sum().backward()
    # by hand: y = x @ (W*M)^T + b  =>  dL/dW_eff = upstream^T @ x; dL/dmask_real = that * W
    expected = (upstream.T @ x) * layer_m.weight.detach()
    assert torch.allclose(layer_m.mask_real.grad, expected, atol=1e-6)
    assert layer_m.weight.grad is None and layer.bias.grad is None


def test_conv_mask_gradient_matches_autograd_of_weight():
    conv = _conv(padding=1)
    layer, layer_m = masked(conv, mask_init="uniform")
    x = torch.randn(2, 4, 5, 5)
    layer(x).square().sum().backward()
    w_eff = (layer_m.weight.detach() * layer_m.mask()).requires_grad_(True)
    F.conv2d(x, w_eff, conv.bias.detach(), padding=1).square().sum().backward()
    assert torch.allclose(layer_m.mask_real.grad, w_eff.grad * layer_m.weight.detach(), atol=1e-5)


@pytest.mark.parametrize("rescale", ["average", "individual"])
def test_gradient_rescaling(rescale):
    torch.manual_seed(0)
    weight = torch.randn(3, 4)
    mask_real = torch.full((3, 4), 0.01, requires_grad=True)
    upstream = torch.randn(3, 4)
    (masked_weight(weight, mask_real, grad_rescale=rescale) * upstream).sum().backward()
    plain = upstream * weight
    expected = plain / weight.abs().mean() if rescale == "average" else plain / weight.abs()
    assert torch.allclose(mask_real.grad, expected, atol=1e-6)


def test_frozen_weights_unchanged_after_optimizer_steps():
    conv = _conv(padding=1)
    layer, layer_m = masked(conv, mask_init="uniform")
    before_w, before_b = layer_m.weight.clone(), layer.bias.clone()
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert trainable == [layer_m.mask_real]
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)  # even if handed every parameter
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(2, 4, 6, 6)).sum().backward()
        opt.step()
    assert torch.equal(layer_m.weight, before_w) and torch.equal(layer.bias, before_b)
    assert layer_m.weight.grad is None


def test_binarizer_and_ternarizer_values_and_ste():
    x = torch.tensor([-0.5, 0.0, 0.004, 0.005, 0.006, 1.0], requires_grad=True)
    assert binarizer(x).tolist() == [0, 0, 0, 0, 1, 1]
    assert ternarizer(x).tolist() == [-1, 0, 0, 0, 1, 1]
    g = torch.arange(6.0)
    (binarizer(x) * g).sum().backward()
    assert torch.equal(x.grad, g)
    x.grad = None
    (ternarizer(x) * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_ternary_layer_forward():
    lin = nn.Linear(4, 2)
    layer, layer_m = masked(lin, threshold_fn="ternarizer", mask_init="uniform")
    m = layer_m.mask()
    assert set(m.unique().tolist()) <= {-1.0, 0.0, 1.0}
    x = torch.randn(3, 4)
    assert torch.allclose(layer(x), F.linear(x, layer_m.weight * m, lin.bias))


def test_mask_init_variants():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3)
    ones, ones_m = masked(conv, mask_init="1s", mask_scale=1e-2)
    assert torch.all(ones_m.mask_real == 1e-2) and torch.all(ones_m.mask() == 1)
    uni, uni_m = masked(nn.Conv2d(64, 64, 3), mask_init="uniform", mask_scale=1e-2)
    assert uni_m.mask_real.abs().max() <= 1e-2
    # U(-s, s) with tau = s/2: about a quarter above tau; with tau=0 about half zeros
    half, half_m = masked(nn.Conv2d(64, 64, 3), mask_init="uniform", threshold=0.0)
    assert abs(1 - half_m.mask().mean().item() - 0.5) < 0.01
    assert abs(uni_m.mask().mean().item() - 0.25) < 0.01
    wb, wb_m = masked(nn.Conv2d(64, 64, 3), mask_init="weight_based_1s")
    expected = torch.full_like(wb_m.mask_real, wb_m.weight.abs().mean())
    assert torch.allclose(wb_m.mask_real, expected)
    with pytest.raises(ValueError, match="mask_init"):
        masked(nn.Conv2d(1, 1, 1), mask_init="zeros")
    with pytest.raises(ValueError, match="threshold_fn"):
        masked(nn.Conv2d(1, 1, 1), threshold_fn="sigmoid")


def test_set_mask_round_trip_and_shape_check():
    layer, layer_m = masked(nn.Linear(4, 3))
    m = (torch.rand(3, 4) > 0.5).float()
    layer_m.set_mask(m)
    assert torch.equal(layer_m.mask(), m)
    with pytest.raises(ValueError, match="does not fit"):
        layer_m.set_mask(torch.ones(4, 3))


def test_dtype_and_double_precision_exactness():
    conv = nn.Conv2d(3, 4, 3).double()
    ref = nn.Conv2d(3, 4, 3).double()
    ref.load_state_dict(conv.state_dict())
    layer, layer_m = masked(conv)
    assert layer_m.mask_real.dtype == torch.float64
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(layer(x), ref(x))
