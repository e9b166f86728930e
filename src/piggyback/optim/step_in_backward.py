"""An optimizer whose step runs inside the backward pass, one parameter at a time.

Each parameter gets its own inner optimizer (e.g. ``torch.optim.Adam``), stepped by a
``register_post_accumulate_grad_hook`` as soon as that parameter's gradient is complete;
the gradient is then dropped (``grad = None``). So gradients never all exist at once: for
Piggyback, whose masks are as large as the network, that removes one weight-sized tensor per
mask from the training peak (the PyTorch tutorial "How to save memory by fusing the optimizer
step into the backward pass"). Adam and SGD update each tensor independently, so the masks
learned are bit-identical to the normal step's (``tests/optim/test_step_in_backward.py``).

Use it from a config, wrapping the method's optimizer::

    method:
      optimizer:
        _target_: piggyback.optim.StepInBackward
        _partial_: true
        optimizer: {_target_: torch.optim.Adam, _partial_: true, fused: true}

What it cannot do: gradient clipping or accumulation over several batches
(``trainer.gradient_clip_val`` / ``accumulate_grad_batches``: the step has already happened
when Lightning would act on the gradients), and methods that edit gradients after backward
(PackNet, CPG); gradients are None after backward. The wrapper's ``param_groups`` are what a
scheduler or LR monitor sees; they are copied into the inner optimizers before each step.
Its ``state_dict`` has the usual layout, so checkpoints save and resume as usual.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["StepInBackward"]

_OWNERS = WeakTensorKeyDictionary()
"""Which optimizer steps each parameter in backward: the newest one built over it."""


class StepInBackward(torch.optim.Optimizer):
    """``optimizer`` (a factory taking param groups) stepped per parameter during backward."""

    def __init__(
        self,
        params: Iterable[Any],
        optimizer: Callable[..., torch.optim.Optimizer],
    ) -> None:
        probe = optimizer([torch.zeros(1, requires_grad=True)])
        super().__init__(params, dict(probe.defaults))
        self._inner: dict[torch.Tensor, tuple[torch.optim.Optimizer, dict[str, Any]]] = {}
        self._handles: dict[torch.Tensor, Any] = {}
        for group in self.param_groups:
            for param in group["params"]:
                if not param.requires_grad:
                    continue
                hparams = {k: v for k, v in group.items() if k != "params"}
                inner = optimizer([{"params": [param], **hparams}])
                inner.state[param] = self.state[param]  # one state dict, seen by both
                self._inner[param] = (inner, group)
                self._take_over(param)

    def _take_over(self, param: torch.Tensor) -> None:
        """Become the one optimizer that steps ``param`` in backward.

        The hook outlives its optimizer: it sits on the parameter, and a task sequence
        builds a new optimizer per task over masks that may be the same tensors. Two hooks
        would step the parameter twice, and the older one (first in line) would also drop
        the gradient before the newer one sees it, so the new task would train with the
        old task's state and decayed lr. So the newest optimizer removes the older one's
        hook, and a hook holds its optimizer only weakly (an optimizer that is gone steps
        nothing and keeps no state alive).
        """
        previous = _OWNERS.get(param)
        older = previous() if previous is not None else None
        if older is not None and param in older._handles:
            older._handles.pop(param).remove()
        ref = weakref.ref(self)
        _OWNERS[param] = ref

        def hook(p: torch.Tensor) -> None:
            owner = ref()
            if owner is not None:
                owner._step_one(p)

        self._handles[param] = param.register_post_accumulate_grad_hook(hook)

    def _step_one(self, param: torch.Tensor) -> None:
        inner, group = self._inner[param]
        inner.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        inner.step()
        param.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (forward and backward, which step every parameter); without one,
        nothing is left to do: the backward pass already stepped."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are dropped after each parameter's step; clear any left over anyway."""
        super().zero_grad(set_to_none=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # load_state_dict made new state and param-group dicts: point every inner optimizer
        # at them, or a resumed run keeps stepping with the lr of the run's start (a
        # scheduler only ever updates the new groups)
        for group in self.param_groups:
            for param in group["params"]:
                if param in self._inner:
                    inner, _ = self._inner[param]
                    self._inner[param] = (inner, group)
                    inner.state[param] = self.state[param]
