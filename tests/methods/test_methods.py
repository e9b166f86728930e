"""Each method class on the demo backbone: what trains, what a task keeps, no-forgetting."""

from __future__ import annotations

import pytest
import torch

from piggyback.data.digits import DigitsDataModule
from piggyback.methods import (
    REGISTRY,
    ClassifierOnly,
    Finetune,
    FinetuneSequential,
    PackNet,
    Piggyback,
    build_method,
    method_class,
)
from piggyback.methods.packnet import FREE, owner_bits, pack_codes, unpack_codes
from piggyback.models.module import PiggybackModule
from piggyback.models.testing import demo_module, logits_on_test_split, quick_trainer
from piggyback.nn import masked_weights


def _trainer(root, epochs=2):
    return quick_trainer(root, epochs, limit_train_batches=5, limit_val_batches=1)


def test_registry_and_specs():
    assert {"piggyback", "finetune", "finetune_sequential", "classifier_only", "packnet"} <= set(
        REGISTRY
    )
    assert method_class("packnet") is PackNet
    assert isinstance(build_method("piggyback"), Piggyback)
    spec = {"_target_": "piggyback.methods.PackNet", "name": "packnet", "prune": 0.25}
    method = build_method(spec)
    assert isinstance(method, PackNet) and method.prune == 0.25
    with pytest.raises(ValueError, match="unknown method"):
        method_class("nope")
    with pytest.raises(ValueError, match="does not match"):
        build_method({"_target_": "piggyback.methods.PackNet", "name": "piggyback"})
    with pytest.raises(ValueError, match="prune"):
        PackNet(prune=1.5)


@pytest.mark.parametrize(
    ("method", "groups", "trainable"),
    [
        ("piggyback", ["masks", "head"], {"mask_real"}),
        (Piggyback(bn="train"), ["masks", "bn", "head"], {"mask_real", "bn"}),
        ("classifier_only", ["head"], set()),
        ("finetune", ["backbone", "head"], {"weight", "bn"}),
        ("finetune_sequential", ["backbone", "head"], {"weight", "bn"}),
        ("packnet", ["backbone", "bn", "head"], {"weight", "bn"}),
        ("cpg", ["backbone", "bn", "masks", "head"], {"weight", "mask_real", "bn"}),
    ],
)
def test_parameter_groups_and_what_trains(demo_cache, method, groups, trainable):
    module = demo_module(demo_cache, method)
    assert [g["name"] for g in module.param_groups()] == groups
    kinds = set()
    for name, param in module.backbone.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("mask_real"):
            kinds.add("mask_real")
        elif (
            ".bn" in name
            or "norm" in name
            or isinstance(
                module.backbone.get_submodule(name.rpartition(".")[0]), torch.nn.BatchNorm2d
            )
        ):
            kinds.add("bn")
        else:
            kinds.add(name.rpartition(".")[2])
    assert kinds == trainable


def test_separate_network_methods_refuse_a_second_task(demo_cache):
    assert Finetune.separate_networks and not FinetuneSequential.separate_networks
    module = demo_module(demo_cache, "finetune")
    with pytest.raises(ValueError, match="separate network"):
        module.add_task("other", 3)
    demo_module(demo_cache, "finetune_sequential").add_task("other", 3)  # one shared network


def test_classifier_only_keeps_the_pretrained_network(demo_cache):
    assert ClassifierOnly().backbone_frozen and not ClassifierOnly(bn="train").trains_bn


