"""Keep ``W * M`` out of autograd's saved tensors: rebuild it in the backward pass instead.

A conv, linear or attention op saves its weight input to compute its input gradient. For a
masked layer that input is ``W * M``, a fresh weight-sized tensor per layer, so every masked
weight is held a second time from the forward to the backward pass, when the training peak
is reached (fine-tuning saves ``W`` itself, which exists anyway). On ViT-B/16 at 224 px that
is 330 MiB, a third of Piggyback's excess over fine-tuning (benchmarks/README.md).

Inside :func:`recompute_masked_weights`, each effective weight carries a small recipe (its
:class:`~piggyback.nn.layers.WeightMask` and the versions of the tensors it is made from),
and a ``torch.autograd.graph.saved_tensors_hooks`` pair keeps the recipe instead of the
tensor; the backward pass rebuilds ``W * M`` (one elementwise pass per masked weight,
bit-identical) when it needs it; a saved view of it (``F.linear`` saves ``W_eff.t()``)
is rebuilt as the same view. Every read is covered, wherever it happens (a module's own
forward, ``nn.MultiheadAttention`` reading ``in_proj_weight`` and ``out_proj.weight``, a
parent module calling ``F.linear(x, child.weight)``). Not covered, and left as they are:
tensors derived from ``W * M`` (autocast's low-precision copy, a transpose saved by a custom
op), and code inside another ``saved_tensors_hooks`` context (activation checkpointing), whose
hooks take precedence. Under ``torch.compile`` it does nothing: the compiler's partitioner
decides what to save.

Why not ``torch.utils.checkpoint``: it recomputes the whole checkpointed function, i.e. the
conv or matmul as well, where only the cheap elementwise ``W * M`` needs recomputing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["mark_recomputable", "recompute_masked_weights", "recomputing"]

_RECIPE_ATTR = "_piggyback_recipe"
_state = threading.local()


class Recipe:
    """How to rebuild one effective weight, and the state it must be rebuilt from.

    ``rebuild`` returns the tensor; ``versions`` returns a snapshot (tensor versions, ids,
    thresholds) that must not change between the forward and the backward pass: an in-place
    change of a mask or weight in between is an error, as it is for any tensor autograd
    saves. Holds no reference to the effective weight itself (that is the point).
    """

    __slots__ = ("rebuild", "snapshot", "versions")

    def __init__(self, rebuild: Callable[[], torch.Tensor], versions: Callable[[], tuple]) -> None:
        self.rebuild = rebuild
        self.versions = versions
        self.snapshot = versions()

    def __call__(self) -> torch.Tensor:
        if self.versions() != self.snapshot:
            raise RuntimeError(
                "a mask (or its weight, threshold or scale) was modified between the forward "
                "and the backward pass, so the W * M of the forward cannot be rebuilt; step "
                "the optimizer after backward, or train with model.recompute_masked_weights="
                "false"
            )
        with torch.no_grad():
            return self.rebuild()


def recomputing() -> bool:
    """Whether effective weights built now should carry a recipe (inside the context)."""
    return getattr(_state, "depth", 0) > 0


def mark_recomputable(
    tensor: torch.Tensor,
    rebuild: Callable[[], torch.Tensor],
    versions: Callable[[], tuple],
) -> torch.Tensor:
    """Attach a recipe to ``tensor`` when inside :func:`recompute_masked_weights`."""
    if recomputing() and tensor.requires_grad:
        setattr(tensor, _RECIPE_ATTR, Recipe(rebuild, versions))
    return tensor


class _View:
    """A saved view of an effective weight (``F.linear`` saves ``W_eff.t()``), rebuilt as the
    same strided view of the rebuilt base."""

    __slots__ = ("base_stride", "offset", "recipe", "size", "stride")

    def __init__(self, recipe: Recipe, base: torch.Tensor, view: torch.Tensor) -> None:
        self.recipe = recipe
        self.base_stride = base.stride()
        self.size, self.stride = view.size(), view.stride()
        self.offset = view.storage_offset()

    def __call__(self) -> torch.Tensor:
        base = self.recipe()
        if base.stride() != self.base_stride:  # the same computation gives the same layout
            raise RuntimeError("a rebuilt masked weight has another memory layout than before")
        return base.as_strided(self.size, self.stride, self.offset)


def _pack(saved: torch.Tensor):
    recipe = getattr(saved, _RECIPE_ATTR, None)
    if recipe is not None:
        return recipe
    base = saved._base
    if base is not None:
        recipe = getattr(base, _RECIPE_ATTR, None)
        if recipe is not None:
            return _View(recipe, base, saved)
    return saved


def _unpack(packed):
    return packed() if isinstance(packed, Recipe | _View) else packed


@contextmanager
def recompute_masked_weights(enabled: bool = True) -> Iterator[None]:
    """Forward passes run inside save recipes, not copies, of the masked weights they use.

    No-op when ``enabled`` is false, without autograd, or while ``torch.compile`` traces.
    """
    if not enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _state.depth -= 1
