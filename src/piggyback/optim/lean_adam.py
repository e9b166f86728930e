"""Adam with a smaller state: Piggyback's optimizer at a fraction of the memory.

Piggyback trains one real-valued mask per weight with Adam, whose two moments are each as
large as the network: on ViT-B/16 that is 660 MiB of state where fine-tuning with SGD keeps
one 330 MiB momentum buffer (benchmarks/README.md, "Peak memory"). This optimizer keeps
Adam's update rule, ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with Adam's bias corrections,
so ``lr`` keeps its meaning for masks (a mask moves by at most about ``lr`` per step, which
sets how soon it flips) and the paper's learning rates carry over, and shrinks the state:

- ``first_moment_dtype=torch.bfloat16`` stores the first moment in half the bytes. Its
  running mean moves by 10 % of the gradient per step, far above bfloat16's 0.4 %
  resolution, so rounding it costs nothing measurable: on the demo's masks the per-step
  update matches Adam's to the printed digits (median 0.609 lr, max 1.04 lr for both).
- ``second_moment_dtype=torch.bfloat16`` stores the second moment in half the bytes too.
  Its running mean moves by 0.1 % per step, below bfloat16's resolution, so nearest
  rounding would freeze it; it is rounded *stochastically* (up with probability equal to
  the distance, ``round_to_bfloat16_stochastically_``), which keeps its expectation. Over
  300 steps of mask-shaped gradients every step stays within 0.05 lr of Adam's and the
  masks within 1 lr (``tests/optim/test_lean_adam.py``). With both, the state is one
  weight-sized tensor per mask: what SGD with momentum keeps for fine-tuning.
- ``second_moment="factored"`` replaces the second moment of a tensor with two or more
  dimensions by Adafactor's estimate (Shazeer & Stern, 2018): running means of ``g**2``
  over the rows and over the columns of the tensor viewed as ``(shape[0], rest)``, and
  ``v ~= outer(row, col) / mean(row)``, ``out + fan-in`` numbers instead of
  ``out * fan-in``. Leaner still, but **not** Adam-like on masks: a mask's gradient is
  ``dL/dW_eff * W``, and ``W``'s element-wise pattern makes ``g**2`` far from rank one.
  Measured on the demo's masks (60 steps): the median step falls to 0.115 lr, single steps
  reach 18 lr, and 1.1 % of the weights are masked off where Adam has none yet. Use it
  only where the memory matters more than following the paper's dynamics.
- ``betas[0] = 0`` drops the first moment altogether (RMSprop with Adam's bias correction).

Not exact: the masks learned differ from Adam's in rounding. benchmarks/README.md records
the demo and Split-CIFAR-10 runs of ``method=piggyback_lean`` against Adam's run-to-run
spread; the paper's Adam stays the default (``conf/method/piggyback.yaml``).

Why not ``torch.optim.Adafactor`` (torch 2.5+) for the factored form: its step is relative,
scaled by the parameter's RMS and capped by ``1/sqrt(t)``, so the masks' flip schedule
would follow their own magnitude instead of ``lr``; it has no first moment; and it factors
the *last two* dimensions, so a 1 x 1 conv's mask (``out, in, 1, 1``) gets row and column
statistics that are each as large as the mask, twice Adam's second moment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["LeanAdam", "round_to_bfloat16_stochastically_"]

SECOND_MOMENTS = ("full", "factored")


def _dtype(name: str, value: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype from a config string (``"bfloat16"``) or a ``torch.dtype``."""
    if not isinstance(value, str):
        return value
    dtype = getattr(torch, value, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"LeanAdam: {name} {value!r} is not a torch floating-point dtype "
            "(e.g. bfloat16, float32)"
        )
    return dtype


NOISE_PERIOD = 8192
"""Length of one step's table of rounding noise, tiled over a tensor."""


