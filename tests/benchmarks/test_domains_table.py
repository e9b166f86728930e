"""`benchmarks/domains_table.py --quick`: the experiment=domains sweep on generated image
folders in the real layout, then issue 21's table (rows, S, bytes, BWT) from its run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piggyback.metrics import scores_against_reference

REPO = Path(__file__).resolve().parents[2]
# two small domains and the near-ImageNet task keep the run to seconds; the other domains of
# data=domains are dropped with ~data.tasks.<name>
KEPT = {"pacs_sketch": 7, "retina": 5}
DROPPED = ("sign_digits", "gtsrb", "flowers17", "magnetic_tiles")
METHODS = ("piggyback", "finetune", "classifier_only")


def write_tree(root: Path, classes: int, seed: int) -> None:
    """``root/{train,test}/<class>/*.jpg``: 5 train (one held out for val) and 2 test per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 5), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, str]:
    """The sweep folder of one --quick run and the table it printed."""
    tmp = tmp_path_factory.mktemp("domains")
    data = tmp / "data"
    for seed, (name, classes) in enumerate(KEPT.items()):
        write_tree(data / "domains" / name, classes, seed)
    write_tree(data / "cifar10_small", 10, 99)
    out = tmp / "sweep"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "domains_table.py"),
        "--quick",
        "--out",
        str(out),
        "--methods",
        ",".join(METHODS),
        f"paths.data_dir={data}",
        *(f"~data.tasks.{name}" for name in DROPPED),
        "data.batch_size=8",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout
