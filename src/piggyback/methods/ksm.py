"""KSM: kernel-wise soft masks (Yang et al., CVPR 2021), Piggyback's kernel-granular successor.

One binary mask value per k x k convolution kernel instead of per weight, times a learned
real scale per kernel, the binary part trained with the paper's softmax trick. The mask
mechanics live in ``piggyback.nn`` (``granularity="kernel"``, ``soft=True``; see
:class:`~piggyback.nn.layers.WeightMask` for how we follow the paper and where we differ);
this class only sets them as the method's defaults and gives its artifacts their own name,
so reports and ``experiment=compare`` show it next to Piggyback. Everything else (training,
storage, task switching, no forgetting) is Piggyback's.
"""

from __future__ import annotations

from typing import Any

from piggyback.methods.piggyback import Piggyback


class KSM(Piggyback):
    """Piggyback with kernel-granular soft masks (``method.mask`` overrides them)."""

    name = "ksm"
    default_mask: dict[str, Any] = {"granularity": "kernel", "soft": True}