def round_to_bfloat16_stochastically_(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Round float32 ``x`` in place to a neighbouring bfloat16 value, up with probability
    equal to the distance from the lower one (so ``E[round(x)] = x``).

    bfloat16 is float32's upper 16 bits: adding 16 uniform random low bits to the integer
    view and clearing the low half rounds up exactly when the carry reaches bit 16. torch
    has no stochastic-rounding cast. The noise is a table of ``NOISE_PERIOD`` uniform
    16-bit values drawn from ``seed``, tiled over ``x`` by a broadcast add: element ``i``
    gets ``table[i % NOISE_PERIOD]``, uniform, and a fresh table per seed (per step) makes
    each element's rounding independent from step to step; elements ``NOISE_PERIOD`` apart
    share their noise within one call, which leaves every one unbiased. Why a table: torch's
    CPU generator is a Mersenne twister, and a random number per element cost 64 ms a step
    on ResNet-18's 11.7 M mask weights (1 thread), more than Adam's whole step (42 ms); the
    table costs 0.5 ms. Finite, non-negative, contiguous inputs (a second moment); ``x``
    stays float32, holding bfloat16 values.
    """
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("round_to_bfloat16_stochastically_ takes a contiguous float32 tensor")
    bits = x.view(torch.int32).view(-1)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(
        0, 1 << 16, (NOISE_PERIOD,), dtype=torch.int32, device=x.device, generator=generator
    )
    whole = bits.numel() - bits.numel() % NOISE_PERIOD
    bits[:whole].view(-1, NOISE_PERIOD).add_(noise)
    bits[whole:].add_(noise[: bits.numel() - whole])
    bits.bitwise_and_(-(1 << 16))
    return x


def _factored(shape: torch.Size) -> bool:
    """Whether a tensor gets the factored second moment: two real dimensions at least."""
    return len(shape) >= 2 and shape[0] > 1 and math.prod(shape[1:]) > 1


class LeanAdam(torch.optim.Optimizer):
    """Adam's update with a smaller state (see the module docstring).

    ``first_moment_dtype``: ``None`` keeps the first moment in the parameter's dtype;
    ``torch.bfloat16`` (or ``"bfloat16"`` from a config) halves it. ``second_moment``:
    ``"full"`` (Adam's) or ``"factored"`` (Adafactor's row and column statistics);
    ``second_moment_dtype``: ``None``/``float32`` or ``bfloat16`` (stochastically rounded,
    full second moment only). With the defaults this is Adam, up to the order of rounding.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        second_moment: str = "full",
        first_moment_dtype: torch.dtype | str | None = None,
        second_moment_dtype: torch.dtype | str | None = None,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"LeanAdam: lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"LeanAdam: betas must be in [0, 1), got {tuple(betas)}")
        if not eps > 0:
            raise ValueError(f"LeanAdam: eps must be > 0, got {eps}")
        if second_moment not in SECOND_MOMENTS:
            raise ValueError(
                f"LeanAdam: second_moment {second_moment!r} is not one of {SECOND_MOMENTS}"
            )
        first_moment_dtype = _dtype("first_moment_dtype", first_moment_dtype)
        second_moment_dtype = _dtype("second_moment_dtype", second_moment_dtype)
        if second_moment_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                f"LeanAdam: second_moment_dtype {second_moment_dtype} is not float32 or "
                "bfloat16 (the ones stochastic rounding is written for)"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "second_moment": second_moment,
            "first_moment_dtype": first_moment_dtype,
            "second_moment_dtype": second_moment_dtype,
        }
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if state:
            # torch's load_state_dict casts float state to the parameter's dtype (so does
            # StepInBackward's): back to the stored dtype, losslessly (bf16 -> fp32 -> bf16)
            for key, dtype_key in (
                ("exp_avg", "first_moment_dtype"),
                ("exp_avg_sq", "second_moment_dtype"),
            ):
                dtype = group[dtype_key]
                if dtype is not None and key in state and state[key].dtype != dtype:
                    state[key] = state[key].to(dtype)
            return state
        state["step"] = 0
        if group["betas"][0] > 0:
            dtype = group["first_moment_dtype"] or p.dtype
            state["exp_avg"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.contiguous_format
            )
        if group["second_moment"] == "factored" and _factored(p.shape):
            rows = p.shape[0]
            state["exp_avg_sq_row"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(
                p.numel() // rows, dtype=torch.float32, device=p.device
            )
        else:
            dtype = group["second_moment_dtype"] or p.dtype
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.contiguous_format
            )
            if dtype != p.dtype:
                # drawn once from torch's (seeded) generator; the noise of step t is drawn
                # from seed + t, so a resumed run rounds exactly as the straight one
                state["rounding_seed"] = int(torch.randint(0, 2**31, ()).item())
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LeanAdam does not support sparse gradients")
                state = self._init_state(p, group)
                state["step"] += 1
                t = state["step"]
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                # Adam's sqrt(v / bias2) + eps as (sqrt(v) + eps * root2) / root2, the 1 /
                # root2 folded into the step size: one pass over the weights fewer
                root2 = math.sqrt(1 - beta2**t)
                if "exp_avg_sq_row" in state:
                    grad2d = grad.reshape(grad.shape[0], -1)
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    buffer = grad2d.float().square()  # reused below for sqrt(v_hat)
                    row.lerp_(buffer.mean(dim=1), 1 - beta2)
                    col.lerp_(buffer.mean(dim=0), 1 - beta2)
                    # sqrt(v) = sqrt(outer(row, col) / mean(row)): the square root of an
                    # outer product is the outer product of the square roots, so the
                    # weight-sized tensor is written once, into the buffer
                    scale = row.mean().clamp_min(1e-30).rsqrt()
                    torch.outer(row.sqrt().mul_(scale), col.sqrt(), out=buffer)
                    denom = buffer.view(grad.shape)
                elif state["exp_avg_sq"].dtype == grad.dtype:
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = state["exp_avg_sq"].sqrt()
                else:
                    exp_avg_sq = state["exp_avg_sq"].float()
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    seed = state["rounding_seed"] + t
                    round_to_bfloat16_stochastically_(exp_avg_sq, seed)
                    state["exp_avg_sq"].copy_(exp_avg_sq)  # exact: already bf16 values
                    denom = exp_avg_sq.sqrt_()
                denom.add_(group["eps"] * root2)
                if "exp_avg" in state:
                    exp_avg = state["exp_avg"]
                    # mixed-dtype in-place ops are 5-40x slower on CPU than a conversion:
                    # the bf16 running mean is updated in fp32 and stored back
                    mean = exp_avg if exp_avg.dtype == grad.dtype else exp_avg.to(grad.dtype)
                    mean.lerp_(grad, 1 - beta1)
                    if mean is not exp_avg:
                        exp_avg.copy_(mean)
                    numer, step_size = mean, group["lr"] * root2 / (1 - beta1**t)
                else:
                    numer, step_size = grad, group["lr"] * root2
                p.addcdiv_(numer, denom, value=-step_size)
        return loss
