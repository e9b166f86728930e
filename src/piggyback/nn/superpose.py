"""Masked layers that compute, for a while, with something other than their own mask.

Task inference needs two such views of a masked network (SupSup, Wortsman et al. 2020):

- :func:`superposed`: every masked weight computes with ``W ⊙ Σ_i α_i M_i``, a mixture of
  several tasks' masks, differentiable in the mixing weights ``α`` (and only in them);
- :func:`pretrained_weights`: every masked weight computes with ``W`` itself, the
  pretrained network, whatever mask is loaded.

Both shadow each :class:`~piggyback.nn.layers.WeightMask`'s ``effective_weight`` on the
instance for the duration of a ``with`` block, so the masked layers (their own forwards and
every attribute read) pick the view up without any change to ``layers.py``; on exit the
layer is exactly as before (``mask_real`` is never written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from piggyback.nn.convert import masked_weights
from piggyback.nn.layers import WeightMask

_SLOT = "effective_weight"


class _Superposed(torch.autograd.Function):
    """``W ⊙ Σ_i α_i M_i`` with a gradient for ``α`` only; masks stay int8 ([T, *W.shape]).

    Keeping the stack as int8 costs T bytes per weight instead of 4T for float copies, and
    the backward needs no saved float tensor: ``dL/dα_i = Σ (dL/dW_eff ⊙ W ⊙ M_i)``.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, alphas: torch.Tensor, stack: torch.Tensor):
        ctx.save_for_backward(weight, stack)
        mixed = torch.zeros_like(weight)
        for alpha, mask in zip(alphas.to(weight.dtype), stack, strict=True):
            mixed.add_(mask.to(weight.dtype) * alpha)
        return mixed.mul_(weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, stack = ctx.saved_tensors
        scaled = grad_output * weight
        grads = torch.stack([(scaled * mask.to(scaled.dtype)).sum() for mask in stack])
        return None, grads, None


@contextmanager
def _shadowed(views: Mapping[WeightMask, Callable[..., torch.Tensor]]) -> Iterator[None]:
    try:
        for mask, view in views.items():
            mask.__dict__[_SLOT] = view  # the instance attribute wins over the method
        yield
    finally:
        for mask in views:
            mask.__dict__.pop(_SLOT, None)


@contextmanager
def superposed(
    model: nn.Module, stacks: Mapping[str, torch.Tensor], alphas: torch.Tensor
) -> Iterator[None]:
    """Inside the block, masked weight ``name`` computes with ``W ⊙ Σ_i alphas[i] stacks[name][i]``.

    ``stacks`` maps every masked weight's name (as :func:`masked_weights` gives it) to its
    tasks' quantised masks stacked on a new first dimension (int8 holds 0/1 and -1/0/1);
    ``alphas`` has one entry per task and may require grad.
    """
    layers = dict(masked_weights(model))
    if set(layers) != set(stacks):
        diff = sorted(set(layers) ^ set(stacks))[:5]
        raise ValueError(f"mask stacks do not match the model's masked weights: {diff}")
    views = {}
    for name, mask in layers.items():
        stack = stacks[name]
        if tuple(stack.shape[1:]) != tuple(mask.weight.shape) or len(stack) != len(alphas):
            raise ValueError(
                f"mask stack for {name!r} has shape {tuple(stack.shape)}; expected "
                f"({len(alphas)}, *{tuple(mask.weight.shape)})"
            )

        def view(*, owns_grad: bool = False, mask=mask, stack=stack) -> torch.Tensor:
            return _Superposed.apply(mask.weight, alphas, stack)

        views[mask] = view
    with _shadowed(views):
        yield


@contextmanager
def pretrained_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block, every masked weight computes with its unmasked tensor ``W``."""
    views = {}
    for _, mask in masked_weights(model):

        def view(*, owns_grad: bool = False, mask=mask) -> torch.Tensor:
            return mask.weight

        views[mask] = view
    with _shadowed(views):
        yield
