"""Pretrained backbones from one registry: torchvision, timm, our own nets, any callable.

``build_backbone`` returns the network *without its classifier*, the width of the features
the task heads read, and the data config (mean, std, input size) of its pretrained weights,
so a new architecture needs no per-model code. Configs: ``conf/backbone/*.yaml``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from piggyback.backbones.base import (
    IMAGENET_DATA_CONFIG,
    Backbone,
    BackboneError,
    load_checkpoint,
    remove_classifier,
)
from piggyback.backbones.sources import NAMED, SOURCES
from piggyback.utils.instantiate import build

DEMO_BACKBONE = "small_cnn"


def _from_callable(spec: Mapping[str, Any] | nn.Module) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    model = build(dict(spec))
    if not isinstance(model, nn.Module):
        raise BackboneError(
            f"backbone.model {spec.get('_target_')!r} returned a {type(model).__name__}, "
            "not an nn.Module"
        )
    return model


def _resolve_source(name: str, source: str) -> str:
    if source != "auto":
        if source not in SOURCES:
            raise BackboneError(
                f"unknown backbone source {source!r}; choose one of {list(SOURCES)}"
            )
        return source
    for key, (knows, _) in SOURCES.items():
        if knows(name):
            return key
    raise BackboneError(
        f"unknown backbone {name!r}: use one of {sorted(NAMED)}, a torchvision classification "
        "model (resnet50, vit_b_16, ...), a timm model (backbone.source=timm), or "
        "backbone.model={_target_: your.factory}"
    )


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """The global RNG seeded with ``seed`` inside, and as it was after (None: untouched)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_backbone(
    name: str | None = None,
    *,
    weights: str | None = "DEFAULT",
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    source: str = "auto",
    classifier: str | None = None,
    model: Mapping[str, Any] | nn.Module | None = None,
    data_config: Mapping[str, Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    init_seed: int | None = None,
) -> Backbone:
    """Build a pretrained backbone and remove its classifier.

    ``name`` picks one of our own nets (``small_cnn``, ``resnet26``, ``efficientnet_lite0``)
    or a model of ``source`` (``torchvision``, ``timm``, or ``auto``: the first that knows
    the name); ``model`` (a ``_target_`` config or a module) replaces all of that with any
    callable. Weights: ``checkpoint`` (a local state dict) > ``weights`` (a torchvision
    weight-enum name, ``DEFAULT``, a timm pretrained tag, ``demo`` for the demo CNN) >
    random init (``weights=None``). ``classifier`` names the module to remove when the
    model's own API and the usual names do not settle it. ``kwargs`` go to the builder
    (``img_size=...`` for a timm ViT); ``data_config`` overrides the pretrained one.

    ``init_seed``: a random init (no weights, no checkpoint) is drawn from this seed, in a
    forked RNG, so the same backbone can be built again to evaluate what trained on it (the
    run's seed: ``backbone.init_seed: ${seed}``); None draws from the global RNG.
    """
    wanted = None if checkpoint is not None else weights
    random_init = wanted is None and checkpoint is None
    with _seeded(init_seed if random_init else None):
        if model is not None:
            net, config = _from_callable(model), {}
            name = name or type(net).__name__
        elif name is None:
            raise BackboneError("a backbone needs a name (backbone.name=...) or backbone.model")
        elif name in NAMED:
            cache = None if cache_dir is None else str(cache_dir)
            net, config = NAMED[name](wanted, cache_dir=cache, **dict(kwargs or {}))
        else:
            _, build = SOURCES[_resolve_source(name, source)]
            net, config = build(name, wanted, **dict(kwargs or {}))
    if checkpoint is not None:
        load_checkpoint(net, checkpoint)
    net, feature_dim = remove_classifier(net, classifier)
    config = {**config, **dict(data_config or {})}
    return Backbone(model=net, feature_dim=feature_dim, name=name, data_config=config)


__all__ = [
    "DEMO_BACKBONE",
    "IMAGENET_DATA_CONFIG",
    "NAMED",
    "SOURCES",
    "Backbone",
    "BackboneError",
    "build_backbone",
    "load_checkpoint",
    "remove_classifier",
]
