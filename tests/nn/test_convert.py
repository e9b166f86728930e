import copy

import pytest
import torch
import torchvision
from torch import nn

from piggyback.backbones import remove_classifier
from piggyback.nn import (
    MaskingError,
    get_masks,
    mask_model,
    masked_weights,
    materialize,
    num_masked_weights,
    set_masks,
)


def _count(model):
    modules = dict(model.named_modules())
    hosts = [modules[name.rpartition(".")[0]] for name, _ in masked_weights(model)]
    convs = sum(isinstance(m, nn.Conv2d) for m in hosts)
    fcs = sum(isinstance(m, nn.Linear) for m in hosts)
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
    model, _ = remove_classifier(model)
    mask_model(model)
    assert _count(model) == (convs, fcs)
    modules = dict(model.named_modules())
    for name, _ in masked_weights(model):
        host = modules[name.rpartition(".")[0]]
        trainable = [n for n, p in host.named_parameters() if p.requires_grad]
        assert trainable == ["piggyback.weight.mask_real"]


def test_resnet50_masked_weight_count():
    model, width = remove_classifier(torchvision.models.resnet50(weights=None))
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
    assert len(list(masked_weights(masked))) > 0
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
    names = [n for n, _ in masked_weights(model)]
    assert "fc" not in names and "conv1" not in names
    assert not any(n.startswith("layer4") for n in names)
    assert "layer1.0.conv1.weight" in names
    assert type(model.fc) is nn.Linear


def test_mask_model_is_idempotent():
    model = mask_model(torchvision.models.resnet18(weights=None))
    mask = model.layer1[0].conv1.piggyback["weight"]
    mask_model(model)
    assert model.layer1[0].conv1.piggyback["weight"] is mask


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
    assert not list(masked_weights(plain))
    assert all(not n.endswith("mask_real") for n, _ in plain.named_parameters())
    assert type(plain.layer1[0].conv1) is nn.Conv2d and type(plain.fc) is nn.Linear
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)
    assert list(masked_weights(model))  # original untouched


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
    masks.pop("1.weight")
    with pytest.raises(ValueError, match="missing"):
        set_masks(model, masks)


def test_target_patterns_select_modules_and_parameters():
    model = torchvision.models.resnet18(weights=None)
    mask_model(model, target=["layer4.*", "conv1"], exclude=["layer4.1.*"])
    names = [n for n, _ in masked_weights(model)]
    assert "conv1.weight" in names and "layer4.0.conv1.weight" in names
    assert not any(n.startswith(("layer1", "layer4.1")) for n in names)
    with pytest.raises(MaskingError, match="match no parameter"):
        mask_model(torchvision.models.resnet18(weights=None), target=["layer9.*"])


def test_refuses_what_a_mask_cannot_act_on():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

    with pytest.raises(MaskingError, match=r"'a.weight'.*also used as \['b.weight'\]"):
        mask_model(Tied())
    with pytest.raises(
        MaskingError, match=r"'0.weight' \(torch.nn.modules.normalization.LayerNorm\)"
    ):
        mask_model(nn.Sequential(nn.LayerNorm(3)), target=["0.weight"])
    # embeddings read their table through the attribute: maskable, but only on request
    assert not list(masked_weights(mask_model(nn.Sequential(nn.Embedding(5, 3)))))
    table = mask_model(nn.Sequential(nn.Embedding(5, 3)), target=["0.weight"])
    assert [name for name, _ in masked_weights(table)] == ["0.weight"]
    norm = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)))
    with pytest.raises(MaskingError, match="'0.weight'.*already reparametrized"):
        mask_model(norm)
    with pytest.raises(MaskingError, match="lazy"):
        mask_model(nn.Sequential(nn.LazyLinear(3)))


def test_masked_model_pickles_and_deep_copies():
    import pickle

    torch.manual_seed(0)
    model = mask_model(torchvision.models.resnet18(weights=None), mask_init="uniform").eval()
    x = torch.randn(1, 3, 32, 32)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone.layer1[0].conv1) is type(model.layer1[0].conv1)
        clone.layer1[0].conv1.piggyback["weight"].mask_real.data.fill_(1.0)
        with torch.no_grad():
            assert not torch.equal(clone(x), model(x))  # its own masks, not the original's
