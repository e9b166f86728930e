"""FineGrainedDataModule on tiny ImageFolder trees: splits, transforms, bad data."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import hydra
import PIL.Image
import pytest
import torch
from PIL import Image

from piggyback.data import DataError, FineGrainedDataModule
from piggyback.data.finegrained import FINEGRAINED_CLASSES, split_indices
from piggyback.data.transforms import finegrained_transform

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
TINY = {"image_size": 16, "resize_size": 18}


def dm_for(
    root: Path, name: str = "cubs_cropped", num_classes: int = 3, **kw
) -> FineGrainedDataModule:
    return FineGrainedDataModule("cubs", num_classes, root, name, **{**TINY, **kw})


def test_classes_splits_and_batches(make_finegrained):
    dm = dm_for(make_finegrained(), val_fraction=0.34, batch_size=4)
    dm.setup("fit")
    assert dm.class_names == ["001.albatross", "002.auklet", "003.blackbird"]
    assert dm.class_to_idx["003.blackbird"] == 2
    assert len(dm.train_set) + len(dm.val_set) == 18
    assert len(dm.val_set) == 6  # round(0.34 * 6) = 2 per class
    assert sorted(set(dm.val_set.targets)) == [0, 1, 2]  # stratified
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.max() < 3
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape[1:] == (3, 16, 16)
    dm.setup("test")
    assert len(dm.test_set) == 6
    assert next(iter(dm.test_dataloader()))[0].shape[1:] == (3, 16, 16)
    assert len(dm.predict_dataloader().dataset) == 6


def test_val_split_disjoint_and_deterministic(make_finegrained):
    root = make_finegrained(n_train=10)

    def split(seed: int, stratified: bool = True) -> tuple[set[str], set[str]]:
        dm = dm_for(root, val_fraction=0.3, seed=seed, stratified=stratified)
        dm.setup("fit")
        return {p for p, _ in dm.train_set.samples}, {p for p, _ in dm.val_set.samples}

    for stratified in (True, False):
        train, val = split(0, stratified)
        assert not train & val
        assert len(train | val) == 30 and len(val) == 9
        assert split(0, stratified) == (train, val)  # same seed, same split
    assert split(1) != split(0)


def test_split_indices_keeps_every_class_in_train():
    targets = [0] * 2 + [1] * 1 + [2] * 10
    train, val = split_indices(targets, 0.5, seed=3)
    assert {targets[i] for i in train} == {0, 1, 2}
    assert sorted(train + val) == list(range(len(targets)))
    with pytest.raises(DataError, match="val_fraction"):
        split_indices(targets, 1.0, seed=0)


def test_val_on_test_uses_test_split_and_all_train(make_finegrained):
    dm = dm_for(make_finegrained(), val_on_test=True, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_set) == 18
    assert all("/test/" in p for p, _ in dm.val_set.samples)
    assert len(dm.val_set) == 6


def test_no_validation_when_fraction_zero(make_finegrained):
    dm = dm_for(make_finegrained(), val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.train_set) == 18
    assert dm.val_dataloader() == []


def test_imagenet_uses_val_folder(make_finegrained):
    root = make_finegrained(name="imagenet", test_split="val")
    dm = FineGrainedDataModule("imagenet", 3, root, "imagenet", **TINY)
    dm.setup("test")
    assert all("/val/" in p for p, _ in dm.test_set.samples)


@pytest.mark.parametrize(
    ("name", "train"),
    [("cubs_cropped", True), ("cubs_cropped", False), ("flowers", True), ("flowers", False)],
)
def test_real_size_transforms(name, train):
    img = Image.new("RGB", (500, 375), (120, 30, 200))
    x = finegrained_transform(name, train=train)(img)
    assert x.shape == (3, 224, 224)


def test_cropped_sets_are_squashed_not_cropped():
    # A 2:1 image keeps its full content when resized to a square (no crop).
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 20))  # white stripe at the far left edge
    x = finegrained_transform("cubs_cropped", train=False, image_size=16)(img)
    assert x[:, :, 0].mean() > 1.0  # the left stripe survives
    y = finegrained_transform("flowers", train=False, image_size=16, resize_size=16)(img)
    assert y[:, :, 0].mean() < 0  # center crop cut it away


def test_each_image_decoded_once_per_epoch(make_finegrained, monkeypatch):
    opened: list[str] = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(getattr(fp, "name", fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    dm = dm_for(make_finegrained(), val_fraction=0.0, batch_size=5)
    dm.setup("fit")
    assert opened == []  # set-up only lists folders and sniffs headers
    n = sum(len(y) for _, y in dm.train_dataloader())
    assert n == 18 and len(opened) == 18 and len(set(opened)) == 18


# ---------------------------------------------------------------------- bad data
def test_missing_root(tmp_path):
    dm = dm_for(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"not found.*expected layout.*cubs_cropped/train/<class>"):
        dm.setup("fit")


def test_missing_split(make_finegrained):
    root = make_finegrained()
    shutil.rmtree(root / "cubs_cropped" / "test")
    dm = dm_for(root)
    with pytest.raises(DataError, match=r"split folder .*cubs_cropped/test not found"):
        dm.setup("test")


def test_class_count_mismatch(make_finegrained):
    dm = dm_for(make_finegrained(), num_classes=200)
    with pytest.raises(DataError, match=r"num_classes=200 but .* has 3 classes"):
        dm.setup("fit")


def test_empty_class_folder(make_finegrained):
    root = make_finegrained()
    (root / "cubs_cropped" / "train" / "004.empty").mkdir()
    dm = dm_for(root, num_classes=4)
    with pytest.raises(DataError, match=r"class folder .*004.empty has no readable images"):
        dm.setup("fit")


def test_test_class_unknown_to_train(make_finegrained):
    root = make_finegrained()
    shutil.copytree(root / "cubs_cropped/test/002.auklet", root / "cubs_cropped/test/999.extra")
    with pytest.raises(DataError, match="999.extra"):
        dm_for(root).setup("test")


def _corrupt(root: Path) -> Path:
    bad = root / "cubs_cropped" / "train" / "002.auklet" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg at all")
    return bad


def test_unreadable_image_raises_naming_file(make_finegrained):
    root = make_finegrained()
    bad = _corrupt(root)
    with pytest.raises(DataError, match=rf"unreadable image {bad}.*skip_unreadable"):
        dm_for(root).setup("fit")


def test_unreadable_image_skipped_with_count(make_finegrained, caplog):
    root = make_finegrained()
    _corrupt(root)
    (root / "cubs_cropped" / "train" / "001.albatross" / "empty.jpg").write_bytes(b"")
    dm = dm_for(root, skip_unreadable=True, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="piggyback.data.finegrained"):
        dm.setup("fit")
    assert dm.num_skipped["train"] == 2
    assert "skipped 2 unreadable images in train/" in caplog.text
    assert len(dm.train_set) == 18


def test_truncated_image_fails_or_is_skipped_at_load(make_finegrained, caplog):
    root = make_finegrained()
    path = root / "cubs_cropped" / "train" / "001.albatross" / "img_0.jpg"
    path.write_bytes(path.read_bytes()[:40])  # valid JPEG header, no pixel data
    dm = dm_for(root, val_fraction=0.0)
    dm.setup("fit")
    idx = [p for p, _ in dm.train_set.samples].index(str(path))
    with pytest.raises(DataError, match=rf"cannot decode image {path}"):
        dm.train_set[idx]

    dm = dm_for(root, val_fraction=0.0, skip_unreadable=True)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="piggyback.data.finegrained"):
        x, y = dm.train_set[idx]  # replaced by the next readable sample
    assert x.shape == (3, 16, 16)
    assert dm.train_set.num_skipped == 1
    assert str(path) in caplog.text


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("cfg_file", sorted((CONF / "finegrained").glob("*.yaml")), ids=str)
def test_configs_instantiate(cfg_file: Path, tmp_path, make_cfg):
    cfg = make_cfg(f"data=finegrained/{cfg_file.stem}")  # composed: the shared base file included
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, FineGrainedDataModule)
    assert dm.task_name == cfg_file.stem
    assert dm.num_classes == FINEGRAINED_CLASSES[dm.name]
    assert dm.root == tmp_path / "data" / "finegrained"
    assert (dm.batch_size, dm.num_workers, dm.pin_memory) == (32, 4, True)
