"""Shared fixtures: Hydra composition and a demo backbone pretrained once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from piggyback.train import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_cache() -> Path:
    """The cache holding the pretrained demo backbone, trained on first use (~20-30 s).

    It is the user's piggyback cache (``PIGGYBACK_CACHE``, default ~/.cache/piggyback), like
    torchvision's weight cache: the file name carries a hash of the pretraining recipe, so a
    stale file is never reused.
    """
    from piggyback.backbones.demo import default_cache_dir, pretrained_small_cnn_state

    cache = default_cache_dir()
    pretrained_small_cnn_state(cache)
    return cache


@pytest.fixture
def make_cfg(tmp_path, demo_cache) -> Callable[..., DictConfig]:
    """Compose ``conf/train.yaml`` with overrides, writing everything under tmp_path."""

    def _make(*overrides: str, config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "out")
            cfg.paths.cache_dir = str(demo_cache)
            cfg.paths.data_dir = str(tmp_path / "data")
            if "run_name" in cfg:
                cfg.run_name = "test"
        return cfg

    return _make
