"""Lossless compression of binary masks to well below one bit per weight.

Piggyback masks are mostly ones (90-95 % is typical and the zeros cluster in a few layers), so
storing them at a flat 1 bit per weight wastes most of the space. We code the *gaps* between
the minority symbol (usually the zeros) with a block-adaptive Golomb-Rice code: for i.i.d.
zeros the gaps are geometric and Rice is within ~1.5 % of the entropy (0.476 vs 0.469 bit per
weight at 10 % zeros), while per-block parameters follow the local density when zeros cluster.
The quotients (unary) and the remainders (fixed width) live in two separate bit streams, which
is what makes decoding vectorisable: every 0-bit of the unary stream terminates one code, so
``np.flatnonzero`` finds all code boundaries at once, and the remainder positions follow from
the per-block widths. No Python loop runs per bit or per gap.

Why our own code and not stdlib ``lzma`` over ``np.packbits`` (``benchmarks/mask_codec.py``,
2-core CPU, one thread): on the masks of real EfficientNet-Lite0 runs lzma needs 1.53x the
bytes at 0.6 % zeros and 1.15x at 4.5 %; on i.i.d. masks 1.24x at 2 %, 1.16x at 5 %, 1.05x at
10 %, and 1.01x on clustered masks at 24 %. lzma (preset 9) also encodes a ResNet-50 mask set
5-36x slower. Trained Piggyback masks sit at a few percent zeros, where the gap is largest.
The decoder parses untrusted bytes, so it is fuzzed (``tests/masks/test_codec_fuzz.py``):
random and mutated streams decode or raise, with memory linear in stream and mask size.

Stream layout (all integers little-endian / LEB128 varints)::

    byte  version (= 1)
    byte  method  (0 = constant, 1 = raw 1-bit packing, 2 = gap/Rice)
    byte  flags   (bit 0: the constant value / the minority symbol that is coded)
    var   n       number of elements
    -- method 2 only --
    var   z       number of coded (minority) positions
    byte  log2 of the block size in gaps
    bytes one Rice parameter k per block
    bits  remainders of all gaps (k bits each, MSB first), then the unary quotients
    -- method 1 only --
    bytes np.packbits of the n mask bits
    -- always --
    u32   CRC-32 of everything before it

The CRC costs 4 bytes per layer (nothing next to a multi-megabit mask) and turns any bit flip
or truncation into a ``ValueError`` instead of a silently different mask.

One file of ~400 lines on purpose: the encoder and the decoder are the two halves of the one
stream layout above, and the decoder's bounds checks mirror the encoder line by line; split
apart, a change to one half would too easily miss the other.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "METHOD_CONSTANT",
    "METHOD_RAW",
    "METHOD_RICE",
    "compress_mask",
    "compressed_bits_per_weight",
    "decompress_mask",
    "stream_info",
]

FORMAT_VERSION = 1
METHOD_CONSTANT = 0
METHOD_RAW = 1
METHOD_RICE = 2
_METHOD_NAMES = {METHOD_CONSTANT: "constant", METHOD_RAW: "raw", METHOD_RICE: "rice"}

# Block sizes are powers of two in gaps; the encoder picks the cheapest one per mask. Small
# blocks track clustered zeros, large blocks amortise the one-byte parameter per block.
_MIN_LOG2_BLOCK = 5
_MAX_LOG2_BLOCK = 40
_MAX_K = 62  # keeps (q << k) | r inside int64
_CRC_BYTES = 4


# --------------------------------------------------------------------------------------------
# varints
# --------------------------------------------------------------------------------------------
def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _get_varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise ValueError(f"corrupt mask stream: truncated while reading {what}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"corrupt mask stream: {what} varint is too long")


# --------------------------------------------------------------------------------------------
# input conversion
# --------------------------------------------------------------------------------------------
def _to_bool_numpy(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """Flatten to a bool array, refusing anything that is not 0/1 (coding it would be lossy)."""
    if isinstance(mask, np.ndarray):
        flat_np = mask.reshape(-1)
        if flat_np.dtype != np.bool_:
            if flat_np.size and not bool(((flat_np == 0) | (flat_np == 1)).all()):
                bad = flat_np[(flat_np != 0) & (flat_np != 1)][:5].tolist()
                raise ValueError(
                    "compress_mask codes binary masks only (values 0/1); found other values "
                    f"such as {bad}. Ternary masks need a different codec."
                )
            flat_np = flat_np != 0
        return flat_np
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    flat = mask.detach().reshape(-1)
    if flat.dtype != torch.bool:
        if flat.numel() and not bool(((flat == 0) | (flat == 1)).all()):
            bad = flat[(flat != 0) & (flat != 1)][:5].tolist()
            raise ValueError(
                "compress_mask codes binary masks only (values 0/1); found other values such as "
                f"{bad}. Ternary masks need a different codec."
            )
        flat = flat != 0
    return flat.cpu().numpy()


def _numel_of(shape: Sequence[int] | torch.Size | int) -> tuple[tuple[int, ...], int]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError as err:
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from err
    if any(d < 0 for d in dims):
        raise ValueError(f"shape has a negative dimension: {dims}")
    return dims, math.prod(dims)


# --------------------------------------------------------------------------------------------
# Rice coding of gaps
# --------------------------------------------------------------------------------------------
def _choose_rice_params(gaps: np.ndarray) -> tuple[int, np.ndarray, int]:
    """Pick block size and per-block k minimising the exact coded size.

    Returns ``(log2_block, ks, cost_bits)``. Costs are exact: a gap g with parameter k takes
    ``(g >> k) + 1 + k`` bits, and each block adds one byte for its k.
    """
    z = gaps.size
    max_gap = int(gaps.max())
    k_hi = min(_MAX_K, max(0, max_gap.bit_length()))
    base = 1 << _MIN_LOG2_BLOCK
    n_base = -(-z // base)
    padded = np.zeros(n_base * base, dtype=np.int64)
    padded[:z] = gaps
    padded = padded.reshape(n_base, base)
    counts = np.full(n_base, base, dtype=np.int64)
    counts[-1] = z - (n_base - 1) * base
    # quotient_sums[k, b] = sum over base block b of (g >> k); the k+1 fixed bits come from counts
    quotient_sums = np.empty((k_hi + 1, n_base), dtype=np.int64)
    shifted = padded
    for k in range(k_hi + 1):
        if k:
            shifted = shifted >> 1
        quotient_sums[k] = shifted.sum(axis=1)
    ks_range = np.arange(k_hi + 1, dtype=np.int64)[:, None]

    best: tuple[int, np.ndarray, int] | None = None
    sums, cnts, log2_block = quotient_sums, counts, _MIN_LOG2_BLOCK
    while True:
        cost = sums + cnts[None, :] * (ks_range + 1)
        ks = cost.argmin(axis=0)
        total = int(cost[ks, np.arange(cost.shape[1])].sum()) + 8 * ks.size
        if best is None or total < best[2]:
            best = (log2_block, ks.astype(np.uint8), total)
        if sums.shape[1] == 1 or log2_block >= _MAX_LOG2_BLOCK:
            break
        # merge neighbouring blocks pairwise (pad with an empty block when odd)
        if sums.shape[1] % 2:
            sums = np.concatenate([sums, np.zeros((sums.shape[0], 1), np.int64)], axis=1)
            cnts = np.concatenate([cnts, np.zeros(1, np.int64)])
        sums = sums[:, 0::2] + sums[:, 1::2]
        cnts = cnts[0::2] + cnts[1::2]
        log2_block += 1
    assert best is not None
    return best


def _rice_encode(gaps: np.ndarray, ks_per_gap: np.ndarray) -> bytes:
    """Remainders (k bits each, MSB first) followed by unary quotients (q ones then a zero)."""
    ks = ks_per_gap.astype(np.int64)
    q = gaps >> ks
    r = gaps - (q << ks)
    rem_len = int(ks.sum())
    unary_len = int(q.sum()) + gaps.size
    bits = np.zeros(rem_len + unary_len + 1, dtype=np.int8)

    # remainders, grouped by width so each group is one 2-D gather
    rem_off = np.cumsum(ks) - ks
    for k in np.unique(ks):
        k = int(k)
        if k == 0:
            continue
        sel = np.flatnonzero(ks == k)
        shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
        vals = (r[sel, None] >> shifts) & 1
        bits[rem_off[sel, None] + np.arange(k)] = vals

    # unary: mark run starts and ends in a difference array and integrate
    code_len = q + 1
    starts = rem_len + np.cumsum(code_len) - code_len
    diff = np.zeros_like(bits)
    diff[starts] = 1
    diff[starts + q] -= 1
    unary = np.cumsum(diff[rem_len:], dtype=np.int8)
    bits[rem_len:] = unary
    return np.packbits(bits[: rem_len + unary_len].astype(np.uint8)).tobytes()


def _rice_decode(payload: bytes, z: int, ks_per_gap: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`_rice_encode`; returns the gaps, validating every length on the way."""
    ks = ks_per_gap.astype(np.int64)
    rem_len = int(ks.sum())
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    if bits.size < rem_len + z:
        raise ValueError("corrupt mask stream: payload is shorter than its gap codes (truncated?)")

    r = np.zeros(z, dtype=np.int64)
    rem_bits = bits[:rem_len].astype(np.int64)
    rem_off = np.cumsum(ks) - ks
    for k in np.unique(ks):
        k = int(k)
        if k == 0:
            continue
        sel = np.flatnonzero(ks == k)
        shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
        r[sel] = (rem_bits[rem_off[sel, None] + np.arange(k)] << shifts).sum(axis=1)

    unary = bits[rem_len:]
    terminators = np.flatnonzero(unary == 0)
    if terminators.size < z:
        raise ValueError("corrupt mask stream: fewer gap codes than announced (truncated?)")
    terminators = terminators[:z]
    used = int(terminators[-1]) + 1 if z else 0
    total_bits = rem_len + used
    if len(payload) != -(-total_bits // 8):
        raise ValueError(
            f"corrupt mask stream: payload has {len(payload)} bytes, codes need "
            f"{-(-total_bits // 8)}"
        )
    if unary[used:].any():
        raise ValueError("corrupt mask stream: non-zero padding after the last code")
    q = np.diff(terminators, prepend=-1) - 1
    if z and bool((q > (n >> ks)).any()):
        raise ValueError("corrupt mask stream: a gap is larger than the mask")
    return (q << ks) | r


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _finish(out: bytearray) -> bytes:
    out += struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)
    return bytes(out)


