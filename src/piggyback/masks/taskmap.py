"""An integer map of several tasks' binary masks over one weight tensor, entropy-coded.

WSN (Kang et al., ICML 2022) stores the binary masks of all its tasks as one integer per
weight, bit ``t - 1`` set when task ``t`` keeps the weight, and entropy-codes that map (Huffman
in its reference code, ``utils_huffman.py``). We code the same map one bit-plane per task,
each plane *given the planes before it*: the weights that some earlier task already keeps and
the weights that no earlier task keeps are two binary sequences with their own statistics (a
task reuses a different fraction of each), so each is coded on its own with our gap/Rice codec
(:func:`~piggyback.masks.codec.compress_mask`, which falls back to raw 1-bit packing where that
is smaller). By the chain rule the planes cost ``H(M_t | M_1 ∨ … ∨ M_{t-1})`` each, about the
Huffman code of the whole map when tasks mostly reuse or mostly avoid earlier weights, and
never more than a few header bytes above one bit per weight per task.

Coding plane by plane is what lets each task's artifact hold just its own plane: decoding
task ``t``'s plane needs the union of the earlier planes, which a reader that adds tasks in
sequence order has already decoded.
"""

from __future__ import annotations

import torch

from piggyback.masks.codec import compress_mask, decompress_mask

__all__ = ["decode_plane", "encode_plane", "plane_bits", "task_map"]


def encode_plane(mask: torch.Tensor, used: torch.Tensor) -> tuple[bytes, bytes]:
    """Task ``t``'s 0/1 ``mask`` coded given ``used`` (weights an earlier task keeps).

    Returns the streams over the used and over the other (free) weights, in flat order.
    """
    mask, used = mask.reshape(-1).bool().cpu(), used.reshape(-1).bool().cpu()
    if mask.shape != used.shape:
        raise ValueError(f"mask of {mask.numel()} weights, context of {used.numel()}")
    return compress_mask(mask[used]), compress_mask(mask[~used])


def decode_plane(streams: tuple[bytes, bytes], used: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_plane`: the mask (bool, ``used``'s shape)."""
    flat = used.reshape(-1).bool().cpu()
    mask = torch.zeros_like(flat)
    mask[flat] = decompress_mask(streams[0], int(flat.sum()))
    mask[~flat] = decompress_mask(streams[1], int((~flat).sum()))
    return mask.reshape(used.shape)


def plane_bits(streams: tuple[bytes, bytes]) -> int:
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
