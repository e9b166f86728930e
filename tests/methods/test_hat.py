"""HAT on the demo backbone and the architecture matrix's layer kinds: gates, the gradient
rules against hand computations, binary stored gates, storage, no forgetting."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from torchvision.models.convnext import CNBlockConfig

from piggyback.data.digits import DigitsDataModule
from piggyback.formats import load_artifact
from piggyback.methods import HAT, build_method, method_class
from piggyback.methods.ownership import FREE
from piggyback.models.module import PiggybackModule
from piggyback.models.multitask import load_bundle, save_bundle
from piggyback.models.testing import demo_module, logits_on_test_split, quick_trainer
from piggyback.nn import MaskingError
from piggyback.nn.unit_gates import hard_gate, unit_view

REPO = Path(__file__).resolve().parents[2]
SPEC = {"_target_": "piggyback.methods.HAT", "name": "hat", "bn": "train"}


def _fit(module, data, root, epochs=2):
    quick_trainer(root, epochs, limit_train_batches=5, limit_val_batches=1).fit(module, data)


def test_options_registry_and_config():
    assert method_class("hat") is HAT
    method = build_method({**SPEC, "s_max": 100, "c": 0.5})
    assert isinstance(method, HAT) and (method.s_max, method.c) == (100, 0.5)
    assert not method.superposable and not method.may_forget
    with pytest.raises(ValueError, match="s_max"):
        HAT(s_max=0.5)
    with pytest.raises(ValueError, match="embedding_init"):
        HAT(embedding_init="zeros")


def test_uniform_embedding_init_starts_with_every_gate_open(demo_cache):
    module = demo_module(demo_cache, {**SPEC, "embedding_init": "uniform"})
    for gate in module.method.gates.values():
        e = gate.embedding.detach()
        assert ((e >= 0) & (e <= 2)).all() and bool(hard_gate(e).all())


def _host(module, batches=10):
    """The module with a stand-in trainer (batches per epoch) for the method's hooks."""
    return SimpleNamespace(**{k: getattr(module, k) for k in ("backbone", "task", "tasks")},
                           trainer=SimpleNamespace(num_training_batches=batches),
                           parameters=module.parameters)  # fmt: skip


def test_the_slope_anneals_per_epoch_or_once_per_task(demo_cache):
    """``anneal=epoch`` (the reference): ``s`` restarts at 1/s_max every epoch;
    ``anneal=task``: one ramp over all of the task's steps (3 epochs of 10 batches here)."""
    per_task = demo_module(demo_cache, {**SPEC, "anneal": "task"})
    host = _host(per_task)
    host.trainer.max_epochs, host.trainer.current_epoch = 3, 1
    per_task.method.on_train_batch_start(host, 0)
    assert per_task.method.slope == pytest.approx((400 - 1 / 400) * 10 / 30 + 1 / 400)
    per_epoch = demo_module(demo_cache, SPEC)
    per_epoch.method.on_train_batch_start(host, 0)
    assert per_epoch.method.slope == pytest.approx(1 / 400)
    with pytest.raises(ValueError, match="anneal"):
        HAT(anneal="batch")


def test_gradient_rules_against_a_hand_computation(demo_cache):
    """Weight gradients times ``1 - a_out``, the embedding gradient compensated as the
    reference does, the slope annealed per batch, the regulariser as written in the paper."""
    module = demo_module(demo_cache, {**SPEC, "clipgrad": 0})
    method: HAT = module.method
    host = _host(module)
    method.on_train_batch_start(host, 0)
    assert method.slope == pytest.approx(1 / 400)
    method.on_train_batch_start(host, 5)
    s = (400 - 1 / 400) * 0.5 + 1 / 400
    assert method.slope == pytest.approx(s)
    used = {n: (torch.arange(u.numel()) % 3 == 0).float() for n, u in method.used.items()}
    method.used = used
    module.train()
    x, y = torch.randn(6, 1, 32, 32), torch.randint(0, 10, (6,))
    loss = nn.functional.cross_entropy(module(x), y)
    reg = method.regularizer(module)
    gates = {n: torch.sigmoid(s * g.embedding.detach()) for n, g in method.gates.items()}
    free = {n: 1 - u for n, u in used.items()}
    hand = (
        0.75 * sum((gates[n] * free[n]).sum() for n in gates) / sum(f.sum() for f in free.values())
    )
    assert reg.item() == pytest.approx(hand.item(), rel=1e-6)
    (loss + reg).backward()
    raw = {n: p.grad.clone() for n, p in module.backbone.named_parameters() if p.grad is not None}
    embeddings = {n: g.embedding.detach().clone() for n, g in method.gates.items()}
    method.on_after_backward(module)
    for layer, info in method.gate_info.items():
        for pname in info["params"]:
            factor = (1 - used[layer]).reshape(-1, 1, 1, 1)  # conv rows, by hand
            param = dict(module.backbone.named_parameters())[pname]
            assert torch.equal(param.grad, raw[pname] * factor), pname
        e = embeddings[layer]
        gate = method.gates[layer]
        key = next(k for k, p in module.backbone.named_parameters() if p is gate.embedding)
        compensation = 400 / s * (torch.cosh(torch.clamp(s * e, -50, 50)) + 1) / (torch.cosh(e) + 1)
        torch.testing.assert_close(gate.embedding.grad, raw[key] * compensation)


