"""A ``rice`` mask is decoded once: later task switches read 1-bit packing (issue 19)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import piggyback.formats.packed as packed_module
from piggyback.formats import ArtifactError
from piggyback.formats.packed import PackedMask


@pytest.fixture
def mask() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 32, 3, 3, generator=g) > 0.07


def _counting_decoder(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = packed_module.decompress_mask

    def counted(data, shape):
        calls.append(1)
        return real(data, shape)

    monkeypatch.setattr(packed_module, "decompress_mask", counted)
    return calls


def test_rice_is_decoded_once_and_every_unpack_is_exact(mask, monkeypatch):
    calls = _counting_decoder(monkeypatch)
    packed = PackedMask.from_mask(mask, encoding="rice")
    first = packed.unpack(dtype=None)
    second = packed.unpack(dtype=None)
    as_float = packed.unpack()
    assert calls == [1]
    assert first.dtype == second.dtype == torch.uint8
    assert torch.equal(first.bool(), mask) and torch.equal(second.bool(), mask)
    assert torch.equal(as_float, mask.float())


def test_new_bytes_pickles_and_copies_do_not_carry_the_decoded_mask(mask, monkeypatch):
    calls = _counting_decoder(monkeypatch)
    packed = PackedMask.from_mask(mask, encoding="rice")
    packed.unpack()
    restored = pickle.loads(pickle.dumps(packed))
    assert restored._decoded is None and copy.deepcopy(packed)._decoded is None
    assert torch.equal(restored.unpack(dtype=None).bool(), mask)
    other = ~mask
    packed.data = PackedMask.from_mask(other, encoding="rice").data
    assert torch.equal(packed.unpack(dtype=None).bool(), other)
    assert len(calls) == 3


def test_damaged_rice_bytes_still_raise_before_anything_is_cached(mask):
    packed = PackedMask.from_mask(mask, encoding="rice")
    data = packed.data.clone()
    data[len(data) // 2] ^= 0xFF
    damaged = PackedMask(data=data, shape=packed.shape, encoding="rice")
    with pytest.raises(ArtifactError):
        damaged.unpack()
    assert damaged._decoded is None
