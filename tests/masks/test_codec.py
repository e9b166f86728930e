"""The mask codec must be lossless, well below 1 bit/weight on Piggyback-like masks, and loud
on damaged data."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from piggyback.masks.codec import (
    compress_mask,
    compressed_bits_per_weight,
    decompress_mask,
    stream_info,
)


def _random_mask(shape, p_zero: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.random(shape) >= p_zero)


def _recrc(data: bytes) -> bytes:
    """Re-seal a tampered stream so the structural checks, not the CRC, must catch it."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


@pytest.mark.parametrize(
    "shape",
    [(1,), (7,), (8,), (9,), (13, 3), (64, 3, 3, 3), (5, 7, 1, 1), (17, 31), (1000,), (3, 5, 7)],
)
@pytest.mark.parametrize("p_zero", [0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.99, 1.0])
def test_round_trip_shapes_and_densities(shape, p_zero):
    mask = _random_mask(shape, p_zero, seed=zlib.crc32(repr((shape, p_zero)).encode()))
    out = decompress_mask(compress_mask(mask), shape)
    assert out.dtype == torch.bool
    assert out.shape == torch.Size(shape)
    assert torch.equal(out, mask)


@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.uint8, torch.int8, torch.int64, torch.float16, torch.float32]
)
def test_any_dtype_and_non_contiguous(dtype):
    mask = _random_mask((33, 17), 0.1, seed=3).to(dtype)
    view = mask.t()  # non-contiguous
    out = decompress_mask(compress_mask(view), view.shape)
    assert torch.equal(out, view.bool())


def test_numpy_input_and_shape_forms():
    mask = _random_mask((10, 10), 0.2, seed=4)
    data = compress_mask(mask.numpy())
    assert torch.equal(decompress_mask(data, torch.Size([10, 10])), mask)
    assert torch.equal(decompress_mask(data, [100]), mask.reshape(-1))
    assert torch.equal(decompress_mask(data, 100), mask.reshape(-1))


def test_all_ones_all_zeros_empty_are_tiny():
    ones = torch.ones(2_000_003, dtype=torch.bool)
    zeros = torch.zeros(64, 3, 7, 7)
    empty = torch.ones(0, 5)
    for mask in (ones, zeros, empty):
        data = compress_mask(mask)
        assert len(data) <= 12
        assert stream_info(data)["method"] == "constant"
        assert torch.equal(decompress_mask(data, mask.shape), mask.bool())
    assert compressed_bits_per_weight(empty) == 0.0
    assert compressed_bits_per_weight(ones) < 1e-4


