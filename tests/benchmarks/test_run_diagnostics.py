"""`benchmarks/run.py --bool-saves-as-float`: the diagnostic reweighs saved bool tensors in
AOTAutograd's partitioner, and says so in one line when torch no longer has the function
it patches. The patch is undone after each test (monkeypatch restores the attribute).
Also: ``run.py``, the thin entry, and its ``bench`` package agree on the sections and on
``--help``'s first line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch._functorch.partitioners as partitioners


@pytest.fixture
def bench(monkeypatch):
    """``run.py`` and its ``bench`` package, imported from ``benchmarks/`` as the script is."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import run
    from bench import cli, compiled

    threads = torch.get_num_threads()
    yield SimpleNamespace(run=run, cli=cli, compiled=compiled)
    torch.set_num_threads(threads)  # parse_args sets 1 intra-op thread on CPU


def test_saved_bools_weigh_as_float_and_nothing_else_changes(bench, monkeypatch):
    monkeypatch.setattr(partitioners, "_tensor_nbytes", partitioners._tensor_nbytes)
    assert partitioners._tensor_nbytes(10, torch.bool) == 10
    bench.compiled.count_saved_bools_as_float()
    assert partitioners._tensor_nbytes(10, torch.bool) == 40
    assert partitioners._tensor_nbytes(10, torch.float16) == 20
    assert partitioners._tensor_nbytes(10, torch.float32) == 40
    assert partitioners._tensor_nbytes(10, torch.int8) == 10


def test_the_flag_is_parsed_and_off_by_default(bench):
    assert bench.cli.parse_args(["--only", "compile"]).bool_saves_as_float is False
    assert bench.cli.parse_args(["--bool-saves-as-float"]).bool_saves_as_float is True


def test_a_torch_without_the_patched_function_stops_with_one_line(bench, monkeypatch):
    monkeypatch.delattr(partitioners, "_tensor_nbytes")
    with pytest.raises(SystemExit) as stop:
        bench.compiled.count_saved_bools_as_float()
    message = str(stop.value)
    assert "--bool-saves-as-float" in message and "\n" not in message


def test_every_section_can_be_chosen_with_only_and_runs_in_that_order(bench):
    """``--only``'s choices (``bench.cli.SECTIONS``) are the sections ``run.py`` runs."""
    assert tuple(bench.run.SECTION_FNS) == bench.cli.SECTIONS


def test_help_says_what_the_entry_says(bench):
    assert bench.run.__doc__.splitlines()[0] == bench.cli.DESCRIPTION
