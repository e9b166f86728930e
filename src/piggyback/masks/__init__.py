"""Mask tensors: bit-packing, the ``rice`` codec, sparsity and overlap statistics, plots.

Pure tensor functions; they know no model, file format or method. The stored forms of masks
and tasks are in ``piggyback.formats``.
"""

from piggyback.masks.codec import compress_mask, compressed_bits_per_weight, decompress_mask
from piggyback.masks.packing import mask_kind, pack_mask, packed_size, unpack_mask
from piggyback.masks.stats import (
    expand_to_weights,
    flips,
    fraction_changed_by_depth,
    layer_sparsity,
    overlap_matrix,
    pairwise_overlap,
    task_sparsity_table,
    total_sparsity,
)

__all__ = [
    "compress_mask",
    "compressed_bits_per_weight",
    "decompress_mask",
    "expand_to_weights",
    "flips",
    "fraction_changed_by_depth",
    "layer_sparsity",
    "mask_kind",
    "overlap_matrix",
    "pack_mask",
    "packed_size",
    "pairwise_overlap",
    "task_sparsity_table",
    "total_sparsity",
    "unpack_mask",
]
