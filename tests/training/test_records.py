"""What a run records (issue 35): the collapse flag in the task's record and in the printed
table, metrics.json's ``run`` block, and ``skip_finished`` resuming a sweep."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from piggyback.train import train
from piggyback.training.collapse import CollapseMonitor
from piggyback.training.records import finished_metrics, format_table, run_info
from piggyback.training.task import collapse_record

REPO = Path(__file__).resolve().parents[2]


def test_table_marks_collapsed_tasks_and_names_them_at_the_end():
    records = [
        {"task": "a", "method": "piggyback", "test/acc": 0.9, "collapsed": False},
        {
            "task": "b",
            "method": "piggyback",
            "test/acc": 0.1,
            "collapsed": True,
            "collapse_epochs": [2, 3],
        },  # fmt: skip
        {"task": "c", "method": "piggyback", "test/acc": 0.5},  # not checked
        {
            "task": "d",
            "method": "piggyback",
            "test/acc": 0.5,
            "collapsed": False,
            "collapse_epochs": [1],
        },  # fmt: skip
    ]
    lines = format_table(records).splitlines()
    assert lines[0].split()[-1] == "collapse"
    assert lines[2].endswith("  no") and lines[3].endswith("  COLLAPSED")
    assert lines[4].endswith("  -") and lines[5].endswith("  recovered (warned: epoch 1)")
    assert lines[-1].startswith("warning: training collapsed in b (epoch 2, 3)")
    assert "warning" not in format_table(records[:1])


def test_collapse_record_reads_the_trainers_monitor():
    monitor = CollapseMonitor()
    trainer = SimpleNamespace(callbacks=[object(), monitor])
    assert collapse_record(trainer) == {"collapsed": None, "collapse_epochs": []}  # unchecked
    monitor.last_epoch_collapsed = False
    assert collapse_record(trainer) == {"collapsed": False, "collapse_epochs": []}
    monitor.collapsed_epochs += [3, 1]
    monitor.last_epoch_collapsed = True
    assert collapse_record(trainer) == {"collapsed": True, "collapse_epochs": [1, 3]}
    monitor.last_epoch_collapsed = False  # a slow start that recovered: warned, not collapsed
    assert collapse_record(trainer) == {"collapsed": False, "collapse_epochs": [1, 3]}
    assert collapse_record(SimpleNamespace(callbacks=[])) == {}  # callbacks=none: unchecked


def test_finished_metrics_needs_the_run_block(tmp_path):
    assert finished_metrics(tmp_path) is None
    (tmp_path / "metrics.json").write_text('{"metrics": {"val/acc": 0.5}}')  # an older run
    assert finished_metrics(tmp_path) is None
    (tmp_path / "metrics.json").write_text('{"metrics": {"val/acc": 0.5}, "run": {}}')
    assert finished_metrics(tmp_path) == {"val/acc": 0.5}
    (tmp_path / "metrics.json").write_text("{")  # cut short: not finished
    assert finished_metrics(tmp_path) is None


def test_run_info_says_how_the_run_was_made():
    cfg = OmegaConf.create(
        {"seed": 2, "method": {"name": "piggyback", "lr_scale": 3}, "trainer": {"precision": 32}}
    )
    info = run_info(
        cfg,
        lr={"masks": 1e-4, "head": 3e-4},
        seconds=12.5,
        overrides=["method=piggyback_bn", "data.root=/a b"],
        choices={"method": "piggyback_bn", "hydra/launcher": "basic"},
    )
    assert info["method"] == "piggyback_bn" and info["choices"] == {"method": "piggyback_bn"}
    assert (info["seed"], info["lr_scale"], info["seconds"]) == (2, 3.0, 12.5)
    assert info["lr"] == {"masks": 1e-4, "head": 3e-4}
    assert info["command"] == "python train.py method=piggyback_bn 'data.root=/a b'"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert info["commit"] == head.stdout.strip()
    assert info["torch"] and info["machine"] and info["cpu_count"] >= 1
    assert datetime.datetime.fromisoformat(info["date"]).tzinfo is not None
    json.dumps(info)  # goes into metrics.json as it is
    # the commit taken when the run started wins over the checkout at its end
    started = run_info(cfg, lr=None, seconds=1.0, commit=("abc123", False))
    assert (started["commit"], started["dirty"]) == ("abc123", False)


def test_a_collapse_reaches_the_record_and_the_table_and_a_finished_run_is_skipped(
    make_cfg, capsys
):
    # tolerance 0.99 from the first epoch: any loss counts as "at chance", so the real
    # monitor fires in a 2-step run
    cfg = make_cfg(
        "data=digits/rotated",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks.collapse_monitor.after_epochs=0",
        "callbacks.collapse_monitor.tolerance=0.99",
        "seed=3",
    )
    with pytest.warns(UserWarning, match="collapsed"):
        metrics = train(cfg)
    out = capsys.readouterr().out
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    record = summary["tasks"]["digits_rotated"]
    assert record["collapsed"] is True and record["collapse_epochs"] == [0]
    assert "COLLAPSED" in out and "warning: training collapsed in digits_rotated" in out
    run = summary["run"]
    assert run["seed"] == 3 and run["lr"] == {"masks": 1e-4, "head": 1e-4, "bn": 1e-4}
    assert run["seconds"] > 0 and run["precision"] == "32-true"

    cfg.skip_finished = True
    assert train(cfg) == metrics  # nothing trains: the folder holds a finished run
    assert "skipped:" in capsys.readouterr().out
