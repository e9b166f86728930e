"""DecathlonDataModule on a tiny devkit tree: re-based labels, stats cache, results.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import pytest
import torch
from PIL import Image

from piggyback.data import DataError, DecathlonDataModule, write_results_json
from piggyback.data.decathlon import DECATHLON_CLASSES, STATS_FILE
from piggyback.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decathlon_transform

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
TINY = {"image_size": 16, "resize_size": 18}
GIVEN = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def dm_for(root: Path, domain: str = "dtd", num_classes: int = 3, **kw) -> DecathlonDataModule:
    return DecathlonDataModule(domain, num_classes, root, **{**TINY, **GIVEN, **kw})


def test_labels_are_rebased_and_matched_by_image_id(make_decathlon):
    root = make_decathlon()
    dm = dm_for(root)
    dm.setup("fit")
    assert dm.category_ids == [10001, 10002, 10003]
    assert dm.class_names == ["banded", "blotchy", "zigzagged"]
    local = {name: i for i, name in enumerate(dm.class_names)}
    for ds in (dm.train_set, dm.val_set):
        for path, label in ds.samples:
            assert label == local[Path(path).parent.name]  # annotations were listed reversed
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6
    assert sorted(set(dm.train_set.targets)) == [0, 1, 2]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and y.dtype == torch.int64


def test_test_defaults_to_val_and_predict_serves_test_stripped(make_decathlon):
    dm = dm_for(make_decathlon())
    dm.setup("test")
    assert [p for p, _ in dm.test_set.samples] == [
        p for p, _ in dm._dataset(["val"], train=False).samples
    ]
    dm.setup("predict")
    x, image_ids = next(iter(dm.predict_dataloader()))
    assert x.shape == (3, 3, 16, 16)
    assert image_ids.tolist() == dm.predict_set.image_ids and min(image_ids) >= 5_000_000
    with pytest.raises(DataError, match="no labels"):
        dm_for(make_decathlon(), test_split="test_stripped")


def test_no_flip_domains_keep_full_72px(make_decathlon):
    dm = dm_for(make_decathlon("gtsrb"), "gtsrb")
    dm.setup("fit")
    assert dm.train_set[0][0].shape == (3, 18, 18)  # resize_size, not image_size
    assert dm.val_set[0][0].shape == (3, 18, 18)


@pytest.mark.parametrize(
    ("domain", "side"),
    [("aircraft", 64), ("dtd", 64), ("gtsrb", 72), ("omniglot", 72), ("svhn", 72)],
)
@pytest.mark.parametrize("train", [True, False])
def test_real_size_transforms(domain, side, train):
    img = Image.new("L" if domain == "omniglot" else "RGB", (96, 72))
    x = decathlon_transform(domain, train=train, mean=IMAGENET_MEAN, std=IMAGENET_STD)(img)
    assert x.shape == (3, side, side)


def test_mean_std_measured_once_and_cached(make_decathlon, tmp_path, monkeypatch):
    root = make_decathlon()
    cache = tmp_path / "stats"
    dm = DecathlonDataModule("dtd", 3, root, stats_cache_dir=cache, **TINY)
    dm.prepare_data()
    mean, std = dm.mean, dm.std
    assert len(mean) == 3 and all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)
    entry = json.loads((cache / STATS_FILE).read_text())["dtd@16/18"]
    assert entry["mean"] == list(mean) and entry["num_images"] == 12

    def fail(self):
        raise AssertionError("statistics should come from the cache")

    monkeypatch.setattr(DecathlonDataModule, "compute_mean_std", fail)
    dm2 = DecathlonDataModule("dtd", 3, root, stats_cache_dir=cache, **TINY)
    dm2.setup("fit")
    assert dm2.mean == mean and dm2.std == std
    # Values from the config win over the cache.
    dm3 = DecathlonDataModule("dtd", 3, root, stats_cache_dir=cache, mean=[0.5] * 3, std=[0.25] * 3)
    assert dm3.resolve_mean_std() == ((0.5,) * 3, (0.25,) * 3)


def test_stats_subsample_matches_full_pass_shape(make_decathlon, tmp_path):
    dm = DecathlonDataModule(
        "dtd", 3, make_decathlon(), stats_cache_dir=tmp_path, stats_max_images=5, **TINY
    )
    mean, std = dm.compute_mean_std()
    assert len(mean) == len(std) == 3


def test_results_json_export(make_decathlon, tmp_path):
    dm = dm_for(make_decathlon())
    dm.setup("predict")
    ids = dm.predict_set.image_ids
    preds = torch.tensor([2, 0, 1])
    out = dm.export_results(tmp_path / "results.json", torch.tensor(ids), preds)
    results = json.loads(out.read_text())
    assert results == [
        {"image_id": ids[0], "category_id": 10003},
        {"image_id": ids[1], "category_id": 10001},
        {"image_id": ids[2], "category_id": 10002},
    ]
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in results)
    assert set(results[0]) == {"image_id", "category_id"}

    with pytest.raises(FileExistsError, match="overwrite=True"):
        dm.export_results(out, ids, [0, 0, 0])
    assert json.loads(out.read_text()) == results  # untouched
    dm.export_results(out, ids, [0, 0, 0], overwrite=True)
    assert {r["category_id"] for r in json.loads(out.read_text())} == {10001}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    with pytest.raises(DataError, match="outside 0..2"):
        dm.to_results(ids, [0, 1, 3])


def test_results_json_all_domains(tmp_path):
    merged = write_results_json(
        tmp_path / "all.json",
        {
            "dtd": [{"image_id": 1, "category_id": 10001}],
            "svhn": [{"image_id": torch.tensor(2), "category_id": 2.0}],
        },
    )
    assert json.loads(merged.read_text()) == [
        {"image_id": 1, "category_id": 10001},
        {"image_id": 2, "category_id": 2},
    ]
    with pytest.raises(DataError, match="image_id 1 appears twice"):
        write_results_json(
            tmp_path / "dup.json",
            {"a": [{"image_id": 1, "category_id": 1}], "b": [{"image_id": 1, "category_id": 2}]},
        )
    assert not (tmp_path / "dup.json").exists()


# ---------------------------------------------------------------------- bad data
def test_missing_root(tmp_path):
    with pytest.raises(
        DataError, match=r"devkit folder .*decathlon-1.0 not found; expected layout"
    ):
        dm_for(tmp_path).setup("fit")


def test_missing_annotation_file(make_decathlon):
    root = make_decathlon()
    os.remove(root / "decathlon-1.0" / "annotations" / "dtd_val.json")
    with pytest.raises(DataError, match=r"annotation file .*annotations/dtd_val.json not found"):
        dm_for(root).setup("fit")


def test_missing_image_file(make_decathlon):
    root = make_decathlon()
    gone = root / "decathlon-1.0" / "data" / "dtd" / "train" / "blotchy" / "00001.png"
    gone.unlink()
    with pytest.raises(DataError, match=rf"at {gone}, which does not exist \(1 of 12"):
        dm_for(root).setup("fit")


def test_class_count_mismatch(make_decathlon):
    with pytest.raises(DataError, match=r"num_classes=47 but .*dtd_train.json has 3 classes"):
        dm_for(make_decathlon(), num_classes=47).setup("fit")


def test_unknown_category_in_val(make_decathlon):
    root = make_decathlon()
    path = root / "decathlon-1.0" / "annotations" / "dtd_val.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0]["category_id"] = 99999
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="category_id 99999"):
        dm_for(root).setup("fit")


def test_unknown_domain(tmp_path):
    with pytest.raises(DataError, match="unknown decathlon domain 'mnist'"):
        dm_for(tmp_path, "mnist")


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("cfg_file", sorted((CONF / "decathlon").glob("*.yaml")), ids=str)
def test_configs_instantiate(cfg_file: Path, tmp_path, make_cfg):
    cfg = make_cfg(f"data=decathlon/{cfg_file.stem}")  # composed: the shared base file included
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, DecathlonDataModule)
    assert dm.task_name == dm.domain == cfg_file.stem
    assert dm.num_classes == DECATHLON_CLASSES[dm.domain]
    assert dm.devkit_dir == tmp_path / "data" / "decathlon-1.0"
    assert (dm.batch_size, dm.num_workers, dm.pin_memory) == (32, 4, True)
