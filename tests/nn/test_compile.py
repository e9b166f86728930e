"""torch.compile of masked networks: what the compiler traces equals what eager runs.

Under ``torch.compile`` the masked layers trace :func:`traceable_masked_weight` (plain
tensor ops, fusable) instead of the autograd Function used in eager mode. First the two
formulations are compared bit for bit in eager mode, for every quantiser and gradient
rescaling; then compiled networks are compared with eager ones (outputs and mask gradients,
within float tolerance: Inductor reorders reductions). Compiling on CPU takes tens of
seconds per network, so the default suite compiles the small CNN once; the ternarizer, a
two-block timm ViT and a torchvision ResNet-18 are ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from piggyback.nets.small_cnn import small_cnn
from piggyback.nn import mask_model, mask_parameters, traceable_masked_weight
from piggyback.nn.threshold import _MaskedWeight


@pytest.mark.parametrize("threshold_fn", ["binarizer", "ternarizer"])
@pytest.mark.parametrize("grad_rescale", ["none", "average", "individual"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_traceable_form_equals_the_function_bit_for_bit(threshold_fn, grad_rescale, weight_grad):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, 3, 3, generator=g)
    weight[0, 0] = 0.0  # zero weights: rescaling by |W| must stay finite
    mask_real = 0.01 * torch.randn(8, 4, 3, 3, generator=g)
    mask_real[1, 1] = 5e-3  # exactly at the threshold: off
    grad_out = torch.randn(8, 4, 3, 3, generator=g)
    results = []
    for traced in (False, True):
        w = weight.clone().requires_grad_(weight_grad)
        m = mask_real.clone().requires_grad_(True)
        if traced:
            out = traceable_masked_weight(w, m, 5e-3, threshold_fn, grad_rescale)
        else:
            out = _MaskedWeight.apply(w, m, 5e-3, threshold_fn, grad_rescale, False)
        out.backward(grad_out)
        results.append((out.detach(), m.grad, w.grad))
    (out_a, mask_a, weight_a), (out_b, mask_b, weight_b) = results
    assert torch.equal(out_a, out_b)
    assert torch.equal(mask_a, mask_b)
    assert (weight_a is None) == (weight_b is None) == (not weight_grad)
    if weight_grad:
        assert torch.equal(weight_a, weight_b)
    assert (out_a == 0).any()  # some weights are masked off


def _tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10)


MODELS = {
    "small_cnn": (lambda: small_cnn(num_classes=10, in_channels=3, width=8), 28),
    "timm_vit_tiny_depth2": (_tiny_vit, 32),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
}


def _grads(model, x, y):
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in mask_parameters(model)]


@pytest.mark.parametrize(
    ("name", "threshold_fn"),
    [
        ("small_cnn", "binarizer"),
        pytest.param("small_cnn", "ternarizer", marks=pytest.mark.slow),
        pytest.param("timm_vit_tiny_depth2", "binarizer", marks=pytest.mark.slow),
        pytest.param("tv_resnet18", "binarizer", marks=pytest.mark.slow),
    ],
)
def test_compiled_outputs_and_mask_gradients_equal_eager(name, threshold_fn):
    build, size = MODELS[name]
    torch.manual_seed(0)
    eager = mask_model(build(), mask_init="uniform", mask_scale=0.01, threshold_fn=threshold_fn)
    eager.train()
    compiled = copy.deepcopy(eager)
    compiled.compile()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, size, size, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    out_e, grads_e = _grads(eager, x, y)
    out_c, grads_c = _grads(compiled, x, y)
    assert (torch.cat([m.flatten() for m in mask_parameters(eager)]) <= 5e-3).any()
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert len(grads_c) == len(grads_e) > 0
    for got, expected in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