def compress_mask(mask: torch.Tensor) -> bytes:
    """Encode a 0/1 mask of any shape and dtype losslessly into a self-describing byte string.

    A numpy array is accepted as well. The shape is not stored (the caller knows it from the
    layer); the element count is, so a mask decoded against the wrong layer is rejected. The
    encoder always picks the smallest of the constant, raw 1-bit and gap/Rice representations,
    so the result is never more than a few header bytes above 1 bit per weight.
    """
    flat = _to_bool_numpy(mask)
    n = flat.size
    header = bytearray([FORMAT_VERSION])
    zeros_pos = np.flatnonzero(~flat)
    n_zeros = zeros_pos.size
    if n_zeros == 0 or n_zeros == n:
        header += bytes([METHOD_CONSTANT, 1 if n_zeros == 0 else 0])
        _put_varint(header, n)
        return _finish(header)

    # code the minority symbol so that mostly-zero masks are as cheap as mostly-one masks
    if n_zeros <= n - n_zeros:
        minority, positions = 0, zeros_pos
    else:
        minority, positions = 1, np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1
    log2_block, ks, cost_bits = _choose_rice_params(gaps)

    z = positions.size
    z_varint = bytearray()
    _put_varint(z_varint, z)
    # cost_bits already includes one byte per block for the k table
    rice_bytes = len(z_varint) + 1 + ks.size + -(-(cost_bits - 8 * ks.size) // 8)
    if rice_bytes >= -(-n // 8):
        header += bytes([METHOD_RAW, 0])
        _put_varint(header, n)
        header += np.packbits(flat).tobytes()
        return _finish(header)

    header += bytes([METHOD_RICE, minority])
    _put_varint(header, n)
    header += z_varint
    header.append(log2_block)
    header += ks.tobytes()
    ks_per_gap = np.repeat(ks, 1 << log2_block)[:z] if ks.size > 1 else np.full(z, ks[0])
    header += _rice_encode(gaps, ks_per_gap)
    return _finish(header)


def _parse_header(data: bytes) -> tuple[int, int, int, int, int]:
    """Validate version, CRC and the fixed fields; returns (method, flags, n, pos, end)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 3 + 1 + _CRC_BYTES:
        raise ValueError(f"corrupt mask stream: only {len(data)} bytes (truncated?)")
    version = data[0]
    if version != FORMAT_VERSION:
        raise ValueError(
            f"unsupported mask stream version {version} (this code reads version "
            f"{FORMAT_VERSION}); the data is corrupt or from a newer piggyback"
        )
    end = len(data) - _CRC_BYTES
    (crc,) = struct.unpack("<I", data[end:])
    if zlib.crc32(data[:end]) & 0xFFFFFFFF != crc:
        raise ValueError("corrupt mask stream: checksum mismatch (data damaged or truncated)")
    method, flags = data[1], data[2]
    if method not in _METHOD_NAMES:
        raise ValueError(f"corrupt mask stream: unknown method {method}")
    if flags > 1:
        raise ValueError(f"corrupt mask stream: unknown flags {flags:#x}")
    n, pos = _get_varint(data, 3, end, "element count")
    return method, flags, n, pos, end


def stream_info(data: bytes) -> dict[str, int | str]:
    """Describe a stream without decoding it, for logs and storage reports."""
    method, _, n, _, _ = _parse_header(data)
    return {"version": data[0], "method": _METHOD_NAMES[method], "numel": n, "bytes": len(data)}


def decompress_mask(data: bytes, shape: Sequence[int] | torch.Size | int) -> torch.Tensor:
    """Decode a stream from :func:`compress_mask` into a ``torch.bool`` tensor of ``shape``.

    Every inconsistency (bad version, checksum, truncation, element count differing from
    ``shape``) raises ``ValueError`` so a damaged task artifact fails loudly at load time.
    """
    dims, numel = _numel_of(shape)
    method, flags, n, pos, end = _parse_header(data)
    data = bytes(data)
    if n != numel:
        raise ValueError(
            f"mask stream holds {n} elements but shape {dims} has {numel}; "
            "was this mask saved for a different layer or backbone?"
        )
    if method == METHOD_CONSTANT:
        if pos != end:
            raise ValueError("corrupt mask stream: trailing bytes after a constant mask")
        flat = np.full(n, bool(flags), dtype=bool)
    elif method == METHOD_RAW:
        if end - pos != -(-n // 8):
            raise ValueError(
                f"corrupt mask stream: raw payload has {end - pos} bytes, expected {-(-n // 8)}"
            )
        flat = np.unpackbits(np.frombuffer(data, np.uint8, end - pos, pos), count=n).astype(bool)
    else:
        z, pos = _get_varint(data, pos, end, "code count")
        if z == 0 or z > n:
            raise ValueError(f"corrupt mask stream: {z} coded positions for {n} elements")
        if pos >= end:
            raise ValueError("corrupt mask stream: truncated before the block size")
        log2_block = data[pos]
        pos += 1
        if not _MIN_LOG2_BLOCK <= log2_block <= _MAX_LOG2_BLOCK:
            raise ValueError(f"corrupt mask stream: invalid block size 2**{log2_block}")
        n_blocks = -(-z // (1 << log2_block))
        if end - pos < n_blocks:
            raise ValueError("corrupt mask stream: truncated in the Rice parameter table")
        ks = np.frombuffer(data, np.uint8, n_blocks, pos)
        pos += n_blocks
        if int(ks.max()) > min(_MAX_K, n.bit_length()):
            raise ValueError("corrupt mask stream: Rice parameter out of range")
        ks_per_gap = np.repeat(ks, 1 << log2_block)[:z] if n_blocks > 1 else np.full(z, ks[0])
        gaps = _rice_decode(data[pos:end], z, ks_per_gap, n)
        positions = np.cumsum(gaps + 1) - 1
        if int(positions[-1]) >= n:
            raise ValueError("corrupt mask stream: coded positions run past the end of the mask")
        minority = bool(flags)
        flat = np.full(n, not minority, dtype=bool)
        flat[positions] = minority
    return torch.from_numpy(flat).reshape(dims)


def compressed_bits_per_weight(mask: torch.Tensor) -> float:
    """Storage cost including header and checksum; 0.0 for an empty mask (nothing to store)."""
    numel = mask.numel() if isinstance(mask, torch.Tensor) else int(np.size(mask))
    if numel == 0:
        return 0.0
    return 8.0 * len(compress_mask(mask)) / numel
