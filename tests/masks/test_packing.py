import pytest
import torch

from piggyback.masks import pack_mask, packed_size, unpack_mask

SHAPES = [(0,), (1,), (7,), (8,), (9,), (13, 3), (64, 3, 3, 3), (5, 7, 1, 1), (1000, 17)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p_one", [0.0, 0.3, 0.9, 1.0])
def test_binary_round_trip(shape, p_one):
    torch.manual_seed(1)
    mask = (torch.rand(shape) < p_one).float()
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(mask.numel()) == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)


@pytest.mark.parametrize("shape", SHAPES)
def test_ternary_round_trip(shape):
    torch.manual_seed(2)
    mask = torch.randint(-1, 2, shape).float()
    packed = pack_mask(mask, "ternary")
    assert packed.numel() == (mask.numel() * 2 + 7) // 8
    assert torch.equal(unpack_mask(packed, shape, "ternary"), mask)


def test_bool_masks_and_auto_kind():
    mask = torch.rand(10, 3) > 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), mask.shape, dtype=torch.bool), mask)
    ternary = torch.tensor([-1.0, 0.0, 1.0])
    assert pack_mask(ternary).numel() == 1  # auto-detected ternary: 3 x 2 bits


def test_bad_values_and_sizes_raise():
    with pytest.raises(ValueError, match="alphabet"):
        pack_mask(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="alphabet"):
        pack_mask(torch.tensor([0.0, -1.0]), "binary")
    with pytest.raises(ValueError, match="needs"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), (100,))
    with pytest.raises(ValueError, match="invalid code"):
        unpack_mask(torch.tensor([0xFF], dtype=torch.uint8), (4,), "ternary")
