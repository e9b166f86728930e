"""WSN on the demo backbone: exact top-c masks, frozen earlier weights, storage, no forgetting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig

from piggyback.data.digits import DigitsDataModule
from piggyback.formats import load_artifact
from piggyback.masks.taskmap import decode_plane, encode_plane, plane_bits, task_map
from piggyback.methods import WSN, build_method, method_class
from piggyback.methods.ownership import FREE
from piggyback.methods.wsn import keep_count, score_of, top_fraction
from piggyback.models.module import PiggybackModule
from piggyback.models.multitask import load_bundle, save_bundle
from piggyback.models.testing import demo_module, logits_on_test_split, quick_trainer
from piggyback.nn import masked_weights, materialize

REPO = Path(__file__).resolve().parents[2]
LR = {"backbone": 1e-2, "scores": 1e-2, "head": 1e-2, "bn": 1e-2}  # moves in a few steps


def _fit(module, data, root, epochs=2):
    quick_trainer(root, epochs, limit_train_batches=5, limit_val_batches=1).fit(module, data)


def test_options_registry_and_config():
    assert method_class("wsn") is WSN
    method = build_method({"_target_": "piggyback.methods.WSN", "name": "wsn", "capacity": 0.1})
    assert isinstance(method, WSN) and method.capacity == 0.1 and method.superposable
    with pytest.raises(ValueError, match=r"0.1, not 10"):
        WSN(capacity=10)


def test_magnitude_scores_start_from_the_largest_pretrained_weights(demo_cache):
    """``score_init=magnitude``: the first task's mask is the top ``capacity`` of each layer
    by ``|W|`` (the pretrained network's largest weights), not a random subset."""
    spec = {"_target_": "piggyback.methods.WSN", "name": "wsn", "score_init": "magnitude"}
    module = demo_module(demo_cache, spec)
    for name, layer in masked_weights(module.backbone):
        expected = top_fraction(layer.weight.detach().abs(), 0.5)
        assert torch.equal(layer.mask_real.detach(), expected), name
        kept = layer.weight.detach().abs()[expected.bool()]
        dropped = layer.weight.detach().abs()[~expected.bool()]
        assert kept.min() >= dropped.max(), name
    kaiming = demo_module(demo_cache, {**spec, "score_init": "kaiming"})
    pairs = zip(masked_weights(module.backbone), masked_weights(kaiming.backbone), strict=True)
    assert any(not torch.equal(a.mask_real, b.mask_real) for (_, a), (_, b) in pairs)
    with pytest.raises(ValueError, match="score_init"):
        WSN(score_init="zeros")


def test_top_fraction_keeps_exactly_c_even_with_ties():
    for shape, c in (((7, 3, 3, 3), 0.5), ((10, 10), 0.03), ((5,), 1.0), ((4, 4), 0.01)):
        scores = torch.randn(shape)
        keep = top_fraction(scores, c)
        assert int(keep.sum()) == keep_count(scores.numel(), c) == max(1, round(c * scores.numel()))
        dropped = scores.abs()[~keep.bool()]
        if dropped.numel():  # the kept ones have the largest |score|
            assert scores.abs()[keep.bool()].min() >= dropped.max()
    tied = torch.ones(10, 10)  # every score equal: still exactly round(c n)
    assert int(top_fraction(tied, 0.37).sum()) == 37


def test_task_map_planes_round_trip_and_cost_well_under_a_bit_when_tasks_reuse():
    torch.manual_seed(0)
    masks = [torch.rand(3000) < 0.5]
    for _ in range(3):  # later tasks mostly reuse the previous task's weights
        used = torch.stack(masks).any(0)
        keep = torch.where(masks[-1], torch.rand(3000) < 0.9, torch.rand(3000) < 0.05)
        masks.append(torch.where(used, keep, torch.rand(3000) < 0.02))
    used = torch.zeros(3000, dtype=torch.bool)
    previous, total = None, 0
    for mask in masks:
        streams = encode_plane(mask, used, previous)
        assert len(streams) == 3
        assert torch.equal(decode_plane(streams, used, previous), mask)
        total += plane_bits(streams)
        used, previous = used | mask, mask
    assert total / 3000 < 0.7 * len(masks)  # the contexts pay: well under 1 bit per task
    with pytest.raises(ValueError, match="within the earlier tasks"):
        encode_plane(masks[1], torch.zeros(3000, dtype=torch.bool), masks[0])
    assert torch.equal((task_map(masks) >> 2) & 1, masks[2].long())


def test_score_gets_the_straight_through_gradient_and_only_free_weights_learn(demo_cache):
    module = demo_module(demo_cache, {"_target_": "piggyback.methods.WSN", "name": "wsn"})
    method: WSN = module.method
    name, layer = next(iter(masked_weights(module.backbone)))
    method.owners[name].view(-1)[::2] = 1  # pretend an earlier task owns every other weight
    method.order.insert(0, "earlier")
    method.on_train_batch_start(module, 0)
    mask = layer.mask_real.detach().clone()
    x = torch.randn(4, 1, 32, 32)
    module.train()
    plain = materialize(module.backbone)  # the same network with W * M as plain weights
    plain.requires_grad_(True)
    module.head(plain(x)).logsumexp(1).sum().backward()
    g = plain.features[0].weight.grad  # dL/dW_eff by hand
    module.head(module.backbone(x)).logsumexp(1).sum().backward()
    method.on_after_backward(module)
    score = score_of(layer).detach()
    assert torch.equal(score_of(layer).grad, g * layer.weight.detach() * score.sign())
    assert layer.mask_real.grad is None
    free = (method.owners[name] >= 2).float()  # task index 2 = "digits_rotated"
    assert torch.equal(layer.weight.grad, g * mask * free)


@pytest.fixture(scope="module")
def wsn_pair(tmp_path_factory, demo_cache):
    """WSN on two digit tasks, with task A's logits, weights and owners right after A."""
    tmp = tmp_path_factory.mktemp("wsn")
    torch.manual_seed(0)
    data_a, data_b = DigitsDataModule("rotated", batch_size=64), DigitsDataModule("mod3")
    spec = {"_target_": "piggyback.methods.WSN", "name": "wsn", "capacity": 0.3, "bn": "train"}
    module = demo_module(demo_cache, spec, lr=LR)
    _fit(module, data_a, tmp)
    logits_a = logits_on_test_split(module, data_a)
    weights_a = {n: m.weight.detach().clone() for n, m in masked_weights(module.backbone)}
    artifact_a = module.export_task()
    module.commit_task()
    owners_a = {n: o.clone() for n, o in module.method.owners.items()}
    module.add_task("digits_mod3", 3)
    scores_b = {n: score_of(m).detach().clone() for n, m in masked_weights(module.backbone)}
    _fit(module, data_b, tmp)
    return module, data_a, data_b, logits_a, weights_a, owners_a, artifact_a, scores_b


def test_each_task_keeps_exactly_c_of_every_layer(wsn_pair):
    module, *_ = wsn_pair
    for task in ("digits_rotated", "digits_mod3"):
        module.set_task(task)
        for _, layer in masked_weights(module.backbone):
            kept = int(layer.mask_real.detach().sum())
            assert kept == keep_count(layer.weight.numel(), 0.3)


def test_weights_earlier_tasks_use_never_change(wsn_pair):
    module, _, _, _, weights_a, owners_a, _, scores_b = wsn_pair
    method: WSN = module.method
    moved = 0
    for name, layer in masked_weights(module.backbone):
        earlier = owners_a[name] == 1
        assert earlier.float().mean() == pytest.approx(0.3, abs=0.01)  # task 1 owns its mask
        assert torch.equal(layer.weight.detach()[earlier], weights_a[name][earlier]), name
        assert torch.equal(method.owners[name][earlier], owners_a[name][earlier])
        mine = method.owners[name] == 2
        assert (mine <= (owners_a[name] == FREE)).all()  # task 2 took only free weights
        moved += int((layer.weight.detach()[mine] != weights_a[name][mine]).sum())
        assert not torch.equal(score_of(layer).detach(), scores_b[name])  # scores learned
    assert moved > 0  # task 2 trained the free weights it keeps


def test_earlier_task_logits_are_bit_identical(wsn_pair):
    module, data_a, data_b, logits_a, *_ = wsn_pair
    logits_b = logits_on_test_split(module, data_b)
    module.set_task("digits_rotated")
    assert torch.equal(logits_on_test_split(module, data_a), logits_a)
    module.set_task("digits_mod3")
    assert torch.equal(logits_on_test_split(module, data_b), logits_b)


def test_artifacts_rebuild_the_sequence_bundle_and_oneshot(
    wsn_pair, sequence_model, assert_bit_exact, tmp_path
):
    module, data_a, data_b, logits_a, _, _, artifact_a, _ = wsn_pair
    model, artifact_b = sequence_model(module, artifact_a)
    meta = artifact_b.extra_meta
    assert meta["kept"] == pytest.approx(0.3, 1e-2)
    assert meta["map"]["uncoded_bits_per_weight"] == 2.0
    assert meta["map"]["bits_per_weight"] < 2.0  # the planes, coded given the earlier ones
    assert meta["map"]["bits_per_weight"] == pytest.approx(
        artifact_a.extra_meta["map"]["bits_per_weight"] + meta["map"]["this_task_bits_per_weight"]
    )
    bundle = load_bundle(save_bundle(model, tmp_path / "wsn.safetensors"))
    x, _ = assert_bit_exact(module, (model, bundle), data_a, data_b, logits_a)
    # a WSN task is a binary mask over the one shared network: SupSup's one-shot applies
    assert bundle.infer_task(x, "oneshot") in ("digits_rotated", "digits_mod3")


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, train_keeping_epochs):
    """Resumed after epoch 1 of 2: the same weights, scores, masks and owners follow."""

    args = ("data=digits/rotated", "method=wsn", "trainer.max_epochs=2")
    args += ("+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1")
    args += ("+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false")
    args += ("logger=none", "callbacks=none", "method.lr_scale=10")

    def run(out: str, *extra: str) -> Path:
        return train_keeping_epochs(out, *args, *extra) / "e1.ckpt"

    full = run("full")
    middle = tmp_path / "full" / "epochs" / "digits_rotated" / "e0.ckpt"
    resumed = run("resumed", f"resume={middle}")
    a, b = (torch.load(p, weights_only=False) for p in (full, resumed))
    assert any(k.endswith("wsn_score") for k in a["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["piggyback"]["method_state"], b["piggyback"]["method_state"]
    assert all(torch.equal(sa["owners"][n], sb["owners"][n]) for n in sa["owners"])
    arts = [
        load_artifact(tmp_path / o / "artifacts" / "digits_rotated.safetensors")
        for o in ("full", "resumed")
    ]
    assert all(torch.equal(arts[0].extra[k], arts[1].extra[k]) for k in arts[0].extra)


def _grouped_net() -> nn.Module:
    """Grouped and depthwise convs, BatchNorm, a linear layer."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 8),
        nn.Linear(8, 10),  # the classifier the module replaces
    )


ARCHS = {
    "grouped_depthwise": (_grouped_net, 8),
    "vit_small": (  # nn.MultiheadAttention (fused in_proj), LayerNorm, class token
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
        ),
        32,
    ),
    "convnext_small": (  # 7x7 depthwise convs, LayerNorm2d, layer scale
        lambda: torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]),
        32,
    ),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architectures_keep_c_and_freeze_earlier_weights(arch, tmp_path):
    """On the architecture matrix's layer kinds (grouped/depthwise convs, linears, fused
    attention, BatchNorm and LayerNorm): a step of a second task changes no weight the first
    task keeps and leaves its logits bit-identical."""
    builder, size = ARCHS[arch]
    torch.manual_seed(0)
    spec = {"_target_": "piggyback.methods.WSN", "name": "wsn", "capacity": 0.2, "bn": "train"}
    module = PiggybackModule(
        backbone={"model": builder(), "classifier": "7" if arch == "grouped_depthwise" else None},
        task="a",
        num_classes=3,
        method=spec,
        lr=LR,
    )
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])

    def step():
        module.train()
        optimizer = torch.optim.Adam([p for g in module.param_groups() for p in g["params"]])
        module.method.on_train_batch_start(module, 0)
        loss = nn.functional.cross_entropy(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        module.method.on_after_backward(module)
        optimizer.step()

    step()
    module.method.on_train_batch_start(module, 0)  # the mask task "a" keeps
    module.eval()
    with torch.no_grad():
        logits_a = module(x)
    module.add_task("b", 3)
    before = {n: m.weight.detach().clone() for n, m in masked_weights(module.backbone)}
    step()
    module.set_task("a")
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(x), logits_a)
    for name, layer in masked_weights(module.backbone):
        owned = module.method.owners[name] == 1
        assert int(owned.sum()) == keep_count(owned.numel(), 0.2), name
        assert torch.equal(layer.weight.detach()[owned], before[name][owned]), name


def test_wsn_runs_the_demo_sequence_from_the_cli(demo_sequence_cli):
    """``python train.py method=wsn``: the demo's three tasks, BWT exactly 0."""
    demo_sequence_cli("wsn")


def test_from_a_randomly_initialised_resnet18_on_split_cifar10(make_cfg):
    """The papers' setting is one override: ``backbone.weights=null`` (no real data here)."""
    cfg = make_cfg("method=wsn", "data=cifar10_split", "backbone=resnet18", "backbone.weights=null")
    assert cfg.backbone.weights is None and cfg.method.bn == "train"
    backbone = {k: v for k, v in cfg.backbone.items() if k != "cache_dir"}
    torch.manual_seed(0)
    module = PiggybackModule(backbone=backbone, task="t1", num_classes=2, method=cfg.method)
    module.method.on_train_batch_start(module, 0)
    module.train()
    x = torch.randn(2, 3, 64, 64)
    nn.functional.cross_entropy(module(x), torch.tensor([0, 1])).backward()
    module.method.on_after_backward(module)
    for _, layer in masked_weights(module.backbone):
        assert int(layer.mask_real.detach().sum()) == keep_count(layer.weight.numel(), 0.5)
        assert score_of(layer).grad is not None
