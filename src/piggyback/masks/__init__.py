"""Mask storage (packing, task artifacts) and mask analysis."""

from piggyback.masks.artifact import (
    ArtifactError,
    PackedMask,
    TaskArtifact,
    apply_artifact,
    bn_state_dict,
    check_fingerprint,
    extract_artifact,
    fingerprint,
    load_artifact,
    load_bn_state,
    save_artifact,
)
from piggyback.masks.packing import mask_kind, pack_mask, packed_size, unpack_mask

__all__ = [
    "ArtifactError",
    "PackedMask",
    "TaskArtifact",
    "apply_artifact",
    "bn_state_dict",
    "check_fingerprint",
    "extract_artifact",
    "fingerprint",
    "load_artifact",
    "load_bn_state",
    "mask_kind",
    "pack_mask",
    "packed_size",
    "save_artifact",
    "unpack_mask",
]
