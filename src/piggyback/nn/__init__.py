"""Masked layers, straight-through threshold functions and model conversion."""

from piggyback.nn.convert import (
    get_masks,
    mask_model,
    mask_parameters,
    masked_layers,
    materialize,
    num_masked_weights,
    reset_masks,
    set_masks,
    strip_classifier,
)
from piggyback.nn.layers import MASK_INITS, MaskedConv2d, MaskedLayerMixin, MaskedLinear
from piggyback.nn.threshold import (
    DEFAULT_THRESHOLD,
    GRAD_RESCALES,
    THRESHOLD_FNS,
    binarizer,
    masked_weight,
    quantize,
    ternarizer,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "GRAD_RESCALES",
    "MASK_INITS",
    "THRESHOLD_FNS",
    "MaskedConv2d",
    "MaskedLayerMixin",
    "MaskedLinear",
    "binarizer",
    "get_masks",
    "mask_model",
    "mask_parameters",
    "masked_layers",
    "masked_weight",
    "materialize",
    "num_masked_weights",
    "quantize",
    "reset_masks",
    "set_masks",
    "strip_classifier",
    "ternarizer",
]
