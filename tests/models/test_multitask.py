"""Multi-task model and bundle: one backbone, many tasks, predictions identical to each task's
own model, and artifacts from other backbones refused."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from piggyback.backbones import build_backbone
from piggyback.formats import ArtifactError, bn_state_dict, save_artifact
from piggyback.methods import apply_artifact, extract_artifact
from piggyback.models.module import PiggybackModule
from piggyback.models.multitask import (
    MultiTaskModel,
    group_by_task,
    load_bundle,
    masks_in_network_order,
    save_bundle,
    state_bytes,
)
from piggyback.nn.convert import mask_model
from piggyback.train import train_task

TASKS = {"digits_rotated": 10, "digits_mod3": 3}


def _perturb_bn(backbone: torch.nn.Module, seed: int) -> None:
    """Stand-in for task-trained BN: statistics that differ from the pretrained ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in bn_state_dict(backbone).items():
            if value.is_floating_point():
                name, _, attr = key.rpartition(".")
                target = getattr(backbone.get_submodule(name), attr)
                target.add_(0.1 * torch.rand(value.shape, generator=g))


@pytest.fixture(scope="module")
def module(demo_cache) -> PiggybackModule:
    """Two demo tasks with random masks and their own BN state (no training needed: the
    claim under test is that storing and swapping tasks changes no prediction)."""
    torch.manual_seed(0)
    backbone = {"name": "small_cnn", "weights": "demo", "cache_dir": str(demo_cache)}
    tasks = iter(TASKS.items())
    task, classes = next(tasks)
    m = PiggybackModule(backbone, task, classes, bn="train", mask={"mask_init": "uniform"})
    _perturb_bn(m.backbone, 1)
    for seed, (task, classes) in enumerate(tasks, start=2):
        m.add_task(task, classes)  # a fresh uniform mask: about half the weights off
        _perturb_bn(m.backbone, seed)
    return m.eval()


@pytest.fixture(scope="module")
def artifacts(module):
    return {task: module.export_task(task) for task in TASKS}


@pytest.fixture(scope="module")
def pretrained(demo_cache):
    return build_backbone("small_cnn", weights="demo", cache_dir=demo_cache)


def _own_model(pretrained, artifact):
    """The task on its own: a fresh copy of the pretrained backbone with only this artifact."""
    backbone = mask_model(copy.deepcopy(pretrained.model)).eval()
    head = apply_artifact(backbone, artifact)
    return lambda x: head(backbone(x))


@torch.no_grad()
def test_bundle_predicts_bit_identically_to_each_task(module, artifacts, pretrained, tmp_path):
    model = MultiTaskModel.from_artifacts(artifacts.values(), copy.deepcopy(pretrained.model))
    path = save_bundle(model, tmp_path / "bundle.safetensors")
    bundle = load_bundle(path)
    assert bundle.tasks == list(TASKS)
    x = torch.rand(6, 1, 32, 32)
    order = ["digits_mod3", "digits_rotated", "digits_mod3", "digits_rotated"]
    for task in order:  # switching back and forth must not leak state between tasks
        module.set_task(task)
        expected = module(x)
        assert torch.equal(bundle(x, task=task), expected)
        assert torch.equal(model(x, task=task), expected)
        assert torch.equal(_own_model(pretrained, artifacts[task])(x), expected)
    assert bundle.artifact("digits_mod3").bn_state  # the BN state travelled with the task


def test_bundle_stores_backbone_once(artifacts, pretrained, tmp_path):
    model = MultiTaskModel.from_artifacts(artifacts.values(), copy.deepcopy(pretrained.model))
    storage = model.storage()
    backbone = state_bytes(pretrained.model.state_dict())
    assert storage["backbone_bytes"] == backbone
    assert storage["total_bytes"] == backbone + sum(a.task_bytes() for a in artifacts.values())
    assert storage["separate_networks_bytes"] == 2 * backbone + sum(
        state_bytes(a.head) for a in artifacts.values()
    )
    path = save_bundle(model, tmp_path / "b.safetensors")
    assert path.stat().st_size < storage["total_bytes"] + 64 * 1024  # + header only


