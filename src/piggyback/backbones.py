"""Pretrained backbones: torchvision weights (downloaded once, cached), a local checkpoint,
or the demo CNN pretrained on the base digits task.

Every builder returns the network *with its classifier stripped*, the width of the
features the task heads read, so a new architecture needs no per-model code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from piggyback.nn.convert import strip_classifier

log = logging.getLogger(__name__)

DEMO_BACKBONE = "small_cnn"


class BackboneError(RuntimeError):
    """Pretrained weights cannot be had; the message says how to supply them."""


@dataclass
class Backbone:
    """A feature extractor ready for masking, and what is needed to rebuild it."""

    model: nn.Module
    feature_dim: int
    name: str


def _architecture(name: str, num_classes: int | None = None) -> nn.Module:
    if name == DEMO_BACKBONE:
        from piggyback.nets.small_cnn import small_cnn

        return small_cnn()
    if name == "resnet26":
        from piggyback.nets.resnet26 import resnet26

        return resnet26()
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError:
        known = sorted(torchvision.models.list_models(torchvision.models))
        raise BackboneError(
            f"unknown backbone {name!r}: use {DEMO_BACKBONE!r}, 'resnet26' or a torchvision "
            f"classification model ({', '.join(known[:8])}, ...)"
        ) from None


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise BackboneError(f"backbone checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BackboneError(
            f"checkpoint {path} does not fit the {type(model).__name__} architecture: {exc}"
        ) from None


def _load_torchvision_weights(model: nn.Module, name: str, weights: str) -> None:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
        weight_enum = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        raise BackboneError(f"no torchvision weights {weights!r} for {name!r}") from None
    try:
        state = weight_enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "offline"
        hub = torch.hub.get_dir()
        raise BackboneError(
            f"could not download the pretrained {name} weights ({weight_enum}): {exc}.\n"
            f"You are probably offline. Either copy the file {weight_enum.url.rsplit('/', 1)[-1]} "
            f"into {hub}/checkpoints/ (torchvision's cache), or point the run at a local "
            f"checkpoint: backbone.checkpoint=/path/to/{name}.pth, or train from scratch with "
            "backbone.weights=null."
        ) from None
    model.load_state_dict(state)


def build_backbone(
    name: str,
    *,
    weights: str | None = "DEFAULT",
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Build ``name`` with pretrained weights and strip its classifier.

    Priority: ``checkpoint`` (a local state dict) > ``weights`` (a torchvision weight enum
    name such as ``DEFAULT``/``IMAGENET1K_V1``, or ``demo`` for the demo CNN) > random init
    (``weights=None``, used when a checkpoint will overwrite everything anyway).
    """
    model = _architecture(name)
    if checkpoint is not None:
        _load_checkpoint(model, Path(checkpoint))
    elif weights is not None and name == DEMO_BACKBONE:
        from piggyback.demo import pretrained_small_cnn_state

        model.load_state_dict(pretrained_small_cnn_state(cache_dir))
    elif weights is not None and name == "resnet26":
        raise BackboneError(
            "resnet26 has no downloadable weights: pretrain it on imagenet12 "
            "(data=decathlon/imagenet12 backbone.weights=null) and pass "
            "backbone.checkpoint=/path/to/resnet26.pth"
        )
    elif weights is not None:
        _load_torchvision_weights(model, name, weights)
    model, feature_dim = strip_classifier(model)
    return Backbone(model=model, feature_dim=feature_dim, name=name)