@pytest.fixture(scope="module")
def hat_pair(tmp_path_factory, demo_cache):
    """HAT on two digit tasks, with task A's logits, parameters and owners right after A."""
    tmp = tmp_path_factory.mktemp("hat")
    torch.manual_seed(0)
    data_a, data_b = DigitsDataModule("rotated", batch_size=64), DigitsDataModule("mod3")
    module = demo_module(demo_cache, SPEC)
    _fit(module, data_a, tmp)
    logits_a = logits_on_test_split(module, data_a)
    params_a = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    artifact_a = module.export_task()
    module.commit_task()
    owners_a = {n: o.clone() for n, o in module.method.owners.items()}
    module.add_task("digits_mod3", 3)
    _fit(module, data_b, tmp)
    return module, data_a, data_b, logits_a, params_a, owners_a, artifact_a


def test_units_earlier_tasks_open_keep_their_weights(hat_pair):
    module, _, _, _, params_a, owners_a, _ = hat_pair
    method: HAT = module.method
    moved = 0
    for layer, info in method.gate_info.items():
        opened = owners_a[layer] == 1
        assert 0 < int(opened.sum()) < opened.numel()
        for pname in info["params"]:
            now = dict(module.backbone.named_parameters())[pname].detach()
            assert torch.equal(now[opened], params_a[pname][opened]), pname
            moved += int((now[~opened] != params_a[pname][~opened]).sum())
        assert torch.equal(method.owners[layer][opened], owners_a[layer][opened])
        assert ((method.owners[layer] == 2) <= (owners_a[layer] == FREE)).all()
    assert moved > 0  # task 2 trained the free units


def test_earlier_task_logits_are_bit_identical(hat_pair):
    module, data_a, data_b, logits_a, *_ = hat_pair
    logits_b = logits_on_test_split(module, data_b)
    module.set_task("digits_rotated")
    assert torch.equal(logits_on_test_split(module, data_a), logits_a)
    module.set_task("digits_mod3")
    assert torch.equal(logits_on_test_split(module, data_b), logits_b)