def test_bundle_save_refuses_overwrite_and_leaves_no_temp_files(artifacts, pretrained, tmp_path):
    model = MultiTaskModel.from_artifacts(artifacts.values(), copy.deepcopy(pretrained.model))
    path = model.save(tmp_path / "b.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(path)
    model.save(path, overwrite=True)
    assert os.listdir(tmp_path) == ["b.safetensors"]


def test_damaged_bundle_is_refused(artifacts, pretrained, tmp_path):
    model = MultiTaskModel.from_artifacts(artifacts.values(), copy.deepcopy(pretrained.model))
    path = model.save(tmp_path / "b.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="integrity"):
        load_bundle(path)
    task_file = save_artifact(artifacts["digits_mod3"], tmp_path / "task.safetensors")
    with pytest.raises(ArtifactError, match="load_artifact"):
        MultiTaskModel.load(task_file)


def test_artifact_from_another_backbone_is_refused(artifacts, pretrained):
    torch.manual_seed(123)
    other = build_backbone("small_cnn", weights=None).model  # same architecture, other weights
    model = MultiTaskModel(other, "small_cnn")
    with pytest.raises(ArtifactError, match="different weights"):
        model.add_task(artifacts["digits_rotated"])
    model = MultiTaskModel(copy.deepcopy(pretrained.model), "small_cnn")
    forged = dataclasses.replace(artifacts["digits_mod3"], fingerprint="0" * 64)
    with pytest.raises(ArtifactError, match="different weights"):
        model.add_task(forged)
    assert model.tasks == []
    model.add_task(artifacts["digits_mod3"])
    with pytest.raises(ArtifactError, match="already"):
        model.add_task(artifacts["digits_mod3"])


def test_masks_come_back_in_network_order(artifacts, pretrained):
    """Artifact files list layers alphabetically; by-depth analysis needs the real order."""
    modules = pretrained.model.named_modules()
    order = [f"{n}.weight" for n, m in modules if isinstance(m, torch.nn.Conv2d)]
    assert list(masks_in_network_order(artifacts["digits_mod3"])) == order
    assert order != sorted(order)  # features.10 would otherwise come before features.3


def test_group_by_task_keeps_first_appearance_order():
    assert group_by_task(["b", "a", "b", "c", "a"]) == {"b": [0, 2], "a": [1, 4], "c": [3]}
    assert group_by_task([]) == {}


@torch.no_grad()
def test_predict_mixed_returns_predictions_in_request_order(artifacts, pretrained):
    model = MultiTaskModel.from_artifacts(artifacts.values(), copy.deepcopy(pretrained.model))
    x = torch.rand(7, 1, 32, 32)
    tasks = ["digits_rotated", "digits_mod3", "digits_mod3", "digits_rotated"] + ["digits_mod3"] * 3
    requests = list(zip(x, tasks, strict=True))
    expected = [model(x[i : i + 1], task=t).argmax(1).item() for i, t in enumerate(tasks)]
    assert model.predict_mixed(requests, batch_size=2) == expected
    logits = model.predict_mixed(requests, return_logits=True)
    assert [len(v) for v in logits] == [TASKS[t] for t in tasks]


@torch.no_grad()
def test_classifier_only_and_finetune_tasks_share_the_model(artifacts, pretrained, tmp_path):
    """A head-only task runs the pretrained network; a fine-tuned task runs its own weights."""
    head = torch.nn.Linear(pretrained.feature_dim, 4)
    clf = extract_artifact(
        pretrained.model, head, task="clf", backbone_name="small_cnn", method="classifier_only"
    )
    tuned = copy.deepcopy(pretrained.model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01)
    ft = extract_artifact(
        tuned,
        head,
        task="ft",
        backbone_name="small_cnn",
        method="finetune",
        backbone_fingerprint=clf.fingerprint,
    )
    model = MultiTaskModel(copy.deepcopy(pretrained.model), "small_cnn")
    for artifact in (clf, artifacts["digits_mod3"], ft):
        model.add_task(artifact)
    bundle = load_bundle(save_bundle(model, tmp_path / "mixed.safetensors"))
    x = torch.rand(3, 1, 32, 32)
    plain = copy.deepcopy(pretrained.model).eval()
    for m in (model, bundle):
        assert torch.equal(m(x, task="clf"), head(plain(x)))
        assert torch.equal(m(x, task="ft"), head(tuned.eval()(x)))
        assert torch.equal(m(x, task="clf"), head(plain(x)))  # fine-tuning left it untouched
    # a fine-tuned task stores a whole network: as large as the backbone itself
    assert ft.task_bytes() >= state_bytes(pretrained.model.state_dict())
    assert clf.task_bytes() == state_bytes(head.state_dict())


def test_trained_module_matches_its_exported_task(make_cfg):
    """Right after fit, the live module predicts exactly what its artifact predicts in a
    multi-task model (this caught frozen BN statistics drifting during training)."""
    cfg = make_cfg(
        "data=digits/rotated",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "test=false",
        "logger=none",
        "callbacks=none",
        "save_artifacts=false",
    )
    trained, _ = train_task(cfg, cfg.data, None, Path(cfg.paths.output_dir))
    trained.eval()
    artifact = trained.export_task()
    model = MultiTaskModel(build_backbone(**cfg.backbone).model, "small_cnn")
    model.add_task(artifact)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, task=artifact.task), trained(x))


def test_format_1_bundle_still_loads(module, artifacts, pretrained, tmp_path):
    """Bundles written before masks were named by parameter keep loading, same predictions."""
    from safetensors import safe_open

    from piggyback.formats import legacy_fingerprint, read_checked_file, write_checked_file
    from piggyback.models.multitask import BUNDLE_FORMAT

    model = MultiTaskModel.from_artifacts(artifacts.values(), copy.deepcopy(pretrained.model))
    path = save_bundle(model, tmp_path / "bundle.safetensors")
    meta, tensors = read_checked_file(path, file_format=BUNDLE_FORMAT, version=2, what="bundle")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["version"] == "2"
    old_tensors = {k.replace(".weight", "") if "/mask/" in k else k: v for k, v in tensors.items()}
    meta["fingerprint"] = legacy_fingerprint(pretrained.model)
    for task_meta in meta["tasks"]:
        task_meta["fingerprint"] = meta["fingerprint"]
        task_meta["masks"] = {k.removesuffix(".weight"): v for k, v in task_meta["masks"].items()}
        task_meta.pop("extra", None)
    old = write_checked_file(
        tmp_path / "v1.safetensors", old_tensors, meta, file_format=BUNDLE_FORMAT, version=1
    )
    bundle = load_bundle(old)
    x = torch.rand(4, 1, 32, 32)
    for task in TASKS:
        module.set_task(task)
        assert torch.equal(bundle(x, task=task), module(x))
