"""Threshold functions with the straight-through estimator of the Piggyback paper.

The forward pass quantises the real-valued mask; the backward pass pretends the quantiser
is the identity, so ``dL/dmask_real = dL/dM``. Combined with ``W_eff = W * M`` that gives
``dL/dmask_real = dL/dW_eff * W`` (PAPER.md). ``masked_weight`` fuses both steps into one
autograd node so a training step stores no extra copy of the mask or of ``W * M``.

Speed notes (CPU, measured with ``benchmarks/run.py``): on a training step the mask adds
only elementwise passes over the weights, and on CPU those passes cost mostly memory
allocation (first-touch page faults), not arithmetic. So the binary forward builds ``W * M``
as ``sign(threshold(mask_real)) * W`` in one freshly allocated tensor that is then updated in
place (about 2.5x cheaper than ``where(mask_real > tau, W, 0)``, which allocates a bool
temporary and runs a slow select kernel), and the backward reuses the incoming gradient
buffer for ``dL/dW_eff * W`` when it is safe to (see ``_MaskedWeight.backward``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 5e-3
ThresholdName = Literal["binarizer", "ternarizer"]
GradRescale = Literal["none", "average", "individual"]
THRESHOLD_FNS: tuple[str, ...] = ("binarizer", "ternarizer")
GRAD_RESCALES: tuple[str, ...] = ("none", "average", "individual")


def _binary(mask_real: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(mask_real > threshold)`` as 0/1 in ``mask_real``'s dtype, in a fresh tensor.

    ``threshold`` keeps values above ``threshold`` and writes 0 elsewhere (NaN included, as
    ``>`` does); for ``threshold >= 0`` every kept value is positive, so ``sign_`` turns it
    into exactly 1. That is two float passes and one allocation instead of a bool temporary
    plus a dtype conversion. A negative threshold would keep negative values, hence the
    fallback.
    """
    if threshold >= 0 and mask_real.is_floating_point():
        return F.threshold(mask_real, threshold, 0.0).sign_()
    return (mask_real > threshold).to(mask_real.dtype)


def quantize(mask_real: torch.Tensor, threshold: float, kind: str) -> torch.Tensor:
    """Forward rule of both quantisers, in ``mask_real``'s dtype (no gradient)."""
    if kind == "binarizer":
        return _binary(mask_real, threshold)
    if kind == "ternarizer":
        ones = _binary(mask_real, threshold)
        return ones.sub_((mask_real < 0).to(mask_real.dtype))
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


def _rescale(
    grad: torch.Tensor, weight: torch.Tensor, rescale: str, inplace: bool = False
) -> torch.Tensor:
    """Mask gradient ``grad_W_eff * W``, optionally divided by |W| (reference-code option).

    ``individual`` divides element-wise by |W|: ``g * W / |W| = g * sign(W)``, which is also
    well defined where W == 0 (the plain gradient is 0 there). ``inplace`` writes the result
    into ``grad`` (the caller has checked that nobody else can see that buffer).
    """
    factor = _rescale_factor(weight, rescale)
    return grad.mul_(factor) if inplace else grad * factor


