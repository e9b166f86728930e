"""Conv and linear layers whose frozen pretrained weight is gated by a learned mask.

They subclass the torch layers they replace, so every conv option (stride, padding,
padding_mode, dilation, groups, bias) and every ``isinstance`` check keeps working, and
``weight``/``bias`` keep their state-dict names (fingerprints and checkpoints stay stable).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from piggyback.nn.threshold import (
    DEFAULT_THRESHOLD,
    GRAD_RESCALES,
    THRESHOLD_FNS,
    masked_weight,
    quantize,
)

MASK_INITS: tuple[str, ...] = ("1s", "uniform", "weight_based_1s")
DEFAULT_MASK_SCALE = 1e-2


def adopt_state(layer: nn.Module, source: nn.Module) -> None:
    """Take over every attribute of ``source`` (options, weight, bias, hooks) without copying
    tensors; container dicts are copied so the new layer never aliases the old one's."""
    for key, value in source.__dict__.items():
        layer.__dict__[key] = type(value)(value) if isinstance(value, dict) else value


class MaskedLayerMixin:
    """Mask state and rules shared by every masked layer type."""

    weight: nn.Parameter
    mask_real: nn.Parameter
    threshold: float
    threshold_fn: str
    grad_rescale: str

    @classmethod
    def _wrap(
        cls,
        source: nn.Module,
        *,
        mask_init: str = "1s",
        mask_scale: float = DEFAULT_MASK_SCALE,
        threshold: float = DEFAULT_THRESHOLD,
        threshold_fn: str = "binarizer",
        grad_rescale: str = "none",
    ):
        layer = cls.__new__(cls)
        adopt_state(layer, source)
        layer._setup_mask(
            mask_init=mask_init,
            mask_scale=mask_scale,
            threshold=threshold,
            threshold_fn=threshold_fn,
            grad_rescale=grad_rescale,
        )
        return layer

    def _setup_mask(
        self,
        *,
        mask_init: str,
        mask_scale: float,
        threshold: float,
        threshold_fn: str,
        grad_rescale: str,
    ) -> None:
        if threshold_fn not in THRESHOLD_FNS:
            raise ValueError(
                f"unknown threshold_fn {threshold_fn!r}; choose one of {THRESHOLD_FNS}"
            )
        if grad_rescale not in GRAD_RESCALES:
            raise ValueError(
                f"unknown grad_rescale {grad_rescale!r}; choose one of {GRAD_RESCALES}"
            )
        self.threshold = float(threshold)
        self.threshold_fn = threshold_fn
        self.grad_rescale = grad_rescale
        self.weight.requires_grad_(False)
        if getattr(self, "bias", None) is not None:
            self.bias.requires_grad_(False)
        self.mask_real = nn.Parameter(torch.empty_like(self.weight), requires_grad=True)
        self.reset_mask(mask_init, mask_scale)

    @torch.no_grad()
    def reset_mask(self, mask_init: str = "1s", mask_scale: float = DEFAULT_MASK_SCALE) -> None:
        """Re-initialise ``mask_real``; ``1s`` (scale > threshold) starts at the pretrained net."""
        if mask_init == "1s":
            self.mask_real.fill_(mask_scale)
        elif mask_init == "uniform":
            self.mask_real.uniform_(-mask_scale, mask_scale)
        elif mask_init == "weight_based_1s":
            self.mask_real.fill_(self.weight.abs().mean().item())
        else:
            raise ValueError(f"unknown mask_init {mask_init!r}; choose one of {MASK_INITS}")

    def mask(self) -> torch.Tensor:
        """The current thresholded mask (same shape and dtype as the weight)."""
        return quantize(self.mask_real.detach(), self.threshold, self.threshold_fn)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Load a quantised mask (0/1 or -1/0/1) so that ``mask()`` returns exactly it.

        Storing the mask's own values as ``mask_real`` works for both quantisers: 1 > τ,
        0 ≤ τ and ≥ 0, and -1 < 0.
        """
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit weight of shape "
                f"{tuple(self.weight.shape)}"
            )
        self.mask_real.copy_(mask)  # converts dtype (and device) in the same pass

    def effective_weight(self, *, owns_grad: bool = False) -> torch.Tensor:
        """``W * M`` with the straight-through mask gradient.

        ``forward`` passes ``owns_grad=True`` because it feeds the result straight into
        conv/linear, which lets the backward reuse their weight-gradient buffer for the mask
        gradient (see :func:`masked_weight`); other callers get the always-safe default.
        """
        return masked_weight(
            self.weight,
            self.mask_real,
            self.threshold,
            self.threshold_fn,
            self.grad_rescale,
            owns_grad=owns_grad,
        )

    def mask_extra_repr(self) -> str:
        return f"threshold_fn={self.threshold_fn}, threshold={self.threshold:g}"


class MaskedConv2d(MaskedLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` computing with ``W * M``; build it with :meth:`from_conv`."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **mask_options: Any) -> MaskedConv2d:
        """Wrap ``conv`` (tensors shared, not copied); options as in :meth:`_wrap`."""
        return cls._wrap(conv, **mask_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(owns_grad=True), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.mask_extra_repr()}"


class MaskedLinear(MaskedLayerMixin, nn.Linear):
    """``nn.Linear`` computing with ``W * M``; build it with :meth:`from_linear`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, **mask_options: Any) -> MaskedLinear:
        """Wrap ``linear`` (tensors shared, not copied); options as in :meth:`_wrap`."""
        return cls._wrap(linear, **mask_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(owns_grad=True), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.mask_extra_repr()}"


MaskedLayer = MaskedConv2d | MaskedLinear
