"""piggyback.nn.unit_gates: HAT's unit rules, gradient factor and hard gates by hand, and the
gated units it finds in small networks (the method's training is tested in
tests/methods/test_hat.py)."""

import pytest
import torch
from torch import nn

from piggyback.nn import mask_model
from piggyback.nn.unit_gates import attenuation, describe_gates, hard_gate, unit_view


def test_attenuation_is_one_minus_the_earlier_gate_of_the_unit():
    """The reference's ``1 - min(a_in, a_out)`` with every input open (``a_in = 1``)."""
    used = torch.tensor([0.0, 1.0, 0.25])  # the largest gate earlier tasks put on 3 units
    rows = attenuation(used, "rows", (3, 2, 1, 1))
    assert torch.equal(
        rows.expand(3, 2, 1, 1)[:, :, 0, 0], torch.tensor([[1.0, 1], [0, 0], [0.75, 0.75]])
    )
    cols = attenuation(used, "cols", (4, 3, 1))  # a transposed conv: output channels on dim 1
    assert torch.equal(cols.expand(4, 3, 1)[0, :, 0], torch.tensor([1.0, 0.0, 0.75]))
    assert torch.equal(attenuation(used, "vector", (3,)), torch.tensor([1.0, 0.0, 0.75]))
    assert torch.equal(attenuation(used, "any", (6, 2)), torch.zeros(1, 1))  # any unit used
    assert torch.equal(
        unit_view(torch.tensor([True, False]), "any", (2, 2)), torch.ones(1, 1).bool()
    )
    assert torch.equal(hard_gate(torch.tensor([-0.1, 0.0, 3.0])), torch.tensor([0.0, 0.0, 1.0]))


def test_units_are_output_channels_gated_after_the_batchnorm_that_follows():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4, 5))  # fmt: skip
    mask_model(net)
    gates = describe_gates(net)
    assert gates["0"] == {"units": 4, "at": "1", "channel_dim": True,
                          "params": {"0.weight": "rows", "0.bias": "vector"}}  # fmt: skip
    assert gates["4"]["units"] == 5 and gates["4"]["at"] == "4" and not gates["4"]["channel_dim"]
    with pytest.raises(ValueError, match="unknown unit rule 'nope'"):
        unit_view(torch.ones(2), "nope", (2,))