def test_single_minority_element_at_the_edges():
    for n in (1, 2, 9, 4097):
        for pos in {0, n // 2, n - 1}:
            mask = torch.ones(n, dtype=torch.bool)
            mask[pos] = False
            assert torch.equal(decompress_mask(compress_mask(mask), (n,)), mask)
            assert torch.equal(decompress_mask(compress_mask(~mask), (n,)), ~mask)


def test_ten_percent_iid_zeros_below_half_a_bit():
    mask = _random_mask((1_200_000,), 0.10, seed=0)
    bpw = compressed_bits_per_weight(mask)
    # entropy H(0.1) = 0.469; Rice coding of the gaps lands at ~0.476
    assert 0.469 < bpw <= 0.49
    assert torch.equal(decompress_mask(compress_mask(mask), mask.shape), mask)


def test_two_percent_zeros_much_lower():
    mask = _random_mask((512, 512, 3, 3), 0.02, seed=1)
    bpw = compressed_bits_per_weight(mask)
    assert bpw <= 0.15  # H(0.02) = 0.141
    assert stream_info(compress_mask(mask))["method"] == "rice"


def test_mostly_zero_mask_is_as_cheap_as_mostly_one():
    mask = _random_mask((1_000_000,), 0.10, seed=2)
    assert abs(compressed_bits_per_weight(~mask) - compressed_bits_per_weight(mask)) < 0.005


def test_clustered_zeros_benefit_from_block_adaptivity():
    # half the filters untouched, a quarter at 40 % zeros: average 10 % zeros, ~0.24 bit entropy
    rng = np.random.default_rng(5)
    rates = np.repeat([0.0, 0.0, 0.4, 0.0], 128)
    mask = torch.from_numpy(rng.random((512, 4608)) >= rates[:, None])
    assert compressed_bits_per_weight(mask) < 0.30


def test_fifty_percent_falls_back_to_raw():
    mask = _random_mask((1_000_003,), 0.5, seed=6)
    data = compress_mask(mask)
    assert stream_info(data)["method"] == "raw"
    assert compressed_bits_per_weight(mask) <= 1.01
    assert torch.equal(decompress_mask(data, mask.shape), mask)


def test_small_random_masks_never_much_above_one_bit():
    rng = np.random.default_rng(7)
    for n in (1, 8, 100, 1001):
        for p in (0.3, 0.5):
            mask = torch.from_numpy(rng.random(n) >= p)
            assert len(compress_mask(mask)) <= -(-n // 8) + 10


def test_header_is_self_describing():
    mask = _random_mask((300, 7), 0.05, seed=8)
    info = stream_info(compress_mask(mask))
    assert info["version"] == 1
    assert info["numel"] == 2100
    assert info["method"] == "rice"


def test_non_binary_values_rejected():
    with pytest.raises(ValueError, match="binary"):
        compress_mask(torch.tensor([1.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="binary"):
        compress_mask(torch.tensor([0.5, 1.0]))


def test_shape_mismatch_raises():
    data = compress_mask(_random_mask((10, 10), 0.1))
    with pytest.raises(ValueError, match="different layer"):
        decompress_mask(data, (10, 11))
    with pytest.raises(ValueError, match="negative"):
        decompress_mask(data, (-1, 100))


@pytest.mark.parametrize("p_zero", [0.0, 0.1, 0.5])
def test_truncated_and_corrupt_streams_raise_value_error(p_zero):
    mask = _random_mask((4099,), p_zero, seed=9)
    data = compress_mask(mask)
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            decompress_mask(data[:cut], mask.shape)
    with pytest.raises(ValueError):
        decompress_mask(data + b"\x00", mask.shape)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(ValueError, match="checksum"):
        decompress_mask(bytes(flipped), mask.shape)
    with pytest.raises(ValueError, match="version"):
        decompress_mask(b"\x07" + data[1:], mask.shape)


def test_structural_checks_behind_a_valid_checksum():
    mask = _random_mask((5000,), 0.1, seed=10)
    data = compress_mask(mask)
    # truncated payload, re-sealed: the gap codes run out
    with pytest.raises(ValueError, match="corrupt"):
        decompress_mask(_recrc(data[:-40] + b"\0\0\0\0"), mask.shape)
    # trailing garbage, re-sealed
    with pytest.raises(ValueError, match="corrupt"):
        decompress_mask(_recrc(data[:-4] + b"\xff\xff" + b"\0\0\0\0"), mask.shape)
    # unknown method
    with pytest.raises(ValueError, match="method"):
        decompress_mask(_recrc(data[:1] + b"\x09" + data[2:]), mask.shape)


def test_random_tampering_only_ever_raises_value_error():
    rng = np.random.default_rng(11)
    for _ in range(400):
        n = int(rng.integers(1, 2000))
        mask = torch.from_numpy(rng.random(n) >= rng.choice([0.0, 0.02, 0.2, 0.5, 0.9]))
        data = bytearray(compress_mask(mask))
        i = int(rng.integers(0, len(data) - 4))
        data[i] ^= 1 << int(rng.integers(0, 8))
        for candidate in (bytes(data), _recrc(data)):
            try:
                out = decompress_mask(candidate, (n,))
            except ValueError:
                continue
            assert out.dtype == torch.bool and out.shape == (n,)


def test_wrong_input_types():
    with pytest.raises(TypeError):
        compress_mask([1, 0, 1])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decompress_mask("abc", (3,))  # type: ignore[arg-type]


def test_read_only_numpy_input_of_other_dtype():
    arr = np.array([[1, 0, 1], [1, 1, 1]], dtype=np.float32)
    arr.setflags(write=False)
    assert torch.equal(decompress_mask(compress_mask(arr), arr.shape), torch.from_numpy(arr > 0))
    with pytest.raises(ValueError, match="binary"):
        compress_mask(np.array([2, 0]))
