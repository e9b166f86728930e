"""`benchmarks/compare_table.py` on run folders written in the format train.py writes: the
choice of each method's lr on validation (here or in another sweep), both layouts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from piggyback.models.testing import markdown_rows, paper_table_header
from piggyback.scores.continual import cl_summary

TASKS = ("signs", "tiles", "cifar10_small")


@pytest.fixture
def compare_table(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import compare_table

    return compare_table


def write_run(
    folder: Path,
    method: str,
    lr: str,
    final: tuple[float, ...],
    *,
    val: float,
    task_bytes: int = 1000,
    first: tuple[float, ...] | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    """A run folder of a three-task sequence: metrics.json and .hydra/overrides.yaml.

    ``first``: the diagonal of the accuracy matrix (default: ``final``, no forgetting)."""
    first = first or final
    matrix = [[first[0], None, None], [first[0], first[1], None], list(final)]
    matrix[1][0] = final[0]
    tasks = {
        t: {"task": t, "method": method, "test/acc": first[i], "val/acc": val, "task_bytes": 1}
        for i, t in enumerate(TASKS)
    }
    summary = {
        "backbone": "efficientnet_lite0",
        "method": method,
        "tasks": tasks,
        "cl": cl_summary(
            list(TASKS),
            matrix,
            task_bytes=[task_bytes, 3 * task_bytes, 5 * task_bytes],
            train_seconds=[10.0, 20.0, 99.0],
        ),
    }
    (folder / ".hydra").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(summary))
    overrides = [f"method={method}", f"method.lr_scale={lr}"]
    overrides += [f"{k}={v}" for k, v in (extra or {}).items()]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    write_run(root / "0", "finetune", "1", (0.8, 0.5, 0.9), val=0.7, task_bytes=10_000_000)
    write_run(root / "1", "finetune", "3", (0.9, 0.9, 0.9), val=0.6, task_bytes=10_000_000)
    write_run(root / "2", "piggyback", "1", (0.9, 0.25, 0.7), val=0.5, task_bytes=300_000)
    write_run(root / "3", "piggyback", "3", (0.2, 0.2, 0.2), val=0.1, task_bytes=300_000)
    write_run(
        root / "4",
        "finetune_sequential",
        "1",
        (0.4, 0.5, 0.9),
        val=0.5,
        first=(0.8, 0.7, 0.9),
        task_bytes=10_000_000,
    )
    return root


def test_paper_table_scores_against_finetune(compare_table, sweep, capsys):
    compare_table.main([str(sweep), "--paper"])
    out = capsys.readouterr().out
    table = markdown_rows(out)
    assert table["method"] == paper_table_header(["signs", "tiles"])
    assert list(table)[1:] == ["finetune", "finetune_sequential", "piggyback"]
    # finetune at lr 1 (best val), the reference: 250 per domain by construction
    assert table["finetune"] == [
        "1", "80.0", "50.0", "65.0", "90.0", "500", "20.00 MB", "40.00 MB", "15", "+0.0"
    ]  # fmt: skip
    # piggyback: signs error 0.1, Emax 0.4 -> 1000 * (0.3 / 0.4)^2 = 562.5; tiles error 0.75,
    # Emax 1.0 -> 62.5
    assert table["piggyback"][:6] == ["1", "90.0", "25.0", "57.5", "70.0", "625"]
    assert table["piggyback"][6:8] == ["0.60 MB", "1.20 MB"]
    # the sequential run forgot: signs 0.8 -> 0.4, tiles 0.7 -> 0.5 after the last task
    assert table["finetune_sequential"][-1] == "-30.0"
    assert "250 per domain (500 in all)" in out
    assert "validation accuracy of this sweep, never on test" in out


def test_a_perfect_reference_domain_is_explained(compare_table, tmp_path, capsys):
    root = tmp_path / "sweep"
    write_run(root / "0", "finetune", "1", (1.0, 0.5, 0.9), val=0.7)
    write_run(root / "1", "piggyback", "1", (1.0, 0.5, 0.9), val=0.7)
    write_run(root / "2", "packnet", "1", (0.99, 0.5, 0.9), val=0.7)
    compare_table.main([str(root), "--paper"])
    out = capsys.readouterr().out
    table = markdown_rows(out)
    assert [table[m][5] for m in ("finetune", "piggyback", "packnet")] == ["500", "500", "250"]
    assert "the reference makes no error on signs" in out


def test_lr_chosen_in_another_sweep(compare_table, sweep, tmp_path, capsys):
    lr_sweep = tmp_path / "lr"
    write_run(lr_sweep / "0", "finetune", "1", (0.5, 0.5, 0.5), val=0.2)
    write_run(lr_sweep / "1", "finetune", "3", (0.5, 0.5, 0.5), val=0.3)
    write_run(lr_sweep / "2", "piggyback", "3", (0.5, 0.5, 0.5), val=0.9)
    write_run(lr_sweep / "3", "finetune_sequential", "1", (0.5, 0.5, 0.5), val=0.9)
    compare_table.main([str(sweep), "--paper", "--lr-from", str(lr_sweep)])
    out = capsys.readouterr().out
    table = markdown_rows(out)
    assert [table[m][0] for m in ("finetune", "piggyback")] == ["3", "3"]
    assert table["finetune"][5] == "500"  # the reference is the chosen finetune run
    assert f"another sweep, `{lr_sweep}` (tasks: signs, tiles, cifar10_small)" in out

    compare_table.main([str(lr_sweep), "--print-lr"])
    assert capsys.readouterr().out.splitlines() == [
        "method=finetune method.lr_scale=3",
        "method=finetune_sequential method.lr_scale=1",
        "method=piggyback method.lr_scale=3",
    ]


def test_lr_choice_missing_here_is_an_error(compare_table, sweep, tmp_path, capsys):
    lr_sweep = tmp_path / "lr"
    write_run(lr_sweep / "0", "finetune", "10", (0.5, 0.5, 0.5), val=0.2)
    with pytest.raises(SystemExit) as info:
        compare_table.main([str(sweep), "--paper", "--lr-from", str(lr_sweep)])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {sweep} has no run of finetune at method.lr_scale=10 (chosen in {lr_sweep})"
    )
    with pytest.raises(SystemExit):
        compare_table.main([str(tmp_path / "nothing")])
    assert capsys.readouterr().err.startswith("error: no */metrics.json under")


def test_compare_layout_is_unchanged(compare_table, sweep):
    assert compare_table.table(sweep).splitlines() == [
        "| method | lr x | signs | tiles | cifar10_small | mean | BWT | task bytes (sum) |",
        "|---|---|---|---|---|---|---|---|",
        "| finetune | 1 | 80.0 | 50.0 | 90.0 | 73.3 | +0.0 | 90.00 MB |",
        "| finetune_sequential | 1 | 40.0 | 50.0 | 90.0 | 60.0 | -30.0 | 90.00 MB |",
        "| piggyback | 1 | 90.0 | 25.0 | 70.0 | 61.7 | +0.0 | 2.70 MB |",
    ]


def test_mask_choices_get_one_row_each(compare_table, tmp_path):
    """A sweep over mask granularity (the `mask` group, or KSM's own method.mask options)
    keeps one row per choice, each with its own lr chosen on validation."""
    root = tmp_path / "sweep"
    for i, (method, key, value, lr, val) in enumerate(
        [
            ("piggyback", "mask", "kernel", "1", 0.5),
            ("piggyback", "mask", "kernel", "3", 0.6),
            ("piggyback", "mask", "filter", "1", 0.4),
            ("ksm", "method.mask.granularity", "filter", "3", 0.3),
            ("ksm", None, None, "1", 0.3),
        ]
    ):
        extra = {key: value} if key else None
        write_run(root / str(i), method, lr, (0.5, 0.5, 0.5), val=val, extra=extra)
    rows = markdown_rows(compare_table.table(root))
    assert {name: row[0] for name, row in rows.items() if name != "method"} == {
        "ksm": "1",
        "ksm (mask.granularity=filter)": "3",
        "piggyback (mask=filter)": "1",
        "piggyback (mask=kernel)": "3",
    }
