"""Bit-packing of quantised masks: 1 bit per weight (binary) or 2 bits (ternary)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MASK_KINDS: tuple[str, ...] = ("binary", "ternary")


def mask_kind(threshold_fn: str) -> str:
    """The storage kind that a threshold function's masks need."""
    return {"binarizer": "binary", "ternarizer": "ternary"}[threshold_fn]


def packed_size(numel: int, kind: str = "binary") -> int:
    """Bytes that :func:`pack_mask` produces for ``numel`` weights."""
    bits = {"binary": 1, "ternary": 2}[kind]
    return (numel * bits + 7) // 8


def pack_mask(mask: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """Pack a 0/1 (or -1/0/1) mask into a flat ``uint8`` tensor.

    Binary masks use 1 bit per weight; ternary masks 2 bits (code 0 -> 0, 1 -> 1, 2 -> -1).
    ``kind=None`` picks binary when the values allow it. Values outside the kind's alphabet
    raise ``ValueError`` rather than being silently rounded.
    """
    flat = mask.detach().reshape(-1).to("cpu")
    if flat.dtype == torch.bool:
        values = flat.numpy().astype(np.uint8)
        kind = kind or "binary"
    else:
        values = flat.to(torch.float32).numpy()
        is_binary = bool(np.all((values == 0) | (values == 1)))
        kind = kind or ("binary" if is_binary else "ternary")
        allowed = (values == 0) | (values == 1) | ((values == -1) & (kind == "ternary"))
        if not np.all(allowed):
            bad = values[~allowed][:3]
            raise ValueError(f"{kind} mask contains values outside its alphabet, e.g. {bad}")
        values = np.where(values == -1, 2, values).astype(np.uint8)
    if kind == "binary":
        return torch.from_numpy(np.packbits(values, bitorder="little"))
    if kind == "ternary":
        pad = (-values.size) % 4
        quads = np.concatenate([values, np.zeros(pad, np.uint8)]).reshape(-1, 4)
        codes = quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)
        return torch.from_numpy(codes.astype(np.uint8))
    raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")


def unpack_mask(
    packed: torch.Tensor,
    shape: Sequence[int],
    kind: str = "binary",
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`pack_mask`; checks the byte count against ``shape``.

    ``dtype=None`` keeps the compact integer type (uint8 / int8), which is what a caller
    that copies into an existing tensor wants: ``copy_`` converts in the same pass.
    """
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    data = packed.detach().reshape(-1).to("cpu")
    if data.dtype != torch.uint8:
        raise ValueError(f"packed mask must be uint8, got {data.dtype}")
    expected = packed_size(numel, kind)
    if data.numel() != expected:
        raise ValueError(
            f"packed {kind} mask has {data.numel()} bytes but shape {shape} needs {expected}"
        )
    raw = data.numpy()
    if kind == "binary":
        bits = np.unpackbits(raw, count=numel, bitorder="little")
        out = torch.from_numpy(bits).reshape(shape)
        return out if dtype is None else out.to(dtype)
    if kind == "ternary":
        codes = np.stack([(raw >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:numel]
        if np.any(codes == 3):
            raise ValueError("packed ternary mask contains the invalid code 3 (corrupt data)")
        values = np.where(codes == 2, -1, codes).astype(np.int8)
        out = torch.from_numpy(values).reshape(shape)
        return out if dtype is None else out.to(dtype)
    raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
