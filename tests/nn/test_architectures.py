"""Masks hold on every architecture people use: the guarantees, checked on a model matrix.

Random init, small inputs. For each model: ``1s`` masks change nothing (bit-identical);
random masks give exactly what an untouched copy computes with ``W * M`` written into its
weights by hand; zeroing any single masked weight's mask changes the output (no mask is
silently ignored, e.g. by a module that reads a weight directly); the mask gradient is the
straight-through formula ``dL/dW_eff * W``; ``materialize`` leaves a plain model.
"""

from __future__ import annotations

import copy
import functools
import weakref

import pytest
import timm
import torch
import torchvision
from timm.layers import StdConv2d
from timm.models.resnetv2 import ResNetV2
from torch import nn
from torchvision.models.convnext import CNBlockConfig

from piggyback.nn import (
    WeightMask,
    is_masked,
    mask_model,
    masked_weights,
    materialize,
    recompute_masked_weights,
)


def _vgg16_bn_slim_head() -> nn.Module:
    """VGG16-BN's own class and 13 conv layers, with 64-wide fully connected layers: the
    stock 4096-wide head (120M weights) is what makes vgg16_bn cost seconds per forward."""
    model = torchvision.models.vgg16_bn()
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
        nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10),
    )  # fmt: skip
    return model


def _vit_small() -> nn.Module:
    """torchvision's VisionTransformer (its encoder blocks, nn.MultiheadAttention, class
    token) at 2 layers of width 64: every code path of vit_b_16 for 1/1000 of the work."""
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128
    )


def _resnetv2_small() -> nn.Module:
    """timm's ResNetV2 as resnetv2_50x1_bit builds it (fixed stem, weight-standardized
    StdConv2d, pre-activation bottlenecks, GroupNorm) at 2 stages of 1 block."""
    return ResNetV2(
        layers=(1, 1),
        channels=(128, 256),
        stem_chs=32,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
    )


def _convnext_small() -> nn.Module:
    """torchvision's ConvNeXt (CNBlock: 7x7 depthwise, layer scale, LayerNorm2d), 2 stages."""
    return torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)])


def _swin_small() -> nn.Module:
    """torchvision's SwinTransformer (shifted windows, relative position bias), 2 stages."""
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4]
    )


# name -> (builder, input size). Each family runs in the default suite as a small member
# built by its own library class (same modules, same forward code); the real-size models
# run every test behind the `slow` marker (REAL_SIZE), except the paper's ResNet-50, whose
# single-forward properties stay in the default suite.
MODELS = {
    "tv_resnet50": (lambda: torchvision.models.resnet50(), 32),
    "tv_resnet18": (lambda: torchvision.models.resnet18(), 32),
    "tv_vgg16_bn": (lambda: torchvision.models.vgg16_bn(), 32),
    "tv_vgg16_bn_slim_head": (_vgg16_bn_slim_head, 32),
    "tv_densenet121": (lambda: torchvision.models.densenet121(), 32),
    "tv_densenet_small": (
        lambda: torchvision.models.DenseNet(
            growth_rate=8, block_config=(2, 2), num_init_features=16
        ),
        32,
    ),
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), 32),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), 32),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(), 32),
    "tv_convnext_small_config": (_convnext_small, 32),
    "tv_vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32), 32),
    "tv_vit_small": (_vit_small, 32),
    "tv_swin_t": (lambda: torchvision.models.swin_t(), 32),
    "tv_swin_small_config": (_swin_small, 32),
    "timm_tf_efficientnet_lite0": (lambda: timm.create_model("tf_efficientnet_lite0"), 32),
    "timm_resnetv2_50x1_bit": (lambda: timm.create_model("resnetv2_50x1_bit"), 32),
    "timm_resnetv2_small": (_resnetv2_small, 32),
    "timm_vit_tiny_patch16_224": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=32),
        32,
    ),
    "timm_beit": (
        lambda: timm.create_model(
            "beit_base_patch16_224", img_size=32, depth=2, embed_dim=96, num_heads=3
        ),
        32,
    ),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto"), 32),
}
# Real-size models: 3-17 s per test on 2 CPU cores (the per-weight test runs one forward per
# masked weight); their small family members above keep every code path in the default run.
REAL_SIZE = {
    "tv_vgg16_bn",
    "tv_densenet121",
    "tv_efficientnet_b0",
    "tv_convnext_tiny",
    "tv_vit_b_16",
    "tv_swin_t",
    "timm_resnetv2_50x1_bit",
}


