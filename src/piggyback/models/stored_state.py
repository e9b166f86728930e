"""A finished task's stored state in a Lightning checkpoint, and back.

Checkpoints are loaded with ``weights_only=True``, which accepts tensors and builtins only, so
the packed masks a method stores travel as plain dicts of their fields.
"""

from __future__ import annotations

from typing import Any

from piggyback.formats import PackedMask

__all__ = ["decode_stored", "encode_stored"]


def encode_stored(stored: dict[str, Any]) -> dict[str, Any]:
    """A task's stored state in types a ``weights_only`` checkpoint load accepts."""
    out = {k: v for k, v in stored.items() if k != "versions"}  # stale after a reload
    if "masks" in out:
        out["masks"] = {
            n: {
                "data": m.data,
                "shape": list(m.shape),
                "kind": m.kind,
                "encoding": m.encoding,
                "weight_shape": list(m.weight_shape),  # granularity (mask.granularity)
                "scale": m.scale,  # soft (KSM) masks; None otherwise
            }
            for n, m in out["masks"].items()
        }
    return out


def decode_stored(stored: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`encode_stored`: masks become :class:`PackedMask` objects again."""
    out = dict(stored)
    if "masks" in out:
        out["masks"] = {
            n: PackedMask(
                m["data"],
                tuple(m["shape"]),
                m["kind"],
                m.get("encoding", "bits"),
                weight_shape=tuple(m["weight_shape"]) if "weight_shape" in m else None,
                scale=m.get("scale"),
            )
            for n, m in out["masks"].items()
        }
    return out