def test_artifacts_rebuild_the_sequence_and_the_bundle(
    hat_pair, sequence_model, assert_bit_exact, tmp_path
):
    module, data_a, data_b, logits_a, _, _, artifact_a = hat_pair
    model, artifact_b = sequence_model(module, artifact_a)
    assert set(artifact_b.extra_meta["gates"]) == set(module.method.gate_info)
    bundle = load_bundle(save_bundle(model, tmp_path / "hat.safetensors"))
    x, _ = assert_bit_exact(module, (model, bundle), data_a, data_b, logits_a)
    for m in (model, bundle):
        assert m.infer_task(x, "entropy") in ("digits_rotated", "digits_mod3")


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, train_keeping_epochs):
    """Resumed after epoch 1 of 2: the same weights, embeddings, BN and owners follow."""

    args = ("data=digits/rotated", "method=hat", "trainer.max_epochs=2")
    args += ("+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1")
    args += ("+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false")
    args += ("logger=none", "callbacks=none")

    def run(out: str, *extra: str) -> Path:
        return train_keeping_epochs(out, *args, *extra) / "e1.ckpt"

    full = run("full")
    resumed = run(
        "resumed", f"resume={tmp_path / 'full' / 'epochs' / 'digits_rotated' / 'e0.ckpt'}"
    )
    a, b = (torch.load(p, weights_only=False) for p in (full, resumed))
    assert any(k.endswith("hat_embedding") for k in a["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["piggyback"]["method_state"], b["piggyback"]["method_state"]
    assert all(torch.equal(sa["owners"][n], sb["owners"][n]) for n in sa["owners"])
    arts = [
        load_artifact(tmp_path / o / "artifacts" / "digits_rotated.safetensors")
        for o in ("full", "resumed")
    ]
    assert all(torch.equal(arts[0].extra[k], arts[1].extra[k]) for k in arts[0].extra)


def _bn_resnet() -> nn.Module:
    """Conv -> BN pairs (gated after the BN), a grouped and a depthwise conv, a residual sum."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise, bias, no BN
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = x + torch.relu(self.bn2(self.conv2(x)))
            return self.fc(self.conv3(x).mean((2, 3)))

    return Net()


MHA = "encoder.layers.encoder_layer_0.self_attention"
ARCHS = {  # name -> (builder, classifier, what the gates must sit on)
    "bn_resnet": (_bn_resnet, "fc", {"conv1": "bn1", "conv2": "bn2", "conv3": "conv3"}),
    "tv_vit_small": (  # nn.MultiheadAttention: gated at its output
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
        ),
        None,
        {MHA: MHA},
    ),
    "timm_vit": (  # a fused qkv linear: one unit per q, k or v feature
        lambda: TimmViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2),
        None,
        {"blocks.0.attn.qkv": "blocks.0.attn.qkv"},
    ),
    "convnext": (  # depthwise 7x7 convs followed by LayerNorm (not gated, frozen)
        lambda: torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]),
        None,
        {},
    ),
}


def _module(builder, classifier, **spec) -> PiggybackModule:
    torch.manual_seed(0)
    backbone = {"model": builder(), "classifier": classifier}
    module = PiggybackModule(backbone=backbone, task="a", num_classes=3, method={**SPEC, **spec})
    module._trainer = SimpleNamespace(
        num_training_batches=2, max_epochs=1, current_epoch=0
    )  # what the hooks read of it
    return module


def _step(module, x, y, batch_idx=1):
    module.train()
    optimizer = torch.optim.SGD([p for g in module.param_groups() for p in g["params"]], lr=0.5)
    module.method.on_train_batch_start(module, batch_idx)
    loss = nn.functional.cross_entropy(module(x), y) + module.method.regularizer(module)
    optimizer.zero_grad()
    loss.backward()
    module.method.on_after_backward(module)
    optimizer.step()
    module.method.on_train_batch_end(module)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architectures_gate_units_and_forget_nothing(arch):
    builder, classifier, placed = ARCHS[arch]
    module = _module(builder, classifier)
    method: HAT = module.method
    for layer, at in placed.items():
        assert method.gate_info[layer]["at"] == at
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    _step(module, x, y)
    module.eval()
    with torch.no_grad():
        logits_a = module(x)
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    module.add_task("b", 3)
    for batch_idx in (0, 1):
        _step(module, x, y, batch_idx)
    module.set_task("a")
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(x), logits_a)
    changed = 0
    for layer, info in method.gate_info.items():
        opened = method.owners[layer] == 1
        for pname, rule in info["params"].items():
            now = dict(module.backbone.named_parameters())[pname].detach()
            keep = unit_view(opened, rule, tuple(now.shape)).expand(now.shape)
            assert torch.equal(now[keep], before[pname][keep]), pname
            changed += int((now != before[pname]).sum())
    assert changed > 0


def test_layers_that_cannot_be_gated_are_refused_with_their_names():
    def transposed():
        return nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))

    with pytest.raises(MaskingError, match=r"'0'.*grouped transposed"):
        _module(transposed, "2")
    swin = lambda: torchvision.models.SwinTransformer(  # noqa: E731
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4]
    )
    module = _module(swin, None)
    with pytest.raises(MaskingError, match=r"features\.1\.0\.attn\.qkv.*never ran"):
        module(torch.randn(1, 3, 32, 32))
    excluded = PiggybackModule(  # excluding the functional attention works
        backbone={"model": swin()},
        task="a",
        num_classes=3,
        method=SPEC,
        mask={"exclude": ["*.attn.qkv", "*.attn.proj"]},
    )
    excluded(torch.randn(1, 3, 32, 32))


def test_from_a_randomly_initialised_resnet18_on_split_cifar10(make_cfg):
    """The papers' setting is one override: ``backbone.weights=null`` (no real data here)."""
    cfg = make_cfg("method=hat", "data=cifar10_split", "backbone=resnet18", "backbone.weights=null")
    assert cfg.backbone.weights is None and cfg.method.bn == "train"
    backbone = {k: v for k, v in cfg.backbone.items() if k != "cache_dir"}
    torch.manual_seed(0)
    module = PiggybackModule(backbone=backbone, task="t1", num_classes=2, method=cfg.method)
    module._trainer = SimpleNamespace(num_training_batches=2, max_epochs=1, current_epoch=0)
    # every conv of a ResNet is followed by its BatchNorm: all gated after it
    assert all(info["at"] != layer for layer, info in module.method.gate_info.items())
    _step(module, torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))


def test_hat_runs_the_demo_sequence_from_the_cli(demo_sequence_cli):
    """``python train.py method=hat``: the demo's three tasks, BWT exactly 0."""
    demo_sequence_cli("hat")
