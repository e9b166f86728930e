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
from piggyback.masks.codec import compress_mask, compressed_bits_per_weight, decompress_mask
from piggyback.masks.packing import mask_kind, pack_mask, packed_size, unpack_mask
from piggyback.masks.stats import (
    fraction_changed_by_depth,
    layer_sparsity,
    overlap_matrix,
    pairwise_overlap,
    task_sparsity_table,
    total_sparsity,
)

__all__ = [
    "ArtifactError",
    "PackedMask",
    "TaskArtifact",
    "apply_artifact",
    "compress_mask",
    "compressed_bits_per_weight",
    "decompress_mask",
    "fraction_changed_by_depth",
    "layer_sparsity",
    "overlap_matrix",
    "pairwise_overlap",
    "task_sparsity_table",
    "total_sparsity",
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
