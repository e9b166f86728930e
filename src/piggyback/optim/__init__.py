"""Optimizers for lean mask training; the paper's Adam (``torch.optim.Adam``) stays the default.

- :class:`StepInBackward`: any optimizer stepped per parameter inside the backward pass, so
  the masks' gradients never all exist at once (exact: same masks as the normal step).
- :class:`LeanAdam`: Adam's update with a bfloat16 first moment (Adam-like on masks, 1.5
  weight-sized tensors of state instead of 2) or also a factored second moment (0.5, but
  not Adam-like on masks; see its docstring).
"""

from piggyback.optim.lean_adam import LeanAdam
from piggyback.optim.step_in_backward import StepInBackward

__all__ = ["LeanAdam", "StepInBackward"]
