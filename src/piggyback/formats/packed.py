"""A mask as stored: packed bits or the ``rice`` code, and the model <-> stored-mask moves.

The stored form of one layer's mask (:class:`PackedMask`) plus the two functions that move
masks between a masked backbone and that form. Uses the tensor codecs of ``piggyback.masks``.

A mask of coarser granularity (``kernel``, ``filter``) is stored at its own reduced shape,
one bit per mask unit, with the shape of the weight it gates beside it; a soft (KSM) mask
adds its float32 scale per unit. Masks stored before granularities existed have the
weight's own shape and no scale, which is what the defaults say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from piggyback.formats.checked_file import ArtifactError
from piggyback.masks.codec import compress_mask, decompress_mask
from piggyback.masks.packing import mask_kind, pack_mask, packed_size, unpack_mask
from piggyback.nn.convert import masked_weights
from piggyback.nn.layers import check_unit_shape

MASK_ENCODINGS = ("bits", "rice")
"""``bits``: 1 bit per weight (2 for ternary masks). ``rice``: binary masks only, the gaps
between the minority symbol coded with block-adaptive Golomb-Rice (``masks/codec.py``), well
under 1 bit per weight on trained masks."""
_RENAMED_ENCODINGS = {"rle": "rice"}  # the old name: earlier artifacts and configs say it


def canonical_encoding(name: str) -> str:
    """The current name of a mask encoding; ``rle`` (the old name of ``rice``) still works."""
    name = _RENAMED_ENCODINGS.get(name, name)
    if name not in MASK_ENCODINGS:
        raise ValueError(
            f"unknown mask encoding {name!r}; choose one of {', '.join(MASK_ENCODINGS)}"
        )
    return name


@dataclass
class PackedMask:
    """One layer's mask as stored: ``data`` is uint8, ``encoding`` says how to decode it."""

    data: torch.Tensor
    shape: tuple[int, ...]
    kind: str = "binary"
    encoding: str = "bits"
    weight_shape: tuple[int, ...] | None = None
    """Shape of the gated weight; ``None`` (older files): the mask's own shape."""
    scale: torch.Tensor | None = None
    """A soft (KSM) mask's float32 scale per unit, of shape ``shape``; ``None`` if plain."""
    _decoded: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    """A ``rice`` mask decoded once, kept as 1-bit packing: a task switch re-reads it at the
    speed of the ``bits`` encoding (ResNet-50: ~22 ms instead of ~166 ms per switch) for
    1 bit per unit of memory. Not stored, not compared; replacing ``data`` drops it."""

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_decoded": None}  # pickles and copies carry the bytes only

    def __setattr__(self, name: str, value: object) -> None:
        if name == "data":  # the cache belongs to the bytes it was decoded from
            object.__setattr__(self, "_decoded", None)
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        # files and checkpoints written before the rename say "rle"; unknown names are left
        # for unpack() to refuse
        self.encoding = _RENAMED_ENCODINGS.get(self.encoding, self.encoding)
        self.shape = tuple(int(s) for s in self.shape)
        shape = self.shape if self.weight_shape is None else self.weight_shape
        self.weight_shape = tuple(int(s) for s in shape)

    @classmethod
    def from_mask(
        cls,
        mask: torch.Tensor,
        kind: str = "binary",
        encoding: str = "bits",
        *,
        weight_shape: tuple[int, ...] | None = None,
        scale: torch.Tensor | None = None,
    ):
        encoding = canonical_encoding(encoding)
        if encoding == "bits":
            data = pack_mask(mask, kind)
        else:
            if kind != "binary":
                raise ValueError(f"the {encoding!r} encoding supports binary masks only")
            data = torch.frombuffer(bytearray(compress_mask(mask)), dtype=torch.uint8)
        if scale is not None:
            scale = scale.detach().to("cpu", torch.float32).clone()
        return cls(
            data=data,
            shape=tuple(mask.shape),
            kind=kind,
            encoding=encoding,
            weight_shape=weight_shape,
            scale=scale,
        )

    @property
    def reduced(self) -> bool:
        """Whether this mask has fewer units than its weight has values, or scales."""
        return self.shape != self.weight_shape or self.scale is not None

    def unpack(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The mask as a tensor of ``shape``; stored bytes that do not decode to exactly that
        shape raise :class:`ArtifactError` (whatever the bytes: the decoder is fuzzed).

        ``dtype=None`` gives the compact integer type whatever the encoding (uint8 0/1 for
        binary masks, int8 for ternary), which ``copy_`` into a layer's mask converts in the
        same pass (about 2x faster than copying from bool on a ResNet-50)."""
        encoding = self.encoding  # an old name was already renamed in __post_init__
        if encoding not in MASK_ENCODINGS:
            raise ArtifactError(f"unknown mask encoding {encoding!r} (newer piggyback?)")
        if self.kind not in ("binary", "ternary") or (encoding == "rice" and self.kind != "binary"):
            raise ArtifactError(f"a {self.kind!r} mask cannot use the {encoding!r} encoding")
        if encoding == "bits":
            if self.data.numel() != packed_size(self.numel, self.kind):
                raise ArtifactError(
                    f"mask of shape {self.shape} has {self.data.numel()} bytes, "
                    f"expected {packed_size(self.numel, self.kind)} (truncated?)"
                )
            return unpack_mask(self.data, self.shape, self.kind, dtype)
        if self._decoded is not None:
            return unpack_mask(self._decoded, self.shape, "binary", dtype)
        try:
            mask = decompress_mask(self.data.numpy().tobytes(), self.shape)
        except ValueError as exc:
            raise ArtifactError(f"mask of shape {self.shape}: {exc}") from None
        self._decoded = pack_mask(mask, "binary")
        return mask.view(torch.uint8) if dtype is None else mask.to(dtype)

    @property
    def numel(self) -> int:
        """Mask units (one stored bit each, two for ternary)."""
        return math.prod(self.shape)

    @property
    def num_weights(self) -> int:
        """Weights the mask gates."""
        return math.prod(self.weight_shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes: the mask code plus the scales of a soft mask."""
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() + scale

    def check(self) -> None:
        """Refuse stored shapes that do not fit together (a damaged or foreign file)."""
        try:
            check_unit_shape(self.weight_shape, self.shape)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
        if self.scale is not None and tuple(self.scale.shape) != self.shape:
            raise ArtifactError(
                f"mask scales of shape {tuple(self.scale.shape)} do not fit mask {self.shape}"
            )


def pack_model_masks(backbone: nn.Module, encoding: str = "bits") -> dict[str, PackedMask]:
    """The current mask of every masked layer, packed (one bit per unit, plus soft scales).

    Binary masks are handed over as bool (``mask_real > threshold``): packing a bool tensor
    skips the alphabet checks a float mask needs, about 3x faster on a ResNet-50.
    """
    layers = list(masked_weights(backbone))
    if not layers:
        return {}
    kind = mask_kind(layers[0][1].threshold_fn)
    return {
        name: PackedMask.from_mask(
            layer.mask_real.detach() > layer.threshold if kind == "binary" else layer.mask(),
            kind,
            encoding,
            weight_shape=tuple(layer.weight.shape),
            scale=layer.soft_scale,
        )
        for name, layer in layers
    }


def load_masks(backbone: nn.Module, masks: Mapping[str, PackedMask], task: str) -> None:
    """Unpack task ``task``'s stored ``masks`` into a masked backbone, checking names and
    shapes."""
    current = dict(masked_weights(backbone))
    if set(current) != set(masks):
        missing = sorted(set(current) ^ set(masks))[:5]
        raise ArtifactError(
            f"task {task!r} masks do not match this model's masked weights "
            f"(differences: {missing}); was it trained with another backbone or target list?"
        )
    for name, mask in current.items():
        packed = masks[name]
        if tuple(packed.weight_shape) != tuple(mask.weight.shape):
            raise ArtifactError(
                f"task {task!r}: mask for {name!r} was learned for a weight of shape "
                f"{packed.weight_shape}, the weight has {tuple(mask.weight.shape)}"
            )
        try:
            packed.check()
            mask.set_mask(packed.unpack(dtype=None), packed.scale)
        except ArtifactError as exc:
            raise ArtifactError(f"task {task!r}: mask for {name!r}: {exc}") from None
