"""Optimizers for lean mask training; the paper's Adam (``torch.optim.Adam``) stays the default.

- :class:`StepInBackward`: any optimizer stepped per parameter inside the backward pass, so
  the masks' gradients never all exist at once (exact: same masks as the normal step).
- :class:`FactoredAdam`: Adam whose second moment is factored into row and column
  statistics (Adafactor's estimate), optionally with a bfloat16 first moment: one or one half
  weight-sized tensor of state per mask instead of two (not exact; see its docstring for
  the accuracy checks).
"""

from piggyback.optim.factored_adam import FactoredAdam
from piggyback.optim.step_in_backward import StepInBackward

__all__ = ["FactoredAdam", "StepInBackward"]
