"""A short Piggyback run on each real on-disk layout, through the Hydra data configs."""

from __future__ import annotations

from pathlib import Path

from piggyback.formats import load_artifact
from piggyback.train import train

SHORT = (
    "backbone=resnet18",
    "backbone.weights=null",  # offline: random init stands in for ImageNet weights
    "method=piggyback",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.pin_memory=false",
)


def test_piggyback_trains_on_finegrained_imagefolder(make_cfg, make_finegrained):
    root = make_finegrained()
    cfg = make_cfg(
        "data=finegrained/cubs",
        *SHORT,
        f"data.root={root}",
        "data.num_classes=3",
        "data.image_size=32",
        "data.resize_size=36",
        "data.val_fraction=0.34",
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    artifact = load_artifact(Path(cfg.paths.output_dir) / "artifacts" / "cubs.safetensors")
    assert artifact.num_classes == 3 and len(artifact.masks) == 20
    assert artifact.class_names == ["001.albatross", "002.auklet", "003.blackbird"]


def test_piggyback_trains_on_decathlon_devkit(make_cfg, make_decathlon):
    root = make_decathlon("dtd")
    cfg = make_cfg(
        "data=decathlon/dtd",
        *SHORT,
        f"data.root={root}",
        "data.num_classes=3",
        "data.image_size=32",
        "data.resize_size=36",
        f"data.stats_cache_dir={root}/cache",
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    artifact = load_artifact(Path(cfg.paths.output_dir) / "artifacts" / "dtd.safetensors")
    assert artifact.num_classes == 3
