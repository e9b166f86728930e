"""Threshold functions with the straight-through estimator of the Piggyback paper.

The forward pass quantises the real-valued mask; the backward pass pretends the quantiser
is the identity, so ``dL/dmask_real = dL/dM``. Combined with ``W_eff = W * M`` that gives
``dL/dmask_real = dL/dW_eff * W`` (PAPER.md). ``masked_weight`` fuses both steps into one
autograd node so a training step stores no extra copy of the mask or of ``W * M``.
"""

from __future__ import annotations

from typing import Literal

import torch

DEFAULT_THRESHOLD = 5e-3
ThresholdName = Literal["binarizer", "ternarizer"]
GradRescale = Literal["none", "average", "individual"]
THRESHOLD_FNS: tuple[str, ...] = ("binarizer", "ternarizer")
GRAD_RESCALES: tuple[str, ...] = ("none", "average", "individual")


def quantize(mask_real: torch.Tensor, threshold: float, kind: str) -> torch.Tensor:
    """Forward rule of both quantisers, in ``mask_real``'s dtype (no gradient)."""
    if kind == "binarizer":
        return (mask_real > threshold).to(mask_real.dtype)
    if kind == "ternarizer":
        ones = (mask_real > threshold).to(mask_real.dtype)
        return ones - (mask_real < 0).to(mask_real.dtype)
    raise ValueError(f"unknown threshold_fn {kind!r}; choose one of {THRESHOLD_FNS}")


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask_real: torch.Tensor, threshold: float, kind: str) -> torch.Tensor:
        return quantize(mask_real, threshold, kind)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


def binarizer(mask_real: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """``1 if mask_real > threshold else 0`` with a straight-through gradient."""
    return _StraightThrough.apply(mask_real, threshold, "binarizer")


def ternarizer(mask_real: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """``-1 if mask_real < 0``, ``+1 if mask_real > threshold``, else 0; straight-through."""
    return _StraightThrough.apply(mask_real, threshold, "ternarizer")


def _rescale(grad: torch.Tensor, weight: torch.Tensor, rescale: str) -> torch.Tensor:
    """Mask gradient ``grad_W_eff * W``, optionally divided by |W| (reference-code option).

    ``individual`` divides element-wise by |W|: ``g * W / |W| = g * sign(W)``, which is also
    well defined where W == 0 (the plain gradient is 0 there).
    """
    if rescale == "none":
        return grad * weight
    if rescale == "average":
        return grad * (weight / weight.abs().mean().clamp_min(torch.finfo(weight.dtype).tiny))
    if rescale == "individual":
        return grad * weight.sign()
    raise ValueError(f"unknown grad_rescale {rescale!r}; choose one of {GRAD_RESCALES}")


class _MaskedWeight(torch.autograd.Function):
    """``W_eff = W * Q(mask_real)`` in one node: saves only tensors that already exist."""

    @staticmethod
    def forward(ctx, weight, mask_real, threshold: float, kind: str, rescale: str):
        ctx.save_for_backward(weight)
        ctx.rescale = rescale
        if kind == "binarizer":
            return torch.where(mask_real > threshold, weight, 0.0)
        return weight * quantize(mask_real, threshold, kind).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_mask = None
        if ctx.needs_input_grad[1]:
            grad_mask = _rescale(grad_output, weight, ctx.rescale)
        return None, grad_mask, None, None, None


def masked_weight(
    weight: torch.Tensor,
    mask_real: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_fn: str = "binarizer",
    grad_rescale: str = "none",
) -> torch.Tensor:
    """Effective weight ``W * M``; the pretrained ``weight`` never receives a gradient."""
    return _MaskedWeight.apply(weight, mask_real, threshold, threshold_fn, grad_rescale)
