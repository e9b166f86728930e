"""`benchmarks/first_task_budget.py`: the commands it launches (first task alone, each budget,
resumable), the records it reads from run folders in train.py's layout (metrics.json and the
csv logger's metrics.csv), the prune epoch and the table's gaps, and its one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def budget(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import first_task_budget

    return first_task_budget


def write_run(
    folder: Path, method: str, test: float, val: list[float], flips: list[float] | None = None
) -> None:
    """A finished single-task run: metrics.json (tasks, cl and run blocks) and
    csv/<task>/metrics.csv with an epoch-end training row (masks/flipped) and a validation row
    per epoch."""
    folder.mkdir(parents=True)
    run = {"method": method, "seed": 0, "lr_scale": 10.0, "date": "2026-12-08T00:00:00+00:00",
           "commit": "abc", "processor": "AMD EPYC", "cpu_count": 2, "threads": 1}  # fmt: skip
    task = {"test/acc": test, "val/acc": val[-1]}
    cl = {"tasks": ["signs"], "accuracy_matrix": [[test]], "task_bytes": {"signs": 1000},
          "train_seconds": {"signs": 5.0}}  # fmt: skip
    document = {"tasks": {"signs": task}, "cl": cl, "run": run}
    (folder / "metrics.json").write_text(json.dumps(document))
    (folder / "csv" / "signs").mkdir(parents=True)
    fields = ["epoch", "masks/flipped", "val/acc"]
    with (folder / "csv" / "signs" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for epoch, acc in enumerate(val):
            flip = "" if flips is None else flips[epoch]
            writer.writerow({"epoch": epoch, "masks/flipped": flip, "val/acc": ""})
            writer.writerow({"epoch": epoch, "masks/flipped": "", "val/acc": acc})


def test_parse_setting_labels_and_rejects(budget):
    assert budget.parse_setting("finetune") == ("finetune", "finetune", [])
    assert budget.parse_setting("packnet:method.prune=0.5,method.bn=frozen") == (
        "packnet_prune0.5_bnfrozen",
        "packnet",
        ["method.prune=0.5", "method.bn=frozen"],
    )
    with pytest.raises(budget.BudgetError, match="expected method"):
        budget.parse_setting("packnet:prune")


def test_run_all_launches_first_task_alone_and_resumes(budget, tmp_path):
    tasks, batches = budget.experiment_tasks("family")
    assert tasks[0] == "sign_digits" and len(tasks) == 7 and batches == 15
    write_run(tmp_path / "finetune" / "e10" / "seed0", "finetune", 0.8, [0.8])
    launched = []

    def launch(command, folder):
        launched.append((command, folder))
        return 1 if "packnet" in str(folder) and "e20" in str(folder) else 0

    failed = budget.run_all(
        tmp_path, experiment="family", settings=["finetune", "packnet:method.prune=0.5"],
        epochs=[20, 10], scale="10", seed="0", launch=launch,
    )  # fmt: skip
    folders = [str(f.relative_to(tmp_path)) for _, f in launched]
    assert folders == ["packnet_prune0.5/e10/seed0", "finetune/e20/seed0",
                       "packnet_prune0.5/e20/seed0"]  # fmt: skip
    assert failed == [str(tmp_path / "packnet_prune0.5" / "e20" / "seed0")]
    command = launched[0][0]
    assert "~data.tasks.sign_digits" not in command
    assert {f"~data.tasks.{t}" for t in tasks[1:]} <= set(command)
    for override in ("method=packnet", "method.prune=0.5", "trainer.max_epochs=10",
                     "method.lr_scale=10", "logger=csv", "seed=0"):  # fmt: skip
        assert override in command


def test_gather_reads_prune_epoch_and_table_gaps(budget, tmp_path):
    write_run(tmp_path / "finetune" / "e3" / "seed0", "finetune", 0.90, [0.5, 0.8, 0.9])
    write_run(tmp_path / "finetune" / "e2" / "seed0", "finetune", 0.85, [0.6, 0.85])
    write_run(
        tmp_path / "packnet_prune0.5" / "e3" / "seed0", "packnet", 0.75,
        [0.6, 0.8, 0.7], flips=[0.0, 0.0, 0.5],
    )  # fmt: skip
    (tmp_path / "packnet_prune0.5" / "e9" / "seed0").mkdir(parents=True)  # unfinished: left out
    runs = budget.gather(tmp_path)
    assert [(r["setting"], r["epochs"]) for r in runs] == [
        ("finetune", 2), ("finetune", 3), ("packnet_prune0.5", 3)]  # fmt: skip
    packnet = runs[-1]
    assert packnet["prune_epoch"] == 2 and packnet["val_curve"] == [0.6, 0.8, 0.7]
    assert runs[0]["prune_epoch"] is None
    rows = budget.table(runs, batches=15).splitlines()
    assert rows[0].startswith("| epochs | steps | finetune | packnet_prune0.5 |")
    assert rows[3] == "| 3 | 45 | 90.0 | 75.0 (-15.0; val 80.0 → 70.0 → 70.0) | 85.0 |"
    assert rows[2] == "| 2 | 30 | 85.0 | - | - |"


def test_main_gather_writes_results_and_errors_exit_2(budget, tmp_path, capsys):
    write_run(tmp_path / "runs" / "finetune" / "e2" / "seed0", "finetune", 0.85, [0.6, 0.85])
    out = tmp_path / "results.json"
    budget.main(["gather", str(tmp_path / "runs"), "--out", str(out)])
    document = json.loads(out.read_text())
    assert document["batches_per_epoch"] == 15 and document["runs"][0]["test"] == 0.85
    assert "| 2 | 30 | 85.0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        budget.main(["gather", str(tmp_path / "empty")])
    assert stop.value.code == 2
    assert "no finished run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        budget.main(["run", "--settings", "packnet:prune", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "expected method" in capsys.readouterr().err


def test_an_unknown_experiment_exits_2_before_any_run(budget, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        budget.main(["--experiment", "nope", "run", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "experiment 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