def test_owner_codes_pack_round_trip():
    for tasks in (1, 2, 3, 6, 14, 200):
        bits = owner_bits(tasks)
        assert 2**bits >= tasks + 2 and bits in (1, 2, 4, 8)
        codes = torch.randint(0, tasks + 2, (3, 5, 7), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.numel() == -(-codes.numel() * bits // 8)
        assert torch.equal(unpack_codes(packed, codes.numel(), bits).reshape(codes.shape), codes)


@pytest.fixture(scope="module")
def packnet_pair(tmp_path_factory, demo_cache):
    """PackNet trained on two digit tasks, with task A's logits taken right after A."""
    tmp = tmp_path_factory.mktemp("packnet")
    torch.manual_seed(0)
    data_a, data_b = DigitsDataModule("rotated", batch_size=64), DigitsDataModule("mod3")
    module = demo_module(demo_cache, "packnet", lr={"backbone": 1e-2, "head": 1e-2})
    _trainer(tmp).fit(module, data_a)
    logits_a = logits_on_test_split(module, data_a)
    weights_a = {n: m.weight.detach().clone() for n, m in masked_weights(module.backbone)}
    owners_a = {n: o.clone() for n, o in module.method.owners.items()}
    artifact_a = module.export_task()
    module.add_task("digits_mod3", 3)
    _trainer(tmp).fit(module, data_b)
    return module, data_a, data_b, logits_a, weights_a, owners_a, artifact_a


def test_packnet_ownership_pruning_and_freezing(packnet_pair):
    module, _, _, _, weights_a, owners_a, _ = packnet_pair
    method: PackNet = module.method
    total = sum(o.numel() for o in owners_a.values())
    # task 1 owns every pretrained weight and, with prune 0.75, keeps a quarter of each layer
    share = {k: sum(int((o == k).sum()) for o in owners_a.values()) / total for k in (0, 1, FREE)}
    assert share[0] == 0
    assert share[1] == pytest.approx(0.25, abs=0.01)
    assert share[FREE] == pytest.approx(0.75, abs=0.01)
    for name, mask in masked_weights(module.backbone):
        earlier = owners_a[name] <= 1
        # what tasks 0 and 1 own never moved while task 2 trained
        assert torch.equal(mask.weight.detach()[earlier], weights_a[name][earlier]), name
        # task 2 took exactly the weights task 1 left free
        assert torch.equal(
            method.owners[name] == 2, (owners_a[name] == FREE) & (method.owners[name] != FREE)
        )
        assert (weights_a[name][owners_a[name] == FREE] == 0).all()  # pruned = zeroed


def test_packnet_task_1_fine_tunes_every_pretrained_weight(demo_cache, tmp_path):
    """Task 1 starts from the pretrained values (not zero) and every weight learns."""
    module = demo_module(demo_cache, "packnet", lr={"backbone": 1e-2, "head": 1e-2})
    pretrained = {n: m.weight.detach().clone() for n, m in masked_weights(module.backbone)}
    assert all((o == 1).all() for o in module.method.owners.values())
    assert module.method.trains_bn and module.method.retrain_epochs_of(30) == 10
    module.method.prune = 0.0  # nothing zeroed: the fine-tuning alone
    _trainer(tmp_path).fit(module, DigitsDataModule("rotated", batch_size=64))
    moved = total = 0
    for name, mask in masked_weights(module.backbone):
        moved += int((mask.weight.detach() != pretrained[name]).sum())
        total += pretrained[name].numel()
    assert moved / total > 0.99


def test_packnet_earlier_task_logits_are_bit_identical(packnet_pair):
    module, data_a, data_b, logits_a, *_ = packnet_pair
    logits_b = logits_on_test_split(module, data_b)
    module.set_task("digits_rotated")
    assert torch.equal(logits_on_test_split(module, data_a), logits_a)
    module.set_task("digits_mod3")
    assert torch.equal(logits_on_test_split(module, data_b), logits_b)


def test_packnet_artifacts_rebuild_the_sequence_and_refuse_an_untouched_backbone(
    packnet_pair, sequence_model
):
    module, data_a, data_b, logits_a, _, _, artifact_a = packnet_pair
    model, artifact_b = sequence_model(module, artifact_a)
    data_a.setup("test")
    x = next(iter(data_a.test_dataloader()))[0]
    with torch.no_grad():
        assert torch.allclose(model(x, task="digits_rotated"), logits_a[: len(x)], atol=1e-5)
        data_b.setup("test")
        xb = next(iter(data_b.test_dataloader()))[0]
        module.set_task("digits_mod3")
        module.eval()
        assert torch.allclose(model(xb, task="digits_mod3"), module(xb), atol=1e-5)
    # storage: one network's worth of float values across tasks, plus owner indexes
    values = sum(v.numel() for k, v in artifact_b.extra.items() if k.startswith("values/"))
    values += sum(v.numel() for k, v in artifact_a.extra.items() if k.startswith("values/"))
    assert values < sum(m.weight.numel() for _, m in masked_weights(module.backbone))


def test_finetune_sequential_forgets(tmp_path, demo_cache):
    """The same two tasks on one fine-tuned network: task A's predictions move."""
    torch.manual_seed(0)
    data_a, data_b = DigitsDataModule("rotated", batch_size=64), DigitsDataModule("mod3")
    module = demo_module(demo_cache, "finetune_sequential", lr={"backbone": 5e-2})
    _trainer(tmp_path).fit(module, data_a)
    logits_a = logits_on_test_split(module, data_a)
    module.add_task("digits_mod3", 3)
    _trainer(tmp_path).fit(module, data_b)
    module.set_task("digits_rotated")
    assert not torch.allclose(logits_on_test_split(module, data_a), logits_a)


def test_lr_scale_multiplies_every_group_once(tmp_path, demo_cache):
    spec = {"_target_": "piggyback.methods.Piggyback", "name": "piggyback", "lr_scale": 10.0}
    module = demo_module(demo_cache, spec, lr={"masks": 1e-3})
    lrs = {g["name"]: g["lr"] for g in module.param_groups()}
    assert lrs == pytest.approx({"masks": 1e-3, "head": 1e-3})  # binary masks: not scaled
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(module, DigitsDataModule("rotated"))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = PiggybackModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert {g["name"]: g["lr"] for g in reloaded.param_groups()} == pytest.approx(lrs)
    with pytest.raises(ValueError, match="lr_scale"):
        build_method({**spec, "lr_scale": 0})
