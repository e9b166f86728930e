"""Fuzzing the ``rice`` mask decoder: it parses bytes from files, so any input may reach it.

Random and mutated streams must decode to a mask of the asked shape or raise
``ArtifactError``: never another exception, never a hang, and never memory beyond a small
multiple of the stream plus the mask itself. Every mutated stream is re-sealed with a valid
CRC so the structural checks, not the checksum, are what is tested.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from piggyback.formats import ArtifactError, PackedMask
from piggyback.masks.codec import compress_mask


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _decode(data: bytes, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Decode through the artifact's own path; None when refused with ArtifactError."""
    packed = PackedMask(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), shape, "binary", "rice"
    )
    try:
        out = packed.unpack(dtype=None)
    except ArtifactError:
        return None
    assert out.dtype == torch.uint8 and tuple(out.shape) == shape  # 0/1, as bits gives
    assert out.numel() == 0 or int(out.max()) <= 1
    return out


def _valid_stream(rng: np.random.Generator) -> tuple[bytes, int]:
    n = int(rng.integers(1, 3000))
    p_zero = float(rng.choice([0.0, 0.005, 0.02, 0.1, 0.3, 0.5, 0.9, 1.0]))
    if rng.random() < 0.3:  # clustered zeros, as trained masks have
        mask = np.ones(n, bool)
        start = int(rng.integers(0, n))
        mask[start : start + int(rng.integers(1, n + 1))] = rng.random() >= 0.5
    else:
        mask = rng.random(n) >= p_zero
    return compress_mask(torch.from_numpy(mask)), n


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    body = bytearray(data[:-4])
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 7))
        i = int(rng.integers(0, len(body))) if body else 0
        if op == 0 and body:  # flip one bit
            body[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and body:  # overwrite a byte with an extreme value
            body[i] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == 2:  # insert random bytes
            body[i:i] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        elif op == 3 and body:  # delete a run
            del body[i : i + int(rng.integers(1, 9))]
        elif op == 4:  # truncate
            del body[i:]
        elif op == 5 and len(body) > 3:  # a huge varint where the element/code count lives
            body[3:4] = _varint(int(rng.choice([2**31, 2**40, 2**62, 2**63 - 1])))
        elif op == 6 and len(body) > 6:  # block size and Rice parameter out of range
            body[int(rng.integers(3, len(body)))] = int(rng.choice([4, 41, 62, 63, 200]))
    return _seal(bytes(body))


def _random_stream(rng: np.random.Generator, n: int) -> bytes:
    """Header-shaped noise: version 1, any method and flags, then random or plausible fields."""
    head = bytes([1, int(rng.integers(0, 4)), int(rng.integers(0, 3))])
    fields = _varint(n) if rng.random() < 0.7 else _varint(int(rng.integers(0, 2**40)))
    tail = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
    return _seal(head + fields + tail)


def _bounded(fn, data: bytes, n: int) -> torch.Tensor | None:
    """Run ``fn`` and check its peak Python/numpy allocation stays O(len(data) + n)."""
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= (1 << 20) + 80 * len(data) + 16 * n, (peak, len(data), n)
    return out


def test_mutated_streams_decode_or_raise_artifact_error_only():
    rng = np.random.default_rng(20261130)
    decoded = refused = 0
    for _ in range(1500):
        data, n = _valid_stream(rng)
        bad = _mutate(data, rng)
        out = _bounded(lambda bad=bad, n=n: _decode(bad, (n,)), bad, n)
        decoded += out is not None
        refused += out is None
    assert refused > 1000  # the structural checks catch nearly every mutation
    assert decoded + refused == 1500


def test_random_streams_decode_or_raise_artifact_error_only():
    rng = np.random.default_rng(7)
    for _ in range(1500):
        n = int(rng.integers(1, 5000))
        data = _random_stream(rng, n)
        _bounded(lambda data=data, n=n: _decode(data, (n,)), data, n)


@pytest.mark.parametrize("length", [0, 1, 4, 5, 7, 8, 9, 64])
def test_unsealed_garbage_is_refused(length):
    rng = np.random.default_rng(length)
    data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    with pytest.raises(ArtifactError):
        PackedMask(
            torch.frombuffer(bytearray(data) or bytearray(1), dtype=torch.uint8)[:length],
            (100,),
            "binary",
            "rice",
        ).unpack()


def test_a_short_stream_claiming_a_huge_mask_is_refused_without_allocating_it():
    """A constant stream of 10 bytes may say 2**62 elements: the shape check comes first."""
    data = _seal(bytes([1, 0, 1]) + _varint(2**62))
    assert _bounded(lambda: _decode(data, (1000,)), data, 1000) is None
    rice = _seal(bytes([1, 2, 0]) + _varint(2**40) + _varint(2**39) + bytes([40, 62]) + b"\0" * 8)
    assert _bounded(lambda: _decode(rice, (1000,)), rice, 1000) is None


def test_bits_encoding_with_the_wrong_size_is_an_artifact_error():
    packed = PackedMask.from_mask(torch.ones(100), "binary", "bits")
    short = PackedMask(packed.data[:-1], packed.shape, "binary", "bits")
    with pytest.raises(ArtifactError, match=r"has 12 bytes, expected 13 \(truncated\?\)"):
        short.unpack()
    with pytest.raises(ArtifactError, match="unknown mask encoding 'zip'"):
        PackedMask(packed.data, packed.shape, "binary", "zip").unpack()
