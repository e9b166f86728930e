"""Pretraining for the offline demo: the small CNN learns the base digits task once.

This is the demo's stand-in for ImageNet pretraining. The result is cached (keyed by the
recipe) so every later run, test and notebook reuses the same frozen weights, exactly as
real runs reuse torchvision's cached ImageNet weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from piggyback.data.digits import load_digits_tensors
from piggyback.nets.small_cnn import small_cnn
from piggyback.utils.atomic import atomic_write_stream

log = logging.getLogger(__name__)

PRETRAIN_RECIPE = {"variant": "base", "epochs": 12, "lr": 3e-3, "batch_size": 64, "seed": 0}


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIGGYBACK_CACHE", Path.home() / ".cache" / "piggyback"))


def _recipe_key() -> str:
    return hashlib.sha256(json.dumps(PRETRAIN_RECIPE, sort_keys=True).encode()).hexdigest()[:10]


def pretrain_small_cnn() -> tuple[dict[str, torch.Tensor], float]:
    """Train the small CNN on the base digits task; returns its state and test accuracy."""
    recipe = PRETRAIN_RECIPE
    generator = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    splits = load_digits_tensors(recipe["variant"], seed=recipe["seed"])
    x, y = splits["train"]
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(recipe["epochs"]):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), recipe["batch_size"]):
            idx = order[start : start + recipe["batch_size"]]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    tx, ty = splits["test"]
    with torch.no_grad():
        acc = (model(tx).argmax(1) == ty).float().mean().item()
    return model.state_dict(), acc


def pretrained_small_cnn_state(
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """The cached pretrained state (trained on first use, ~15 s on 2 CPU cores)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"small_cnn_digits_{_recipe_key()}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    log.info("pretraining the demo backbone on the base digits task (cached at %s)", path)
    state, acc = pretrain_small_cnn()
    log.info("demo backbone base-task test accuracy: %.4f", acc)
    # concurrent multirun jobs may race here; both write the same bytes
    atomic_write_stream(path, lambda handle: torch.save(state, handle), overwrite=True)
    return state
