"""benchmarks/bn_statistics.py: the BN-statistics variants are what they say, and the command
prints one row per task on generated image folders (small CNN, random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from piggyback.models.testing import markdown_rows


@pytest.fixture
def bn_statistics(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bn_statistics

    return bn_statistics


def net_with_known_statistics() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    with torch.no_grad():  # "pretrained" statistics far from the data's
        net[1].running_mean.fill_(5.0)
        net[1].running_var.copy_(torch.tensor([0.01, 1.0, 100.0, 1e-6]))
    return net.eval()


def test_domain_statistics_are_the_datas_and_leave_the_net_alone(bn_statistics):
    net = net_with_known_statistics()
    x = torch.randn(16, 3, 8, 8)
    domain = bn_statistics.domain_statistics(net, [(x, torch.zeros(16, dtype=torch.long))])
    with torch.no_grad():
        h = net[0](x)
    mean, var = domain["1"]
    torch.testing.assert_close(mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(var, h.transpose(0, 1).reshape(4, -1).var(1))  # unbiased, as BN
    assert net[1].running_mean.eq(5.0).all() and net[1].momentum == 0.1  # untouched
    assert not net.training


def test_variants_take_means_variances_or_floors(bn_statistics):
    net = net_with_known_statistics()
    pre_var = net[1].running_var.clone()
    new_mean, new_var = torch.full((4,), -1.0), torch.tensor([0.5, 0.5, 0.5, 0.5])
    domain = {"1": (new_mean, new_var)}

    def stats(variant):
        bn = bn_statistics.with_statistics(net, domain, variant)[1]
        return bn.running_mean, bn.running_var

    assert torch.equal(stats("pretrained")[0], torch.full((4,), 5.0))
    assert torch.equal(stats("pretrained")[1], pre_var)
    assert torch.equal(stats("adapted")[0], new_mean) and torch.equal(stats("adapted")[1], new_var)
    assert torch.equal(stats("means_only")[0], new_mean) and torch.equal(
        stats("means_only")[1], pre_var
    )
    assert torch.equal(stats("variances_only")[0], torch.full((4,), 5.0))
    assert torch.equal(stats("variances_only")[1], new_var)
    assert torch.equal(stats("variances_floored")[1], torch.tensor([0.5, 1.0, 100.0, 0.5]))
    assert torch.equal(net[1].running_var, pre_var)  # every variant is a copy
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        bn_statistics.with_statistics(net, domain, "nope")
    # channel 0 (0.01 -> 0.5) did not shrink; channel 2 (100 -> 0.5) did; channel 3 is dead
    assert bn_statistics.shrunk_share(net, domain) == pytest.approx(100 / 3)


def test_probe_separates_separable_features_and_compare_reports_every_variant(bn_statistics):
    torch.manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 3, 8, 8) + y.view(-1, 1, 1, 1) * 2.0
    data = TensorDataset(x, y)
    net = net_with_known_statistics()
    out = bn_statistics.compare(net, data, data, data, batch_size=8)
    assert set(out) == {*bn_statistics.VARIANTS, "shrunk_channels_%"}
    assert out["adapted"] == 100.0  # a shifted mean is linearly separable once normalised
    assert all(0.0 <= v <= 100.0 for v in out.values())


def test_command_prints_a_row_per_task(bn_statistics, image_tree, tmp_path, capsys):
    image_tree(tmp_path / "imgs", 3)
    assert (
        bn_statistics.main(
            [
                "backbone=small_cnn",
                "backbone.weights=null",
                "+backbone.kwargs.in_channels=3",
                "data=imagefolder",
                f"data.root={tmp_path / 'imgs'}",
                "data.num_classes=3",
                "data.task_name=toy",
                "data.image_size=16",
                "data.resize_size=18",
            ]
        )
        == 0
    )
    table = markdown_rows(capsys.readouterr().out)
    assert list(table) == ["task", "toy"]
    assert len(table["toy"]) == len(bn_statistics.VARIANTS) + 1


def test_an_unknown_task_is_refused_before_any_work(bn_statistics, capsys):
    with pytest.raises(SystemExit) as stop:
        bn_statistics.main(["--tasks", "nope", "--", "data=digits/mirrored"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no task nope in this experiment; its tasks: " in err and err.count("\n") == 1