def _rescale_factor(weight: torch.Tensor, rescale: str) -> torch.Tensor:
    """What ``dL/dW_eff`` is multiplied by to give the mask gradient (see :func:`_rescale`)."""
    if rescale == "none":
        return weight
    if rescale == "average":
        return weight / weight.abs().mean().clamp_min(torch.finfo(weight.dtype).tiny)
    if rescale == "individual":
        return weight.sign()
    raise ValueError(f"unknown grad_rescale {rescale!r}; choose one of {GRAD_RESCALES}")


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` owns exactly one memory slot (safe to write in place)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


class _MaskedWeight(torch.autograd.Function):
    """``W_eff = W * Q(mask_real)`` in one node: saves only tensors that already exist."""

    @staticmethod
    def forward(ctx, weight, mask_real, threshold: float, kind: str, rescale: str, owns_grad):
        ctx.save_for_backward(weight, mask_real)  # both exist already: nothing is copied
        ctx.rescale = rescale
        ctx.owns_grad = owns_grad
        ctx.quantizer = (threshold, kind)
        quantized = quantize(mask_real, threshold, kind)
        if quantized.dtype != weight.dtype:
            quantized = quantized.to(weight.dtype)
        # ``quantized`` is a fresh tensor: multiplying in place makes it W * M without a
        # second weight-sized allocation. 1 * W == W exactly; 0 * W is a (signed) zero.
        return quantized.mul_(weight)

    @staticmethod
    def backward(ctx, grad_output):
        weight, mask_real = ctx.saved_tensors
        grad_mask = grad_weight = None
        if ctx.needs_input_grad[0]:
            # Methods that train the weights under a fixed mask (PackNet): dW = dW_eff * M.
            # Computed before the mask gradient, which may reuse ``grad_output`` in place.
            mask = quantize(mask_real.detach(), *ctx.quantizer)
            grad_weight = grad_output * mask.to(grad_output.dtype)
        if ctx.needs_input_grad[1]:
            # The masked layers feed W_eff straight into conv/linear, whose backward hands us
            # a freshly computed weight gradient that no other node holds: overwrite it with
            # the mask gradient instead of allocating another weight-sized tensor. Any other
            # caller (owns_grad=False), double backward, or odd strides: out of place.
            inplace = (
                ctx.owns_grad
                and not grad_output.requires_grad
                and grad_output.dtype == weight.dtype
                and grad_output.shape == weight.shape
                and _non_overlapping_and_dense(grad_output)
            )
            grad_mask = _rescale(grad_output, weight, ctx.rescale, inplace)
        return grad_weight, grad_mask, None, None, None, None


def traceable_masked_weight(
    weight: torch.Tensor,
    mask_real: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_fn: str = "binarizer",
    grad_rescale: str = "none",
) -> torch.Tensor:
    """``W * Q(mask_real)`` with the straight-through gradient, written in plain tensor ops.

    What ``torch.compile`` traces instead of :class:`_MaskedWeight`: Inductor fuses the
    threshold, the product and the backward's ``dL/dW_eff * W`` into their neighbours, and its
    partitioner decides what to keep for backward. ``ste = mask_real - mask_real.detach()`` is
    exactly 0 in value (finite masks) and the identity in gradient, so the forward value is
    exactly ``W * Q`` and ``dL/dmask_real = dL/dW_eff * W`` (one multiply, as the Function
    does), or ``dL/dW_eff * factor`` under a ``grad_rescale``; ``W`` (PackNet) gets
    ``dL/dW_eff * Q``. Same values and gradients as the Function, bit for bit in eager mode
    (``tests/nn/test_compile.py``), except that a NaN/inf ``mask_real`` gives NaN instead of
    0. Eager training keeps the Function, which allocates less (see its docstring).
    """
    hard = quantize(mask_real.detach(), threshold, threshold_fn).to(weight.dtype)
    ste = mask_real - mask_real.detach()
    if grad_rescale == "none":
        return weight * (hard + ste)
    factor = _rescale_factor(weight.detach(), grad_rescale)
    return weight * hard + ste * factor


def masked_weight(
    weight: torch.Tensor,
    mask_real: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_fn: str = "binarizer",
    grad_rescale: str = "none",
    *,
    owns_grad: bool = False,
) -> torch.Tensor:
    """Effective weight ``W * M``; ``weight`` gets ``dL/dW_eff * M`` only if it requires grad.

    ``owns_grad=True`` promises that the result feeds exactly one op whose backward returns
    a fresh gradient buffer (conv, linear), so the mask gradient may reuse that buffer. The
    masked layers pass it from ``forward``; leave it off when the result goes anywhere else.
    Under ``torch.compile`` the same computation is traced as plain tensor ops
    (:func:`traceable_masked_weight`), which the compiler can fuse.
    """
    if torch.compiler.is_compiling():
        return traceable_masked_weight(weight, mask_real, threshold, threshold_fn, grad_rescale)
    return _MaskedWeight.apply(weight, mask_real, threshold, threshold_fn, grad_rescale, owns_grad)


DEFAULT_TEMPERATURE = 1e-2


class _SoftmaxTrick(torch.autograd.Function):
    """Hard 0/1 forward; backward through the temperature softmax that relaxes it (KSM).

    KSM (Yang et al., CVPR 2021) turns the real mask into a binary one through a logistic
    function followed by a two-way softmax with temperature ``T``: ``p = sigmoid(m)``, then
    ``softmax([log p, log(1 - p)] / T)[0] = sigmoid(logit(p) / T) = sigmoid(m / T)``, which
    tends to the step function as ``T -> 0``. We centre it on the threshold,
    ``b_T(m) = sigmoid((m - tau) / T)``, keep the step itself in the forward pass (so the
    network trained is bit for bit the 1-bit network stored and evaluated) and use the exact
    derivative of the relaxation, ``b_T'(m) = b_T (1 - b_T) / T``, in the backward pass:
    a real gradient that is largest at the threshold and fades for units far from it,
    instead of the identity that the plain straight-through estimator passes back.
    """

    @staticmethod
    def forward(ctx, mask_real: torch.Tensor, threshold: float, temperature: float):
        ctx.save_for_backward(mask_real)
        ctx.threshold, ctx.temperature = threshold, temperature
        return _binary(mask_real, threshold)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (mask_real,) = ctx.saved_tensors
        relaxed = torch.sigmoid((mask_real - ctx.threshold) / ctx.temperature)
        return grad_output * relaxed * (1 - relaxed) / ctx.temperature, None, None


def softmax_binarizer(
    mask_real: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """``1 if mask_real > threshold else 0``; gradient of KSM's temperature-softmax relaxation."""
    return _SoftmaxTrick.apply(mask_real, threshold, temperature)


class _UnitMaskedWeight(torch.autograd.Function):
    """``W * U`` where ``U`` (one value per mask unit) broadcasts onto ``W``.

    The unit gradient is the weight-shaped mask gradient ``dL/dW_eff * W`` (optionally
    rescaled as in :func:`_rescale`) summed over the weights each unit gates.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, units: torch.Tensor, rescale: str) -> torch.Tensor:
        ctx.save_for_backward(weight, units)
        ctx.rescale = rescale
        return weight * units.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, units = ctx.saved_tensors
        grad_weight = grad_units = None
        if ctx.needs_input_grad[0]:
            grad_weight = grad_output * units.to(grad_output.dtype)
        if ctx.needs_input_grad[1]:
            grad_units = _rescale(grad_output, weight, ctx.rescale).sum_to_size(units.shape)
        return grad_weight, grad_units, None


def unit_masked_weight(
    weight: torch.Tensor,
    mask_real: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_fn: str = "binarizer",
    grad_rescale: str = "none",
    *,
    scale: torch.Tensor | None = None,
    temperature: float | None = None,
) -> torch.Tensor:
    """``W * Q(mask_real) [* scale]`` for a mask of reduced shape that broadcasts onto ``W``.

    ``temperature`` set: the binary mask gets KSM's softmax-trick gradient
    (:func:`softmax_binarizer`); otherwise the plain straight-through estimate. ``scale``
    (same shape as ``mask_real``) is KSM's learned real factor per unit; it gets the exact
    gradient ``sum(dL/dW_eff * W) * Q``.
    """
    if temperature is not None:
        if threshold_fn != "binarizer":
            raise ValueError("soft (KSM) masks are binary: use threshold_fn 'binarizer'")
        units = softmax_binarizer(mask_real, threshold, temperature)
    else:
        units = _StraightThrough.apply(mask_real, threshold, threshold_fn)
    if scale is not None:
        units = units * scale
    return _UnitMaskedWeight.apply(weight, units, grad_rescale)
