"""The CPU fast path: ``trainer=cpu_fast`` composes to bf16 autocast + channels-last, and
``benchmarks/run.py --only precision`` times it against fp32 (opt-in, not in the full run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import run
    from bench import cli

    threads = torch.get_num_threads()
    yield run, cli
    torch.set_num_threads(threads)  # parse_args sets 1 intra-op thread on CPU


def test_cpu_fast_is_one_option_for_both_settings(make_cfg):
    cfg = make_cfg("trainer=cpu_fast")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "cpu"
    assert cfg.model.channels_last is True
    assert make_cfg().trainer.precision == "32-true"  # the default stays exact fp32


def test_precision_section_prints_a_ratio_per_variant(bench, capsys):
    run, cli = bench
    assert set(cli.OPT_IN) <= set(cli.SECTIONS)
    run.main(["--only", "precision", "--arch", "resnet18", "--batch", "2", "--size", "16",
              "--rounds", "1", "--quick"])  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if " = " in line]
    names = [line.split(" = ")[0] for line in lines]
    assert names == [
        "piggyback_step[bf16] / piggyback_step[fp32]",
        "piggyback_step[fp32+channels_last] / piggyback_step[fp32]",
        "piggyback_step[bf16+channels_last] / piggyback_step[fp32]",
    ]
    assert all(float(line.split(" = ")[1].split()[0]) > 0 for line in lines)
