"""``method=ksm``: the paper's configuration in one YAML, on Piggyback's machinery."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from piggyback.methods import KSM, Piggyback, build_method, method_class
from piggyback.models.testing import demo_module
from piggyback.nn import masked_weights


def test_ksm_yaml_is_kernel_granular_soft_piggyback(make_cfg):
    cfg = make_cfg("method=ksm")
    method = build_method(OmegaConf.to_container(cfg.method, resolve=True))
    assert isinstance(method, KSM) and isinstance(method, Piggyback)
    assert method_class("ksm") is KSM
    assert method.mask == {"granularity": "kernel", "soft": True, "temperature": 1e-2}
    assert method.lr["scales"] == pytest.approx(1e-4)
    other = make_cfg("method=ksm", "method.mask.granularity=filter", "method.lr_scale=3")
    method = build_method(OmegaConf.to_container(other.method, resolve=True))
    assert method.mask["granularity"] == "filter" and method.lr["scales"] == pytest.approx(3e-4)


def test_ksm_module_masks_kernels_and_trains_scales(demo_cache):
    module = demo_module(demo_cache, method={"_target_": "piggyback.methods.KSM", "name": "ksm"})
    layers = dict(masked_weights(module.backbone))
    assert layers
    for mask in layers.values():
        shape = tuple(mask.weight.shape)
        assert mask.unit_shape == shape[:2] + (1,) * (len(shape) - 2)
        assert mask.soft_scale is not None and mask.soft_scale.requires_grad
        assert not mask.weight.requires_grad
    groups = {g["name"]: g for g in module.method.param_groups(module)}
    assert {"masks", "scales", "head"} <= set(groups)
    assert len(groups["scales"]["params"]) == len(layers)
    # the 1s start is exactly the pretrained network
    x = torch.rand(2, 1, 32, 32)
    plain = demo_module(demo_cache, method="classifier_only")
    with torch.no_grad():
        assert torch.equal(module.backbone(x), plain.backbone(x))
