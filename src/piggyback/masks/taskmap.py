"""An integer map of several tasks' binary masks over one weight tensor, entropy-coded.

WSN (Kang et al., ICML 2022) stores the binary masks of all its tasks as one integer per
weight, bit ``t - 1`` set when task ``t`` keeps the weight, and entropy-codes that map (Huffman
in its reference code, ``utils_huffman.py``). We code the same map one bit-plane per task,
each plane *given the planes before it*: the weights split into three contexts, those the
previous task keeps, those only older tasks keep, and those no earlier task keeps; each
context's bits have their own statistics (a task reuses much of its predecessor's mask, since
WSN's scores carry over, less of older masks, and few free weights), so each is coded on its
own with our gap/Rice codec (:func:`~piggyback.masks.codec.compress_mask`, which falls back to
raw 1-bit packing where that is smaller). By the chain rule the planes cost about
``H(M_t | M_{t-1}, M_1 ∨ … ∨ M_{t-1})`` each (measured on the demo: within 1 % of the
entropy given *all* earlier planes, which a Huffman code of the whole map approaches), and
never more than a few header bytes above one bit per weight per task.

Coding plane by plane is what lets each task's artifact hold just its own plane: decoding
task ``t``'s plane needs the union of the earlier planes, which a reader that adds tasks in
sequence order has already decoded.
"""

from __future__ import annotations

import torch

from piggyback.masks.codec import compress_mask, decompress_mask

__all__ = ["decode_plane", "encode_plane", "plane_bits", "task_map"]


def _contexts(used: torch.Tensor, previous: torch.Tensor | None) -> list[torch.Tensor]:
    """The three contexts, flat: kept by the previous task, by older tasks only, by none."""
    used = used.reshape(-1).bool().cpu()
    prev = torch.zeros_like(used) if previous is None else previous.reshape(-1).bool().cpu()
    if (prev & ~used).any():
        raise ValueError("the previous task's mask must lie within the earlier tasks' union")
    return [prev, used & ~prev, ~used]


def encode_plane(
    mask: torch.Tensor, used: torch.Tensor, previous: torch.Tensor | None = None
) -> tuple[bytes, ...]:
    """Task ``t``'s 0/1 ``mask`` coded given ``used`` (weights an earlier task keeps) and
    ``previous`` (task ``t - 1``'s mask): one stream per context, in flat order."""
    flat = mask.reshape(-1).bool().cpu()
    contexts = _contexts(used, previous)
    if flat.shape != contexts[0].shape:
        raise ValueError(f"mask of {flat.numel()} weights, context of {contexts[0].numel()}")
    return tuple(compress_mask(flat[c]) for c in contexts)


def decode_plane(
    streams: tuple[bytes, ...], used: torch.Tensor, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`encode_plane`: the mask (bool, ``used``'s shape)."""
    contexts = _contexts(used, previous)
    if len(streams) != len(contexts):
        raise ValueError(f"{len(streams)} streams for {len(contexts)} contexts")
    mask = torch.zeros_like(contexts[0])
    for stream, context in zip(streams, contexts, strict=True):
        mask[context] = decompress_mask(stream, int(context.sum()))
    return mask.reshape(used.shape)


def plane_bits(streams: tuple[bytes, ...]) -> int:
    """Bits one coded plane takes (headers and checksums included)."""
    return 8 * sum(len(s) for s in streams)


def task_map(masks: list[torch.Tensor]) -> torch.Tensor:
    """The integer map of ``masks`` (task 1 first): bit ``t - 1`` set where task ``t`` keeps a
    weight (int64, so at most 63 tasks)."""
    if len(masks) > 63:
        raise ValueError(f"an int64 map holds at most 63 tasks, got {len(masks)}")
    out = torch.zeros(masks[0].shape, dtype=torch.int64) if masks else torch.zeros(0)
    for t, mask in enumerate(masks):
        out |= mask.bool().cpu().to(torch.int64) << t
    return out