def _params(slow: set[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in MODELS]


NAMES = _params(REAL_SIZE)
NAMES_PER_WEIGHT = _params(REAL_SIZE | {"tv_resnet50"})


@functools.lru_cache(maxsize=2)
def _original(name: str) -> nn.Module:
    """The untouched model, eval mode, with no parameter left at (near) zero.

    Random init leaves some tensors at zero or tiny on purpose (ViT heads, layer scales of
    1e-6): a mask on a zero weight cannot change anything, so give them visible values.
    """
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().max() < 1e-4:
                param.normal_(0, 0.05)
    return model


def _input(name: str) -> torch.Tensor:
    size = MODELS[name][1]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _masked_copy(name: str, **options) -> nn.Module:
    model = copy.deepcopy(_original(name))  # first, so that building it cannot move the seed
    torch.manual_seed(2)
    return mask_model(model, **options).eval()


def _by_hand(name: str, masked: nn.Module) -> nn.Module:
    """An untouched copy whose masked weights are set to ``W * M`` directly."""
    reference = copy.deepcopy(_original(name))
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for pname, mask in masked_weights(masked):
            params[pname].copy_(mask.weight * mask.mask())
    return reference


@pytest.mark.parametrize("name", NAMES)
def test_1s_masks_are_bit_identical(name):
    masked = _masked_copy(name)
    names = [n for n, _ in masked_weights(masked)]
    params = _original(name).named_parameters()
    expected = {n for n, p in params if p.dim() > 1 and n.endswith("weight")}
    assert set(names) == expected  # every conv/linear/attention weight (q/k/v too), no more
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(masked(x), _original(name)(x))


@pytest.mark.parametrize("name", NAMES)
def test_random_masks_equal_weights_multiplied_by_hand(name):
    masked = _masked_copy(name, mask_init="uniform")
    reference = _by_hand(name, masked)
    x = _input(name)
    with torch.no_grad():
        out, expected = masked(x), reference(x)
    assert not torch.equal(expected, _original(name)(x))  # the masks really zero weights
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES_PER_WEIGHT)
def test_every_masked_weight_acts(name):
    """Zeroing any one weight's mask changes the output: no mask is silently bypassed."""
    masked = _masked_copy(name)
    x = _input(name)
    with torch.no_grad():
        base = masked(x)
        ignored = []
        for pname, mask in masked_weights(masked):
            mask.mask_real.zero_()
            if torch.equal(masked(x), base):
                ignored.append(pname)
            mask.mask_real.fill_(1e-2)
    assert not ignored, f"masks with no effect: {ignored}"


@pytest.mark.parametrize("name", NAMES)
def test_mask_gradient_is_straight_through(name):
    masked = _masked_copy(name, mask_init="uniform")
    reference = _by_hand(name, masked)
    x = _input(name)
    masked(x).square().mean().backward()
    reference.requires_grad_(True)
    reference(x).square().mean().backward()
    ref_grads = dict(reference.named_parameters())
    for pname, mask in masked_weights(masked):
        expected = ref_grads[pname].grad * mask.weight
        torch.testing.assert_close(
            mask.mask_real.grad, expected, rtol=1e-3, atol=1e-6, msg=lambda m, p=pname: f"{p}: {m}"
        )
        assert mask.weight.grad is None


def _effective_weights_kept(monkeypatch, masked: nn.Module, x: torch.Tensor, recompute: bool):
    """Mask gradients of one backward, and how many ``W * M`` outlived the forward."""
    made = []
    original = WeightMask.effective_weight

    def recording(self, **kwargs):
        out = original(self, **kwargs)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(WeightMask, "effective_weight", recording)
    with recompute_masked_weights(recompute):
        loss = masked(x).square().mean()
    kept = sum(ref() is not None for ref in made)
    loss.backward()
    monkeypatch.setattr(WeightMask, "effective_weight", original)
    grads = {n: m.mask_real.grad.clone() for n, m in masked_weights(masked)}
    return grads, kept


@pytest.mark.parametrize("name", NAMES)
def test_recomputed_masked_weights_free_w_m_and_keep_gradients_bit_identical(name, monkeypatch):
    """``recompute_masked_weights``: no ``W * M`` is held from forward to backward (conv,
    linear and attention alike), and the mask gradients are bit for bit the saved ones."""
    x = _input(name)
    masked = _masked_copy(name, mask_init="uniform")
    saved, kept_saved = _effective_weights_kept(monkeypatch, masked, x, recompute=False)
    masked = _masked_copy(name, mask_init="uniform")
    rebuilt, kept_rebuilt = _effective_weights_kept(monkeypatch, masked, x, recompute=True)
    assert kept_saved > 0  # without it, autograd keeps W * M alive
    assert kept_rebuilt == 0
    assert saved.keys() == rebuilt.keys()
    for pname in saved:
        assert torch.equal(saved[pname], rebuilt[pname]), pname


