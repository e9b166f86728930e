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


# ----------------------------------------------------------------------- text (issue 34)
TINY_WORDS = (
    "the a this that movie film plot actor story good great fun fine bad awful dull boring "
    "what who where when why how is was are did name city year person place long"
).split()


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer, 32-wide BERT and a word-level BERT tokenizer, saved
    as a Hugging Face model folder (config.json, weights, vocab.txt): no download."""
    transformers = pytest.importorskip("transformers")
    from piggyback.backbones.text import tiny_bert

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "BertTokenizer", "do_lower_case": true, "model_max_length": 64}'
    )
    tiny_bert(vocab_size=len(vocab)).save_pretrained(folder)
    assert transformers.AutoTokenizer.from_pretrained(folder).pad_token_id == 0
    return folder


def write_text_task(root: Path, name: str, per_class: dict[str, list[str]], val: bool = True):
    """``root/name/{train,val,test}.tsv`` with every sentence of ``per_class`` repeated."""
    import random

    rng = random.Random(name)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": 12, "val": 3, "test": 4} if val else {"train": 12, "test": 4}
    for split, repeats in splits.items():
        rows = [
            f"{label}\t{rng.choice(TINY_WORDS[:5])} {sentence}"
            for label, sentences in per_class.items()
            for sentence in sentences
            for _ in range(repeats)
        ]
        rng.shuffle(rows)
        (folder / f"{split}.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture
def text_tasks(tmp_path) -> Path:
    """Two small learnable text tasks in the shared layout: ``sentiment`` (2 classes, with
    val.tsv) and ``question`` (3 classes, no val.tsv: val is held out of train)."""
    root = tmp_path / "text"
    write_text_task(
        root,
        "sentiment",
        {
            "negative": ["bad movie", "awful plot", "dull story", "boring film"],
            "positive": ["good movie", "great plot", "fun story", "fine film"],
        },
    )
    write_text_task(
        root,
        "question",
        {
            "HUM": ["who is the actor", "who did name the person"],
            "LOC": ["where is the city", "where was the place"],
            "NUM": ["when was the year", "how long is the film"],
        },
        val=False,
    )
    return root
