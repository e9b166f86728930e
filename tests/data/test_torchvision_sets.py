"""TorchvisionDataModule: the no-data / offline errors, and a tiny GTSRB in torchvision's layout.

Nothing here touches the network: downloads are either off or replaced by a stub that fails
the way an offline machine does.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torchvision.datasets.gtsrb
from omegaconf import OmegaConf
from PIL import Image

from piggyback.data import DataError, TorchvisionDataModule
from piggyback.data.torchvision_sets import TORCHVISION_SETS

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def write_ppm(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def make_gtsrb(root: Path, n_train: int = 5, n_test: int = 2, classes: int = 3) -> Path:
    """torchvision's GTSRB layout: Training/<5-digit class>/*.ppm and a test CSV."""
    base = root / "gtsrb"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    seed = 0
    for c in range(classes):
        for i in range(n_train):
            write_ppm(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_{i:05d}.ppm", seed)
            seed += 1
        for i in range(n_test):
            name = f"{c * n_test + i:05d}.ppm"
            write_ppm(base / "GTSRB" / "Final_Test" / "Images" / name, seed)
            rows.append(f"{name};24;20;1;1;23;19;{c}")
            seed += 1
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return root


def test_missing_data_without_download(tmp_path):
    dm = TorchvisionDataModule("cifar100", 100, tmp_path, "cifar100")
    with pytest.raises(DataError, match=r"not found under .*data.download=true"):
        dm.setup("fit")


def test_offline_download_gives_advice(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.gtsrb, "download_and_extract_archive", offline)
    dm = TorchvisionDataModule("gtsrb", 43, tmp_path, "gtsrb", download=True)
    with pytest.raises(DataError, match=r"downloading 'gtsrb' .* failed .*looks offline"):
        dm.prepare_data()


def test_stanford_cars_cannot_download(tmp_path):
    dm = TorchvisionDataModule("cars", 196, tmp_path, "stanford_cars", download=True)
    with pytest.raises(DataError, match="cannot download 'stanford_cars'"):
        dm.setup("fit")


def test_unknown_name(tmp_path):
    with pytest.raises(DataError, match="unknown torchvision dataset 'mnist'"):
        TorchvisionDataModule("mnist", 10, tmp_path, "mnist")


def test_tiny_gtsrb_on_disk(tmp_path):
    root = make_gtsrb(tmp_path)
    dm = TorchvisionDataModule(
        "gtsrb",
        3,
        root,
        "gtsrb",
        preset="decathlon",
        image_size=16,
        resize_size=18,
        val_fraction=0.2,
        batch_size=4,
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.val_set) == 3 and len(dm.test_set) == 6
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 18, 18)  # gtsrb keeps the full resize_size, no crop / flip
    assert y.dtype == torch.int64
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape[1:] == (3, 18, 18) and set(yt.tolist()) <= {0, 1, 2}


def test_tiny_gtsrb_class_count_checked(tmp_path):
    dm = TorchvisionDataModule("gtsrb", 43, make_gtsrb(tmp_path), "gtsrb")
    with pytest.raises(DataError, match="num_classes=43 but .* has 3 classes"):
        dm.setup("fit")


@pytest.mark.parametrize("cfg_file", sorted((CONF / "torchvision").glob("*.yaml")), ids=str)
def test_configs_instantiate(cfg_file: Path, tmp_path):
    cfg = OmegaConf.merge(
        {"paths": {"data_dir": str(tmp_path)}}, {"data": OmegaConf.load(cfg_file)}
    )
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, TorchvisionDataModule)
    assert dm.download is False
    assert dm.num_classes == TORCHVISION_SETS[dm.name].num_classes
    assert dm.task_name == cfg_file.stem