@pytest.mark.parametrize("name", NAMES)
def test_materialize_leaves_a_plain_model(name):
    masked = _masked_copy(name, mask_init="uniform")
    plain = materialize(masked)
    assert not list(masked_weights(plain))
    assert not any(is_masked(m) for m in plain.modules())
    assert not any("mask_real" in n for n, _ in plain.named_parameters())
    assert list(plain.state_dict()) == list(_original(name).state_dict())
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), masked(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- granularity and soft masks
# The same guarantees for kernel / filter masks (one value per k x k kernel / output channel,
# broadcast onto W) and KSM's soft masks (binary unit x learned real scale), on models that
# cover k x k, depthwise, 1 x 1 and linear weights and nn.MultiheadAttention.
GRANULAR_NAMES = ["tv_mobilenet_v3_small", "timm_convnext_atto", "tv_vit_small"]
VARIANTS = [
    ("kernel", False),
    ("filter", False),
    ("element", True),
    ("kernel", True),
    ("filter", True),
]
VARIANT_IDS = [f"{g}{'-soft' if s else ''}" for g, s in VARIANTS]


def _unit_model(name: str, granularity: str, soft: bool, **options) -> nn.Module:
    masked = _masked_copy(name, granularity=granularity, soft=soft, **options)
    if soft and options.get("mask_init") == "uniform":
        with torch.no_grad():  # scales away from 1, so a wrong scale would show
            for _, mask in masked_weights(masked):
                mask.soft_scale.uniform_(0.5, 1.5)
    return masked


def _by_hand_units(name: str, masked: nn.Module) -> nn.Module:
    """An untouched copy with ``W * expand(M [* s])`` written into its weights."""
    reference = copy.deepcopy(_original(name))
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for pname, mask in masked_weights(masked):
            units = mask.mask() if mask.soft_scale is None else mask.mask() * mask.soft_scale
            params[pname].copy_(mask.weight * units.expand(mask.weight.shape))
    return reference


@pytest.mark.parametrize(("granularity", "soft"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("name", GRANULAR_NAMES)
def test_units_1s_masks_are_bit_identical(name, granularity, soft):
    masked = _unit_model(name, granularity, soft)
    for pname, mask in masked_weights(masked):
        weight = tuple(mask.weight.shape)
        if granularity == "filter":
            assert mask.unit_shape == (weight[0],) + (1,) * (len(weight) - 1), pname
        elif granularity == "kernel":
            assert mask.unit_shape == weight[:2] + (1,) * (len(weight) - 2), pname
        else:
            assert mask.unit_shape == weight, pname
        assert (mask.soft_scale is not None) == soft
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(masked(x), _original(name)(x))


@pytest.mark.parametrize(("granularity", "soft"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("name", GRANULAR_NAMES)
def test_units_random_masks_equal_weights_multiplied_by_hand(name, granularity, soft):
    masked = _unit_model(name, granularity, soft, mask_init="uniform")
    reference = _by_hand_units(name, masked)
    x = _input(name)
    with torch.no_grad():
        out, expected = masked(x), reference(x)
    assert not torch.equal(expected, _original(name)(x))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("granularity", "soft"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("name", GRANULAR_NAMES)
def test_units_mask_gradient_formula(name, granularity, soft):
    """Unit gradient = sum over the unit's weights of ``dL/dW_eff * W``; for soft masks times
    the scale and KSM's softmax-trick derivative ``b_T(1 - b_T) / T``, and the scale's
    gradient is that sum times the binary mask."""
    masked = _unit_model(name, granularity, soft, mask_init="uniform")
    reference = _by_hand_units(name, masked)
    x = _input(name)
    masked(x).square().mean().backward()
    reference.requires_grad_(True)
    reference(x).square().mean().backward()
    ref_grads = dict(reference.named_parameters())
    for pname, mask in masked_weights(masked):
        summed = (ref_grads[pname].grad * mask.weight).sum_to_size(mask.unit_shape)
        expected = summed
        if soft:
            relaxed = torch.sigmoid((mask.mask_real - mask.threshold) / mask.temperature)
            expected = summed * mask.soft_scale * relaxed * (1 - relaxed) / mask.temperature
            torch.testing.assert_close(
                mask.soft_scale.grad, summed * mask.mask(), rtol=1e-3, atol=1e-6
            )
        torch.testing.assert_close(
            mask.mask_real.grad, expected, rtol=1e-3, atol=1e-6, msg=lambda m, p=pname: f"{p}: {m}"
        )
        assert mask.weight.grad is None


@pytest.mark.parametrize(("granularity", "soft"), VARIANTS, ids=VARIANT_IDS)
def test_units_materialize_bakes_scales(granularity, soft):
    name = "tv_mobilenet_v3_small"
    masked = _unit_model(name, granularity, soft, mask_init="uniform")
    plain = materialize(masked)
    assert not any(is_masked(m) for m in plain.modules())
    assert list(plain.state_dict()) == list(_original(name).state_dict())
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), masked(x), rtol=1e-5, atol=1e-6)
