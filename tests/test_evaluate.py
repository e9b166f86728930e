"""Evaluation entry point: table files with the right rows and values, method comparison,
decathlon score, stored-accuracy fallback, and user errors as exit code 2."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from piggyback.backbones import build_backbone
from piggyback.data import DigitsDataModule
from piggyback.evaluate import evaluate, find_artifact_files, load_entries, run
from piggyback.formats import load_artifact, save_artifact
from piggyback.masks.stats import total_sparsity
from piggyback.methods import apply_artifact, extract_artifact
from piggyback.models.multitask import state_bytes
from piggyback.models.testing import TINY_RUN
from piggyback.nn.convert import mask_model
from piggyback.scores.decathlon import decathlon_domain_scores, decathlon_score
from piggyback.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_cache) -> Path:
    """A multirun-like folder: a two-task piggyback run and a one-task classifier-only run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from piggyback.train import CONF_DIR

    root = tmp_path_factory.mktemp("runs")
    jobs = {
        "0_method=piggyback": ("data=demo", "~data.tasks.inverted", "method=piggyback"),
        "1_method=classifier_only": ("data=digits/rotated", "method=classifier_only"),
    }
    for name, overrides in jobs.items():
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*TINY_RUN, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(root / name)
            cfg.paths.cache_dir = str(demo_cache)
            cfg.paths.data_dir = str(root / "data")
        train(cfg)
    return root


def _eval_cfg(make_cfg, *overrides):
    return make_cfg(*overrides, "print_table=false", config_name="eval")


def _reference_top1(artifact, demo_cache, batches=2) -> float:
    """Accuracy of the task on its own (fresh backbone, this artifact only)."""
    backbone = build_backbone("small_cnn", weights="demo", cache_dir=demo_cache).model
    if artifact.method == "piggyback":
        mask_model(backbone)
    head = apply_artifact(backbone.eval(), artifact)
    variant = artifact.task.removeprefix("digits_")
    dm = DigitsDataModule(variant=variant)
    dm.setup("test")
    correct = total = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.test_dataloader()):
            if i >= batches:
                break
            correct += int((head(backbone(x)).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def test_evaluate_writes_tables_with_right_rows_and_values(runs, make_cfg, demo_cache):
    cfg = _eval_cfg(make_cfg, f"artifacts={runs}", "limit_test_batches=2")
    result = evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    for name in ("results.md", "results.json", "results.csv", "comparison.md", "comparison.csv"):
        assert (out / name).is_file(), name

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["task"], r["method"]) for r in rows} == {
        ("digits_rotated", "piggyback"),
        ("digits_mod3", "piggyback"),
        ("digits_rotated", "classifier_only"),
    }
    for r in rows:
        artifact = load_artifact(r["artifact"])
        assert r["source"] == "test split" and int(r["n_test"]) == 64
        assert float(r["top1_pct"]) == pytest.approx(_reference_top1(artifact, demo_cache))
        assert int(r["task_bytes"]) == artifact.task_bytes()
        if artifact.method == "piggyback":
            off = 100 * total_sparsity(artifact.unpacked_masks())
            assert float(r["masked_off_pct"]) == pytest.approx(off)
            assert float(r["bits_per_masked_weight"]) == pytest.approx(1.0, abs=1e-3)
        else:
            assert r["masked_off_pct"] == "" and r["bits_per_masked_weight"] == ""

    saved = json.loads((out / "results.json").read_text())
    pig = saved["summary"]["piggyback"]
    accs = [r["top1_pct"] for r in result["rows"] if r["method"] == "piggyback"]
    assert pig["mean_top1_pct"] == pytest.approx(sum(accs) / 2)
    backbone = build_backbone("small_cnn", weights="demo", cache_dir=demo_cache).model
    storage = pig["storage"]
    assert storage["backbone_bytes"] == state_bytes(backbone.state_dict())
    assert storage["total_bytes"] == storage["backbone_bytes"] + sum(
        r["task_bytes"] for r in result["rows"] if r["method"] == "piggyback"
    )
    assert storage["total_bytes"] < storage["separate_networks_bytes"]
    assert pig["decathlon_score"] is None  # digits are not decathlon domains

    with open(out / "comparison.csv") as f:
        comp = list(csv.DictReader(f))
    assert list(comp[0]) == ["task", "classifier_only", "piggyback"]  # the paper's order
    by_task = {r["task"]: r for r in comp}
    assert by_task["digits_mod3"]["classifier_only"] == ""  # that run did not learn it
    assert float(by_task["digits_rotated"]["piggyback"]) == pytest.approx(
        next(
            r["top1_pct"]
            for r in result["rows"]
            if r["method"] == "piggyback" and r["task"] == "digits_rotated"
        )
    )
    assert "mean top-1" in by_task and "total bytes" in by_task
    report = (out / "results.md").read_text()
    assert "| digits_mod3 | piggyback |" in report and "Comparison" in report


def test_repeated_runs_get_one_column_each_unless_latest_only(runs, tmp_path):
    again = tmp_path / "2_rerun" / "artifacts"
    again.mkdir(parents=True)
    src = next((runs / "1_method=classifier_only" / "artifacts").glob("*.safetensors"))
    (again / src.name).write_bytes(src.read_bytes())
    entries, notes = load_entries([runs, tmp_path])
    labels = {e.label for e in entries if e.artifact.method == "classifier_only"}
    assert labels == {"classifier_only@1_method=classifier_only", "classifier_only@2_rerun"}
    entries, notes = load_entries([runs, tmp_path], latest_only=True)
    assert sum(e.artifact.method == "classifier_only" for e in entries) == 1
    assert len(notes) == 1 and "ignored" in notes[0]


def _decathlon_artifact(pretrained, task: str, acc: float, root: Path):
    head = torch.nn.Linear(pretrained.feature_dim, 10)
    data = {
        "_target_": "piggyback.data.DecathlonDataModule",
        "task_name": task,
        "num_classes": 10,
        "root": str(root / "missing"),
        "domain": task,
    }
    config = {
        "backbone": {"name": "small_cnn", "weights": "demo", "cache_dir": None},
        "data": {"tasks": {task: data}},
        "paths": {"data_dir": str(root)},
    }
    return extract_artifact(
        pretrained.model,
        head,
        task=task,
        backbone_name="small_cnn",
        method="classifier_only",
        config=config,
        metrics={"test/acc": acc, "test/acc_top5": 1.0},
    )


ACCS = {"aircraft": 0.70, "svhn": 0.97}


@pytest.fixture
def decathlon_run(tmp_path, demo_cache) -> Path:
    """Head-only artifacts named after decathlon domains whose data is not on disk."""
    pretrained = build_backbone("small_cnn", weights="demo", cache_dir=demo_cache)
    folder = tmp_path / "run" / "artifacts"
    for task, acc in ACCS.items():
        artifact = _decathlon_artifact(copy.deepcopy(pretrained), task, acc, tmp_path)
        save_artifact(artifact, folder / f"{task}.safetensors")
    return tmp_path / "run"


def test_decathlon_score_and_stored_accuracy_fallback(make_cfg, decathlon_run):
    accs = ACCS
    cfg = _eval_cfg(make_cfg, f"artifacts={decathlon_run}")
    result = evaluate(cfg)
    rows = {r["task"]: r for r in result["rows"]}
    for task, acc in accs.items():
        assert rows[task]["source"] == "stored"
        assert rows[task]["top1_pct"] == pytest.approx(100 * acc)
        assert "test data unavailable" in rows[task]["note"]
        points = decathlon_domain_scores({task: 100 * acc})[task]
        assert rows[task]["decathlon_points"] == pytest.approx(points)
    expected = decathlon_score({t: 100 * a for t, a in accs.items()})
    assert result["summary"]["classifier_only"]["decathlon_score"] == pytest.approx(expected)
    report = (Path(cfg.paths.output_dir) / "results.md").read_text()
    assert "decathlon S" in report and "**stored**" in report and "test data unavailable" in report

    strict = _eval_cfg(make_cfg, f"artifacts={decathlon_run}", "fallback_to_stored=false")
    with pytest.raises(FileNotFoundError, match="fallback_to_stored"):
        evaluate(strict)


def test_tables_go_to_wandb_offline(make_cfg, decathlon_run, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _eval_cfg(make_cfg, f"artifacts={decathlon_run}", "logger=wandb")
    assert cfg.logger.wandb.offline is True
    evaluate(cfg)
    tables = list(
        Path(cfg.paths.output_dir).glob("wandb/offline-run-*/files/media/table/**/*.json")
    )
    assert len(tables) == 1 and "results" in tables[0].name
    import wandb

    assert wandb.run is None  # finished, so the next job starts a fresh run


def test_user_errors_exit_2_with_a_message(make_cfg, tmp_path, capsys):
    cfg = _eval_cfg(make_cfg, f"artifacts={tmp_path / 'nowhere'}")
    with pytest.raises(SystemExit) as exc:
        run(cfg)
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="python train.py"):
        find_artifact_files(tmp_path / "empty")


def test_best_by_val_picks_one_run_per_task_by_validation_not_test(runs, make_cfg, tmp_path):
    """An LR sweep: three runs of one task; the best val/acc wins even with the worst test."""
    src = load_artifact(next((runs / "1_method=classifier_only" / "artifacts").glob("*")))
    sweep = tmp_path / "multirun"
    for job, (val, test) in enumerate([(0.5, 0.9), (0.8, 0.1), (0.7, 0.95)]):
        artifact = copy.deepcopy(src)
        artifact.metrics = {**artifact.metrics, "val/acc": val, "test/acc": test}
        save_artifact(artifact, sweep / f"{job}_lr={job}" / "artifacts" / f"{src.task}.safetensors")
    entries, notes = load_entries(sweep)
    assert len(entries) == 3  # without selection every run is its own column
    entries, notes = load_entries(sweep, best_by_val=True)
    assert [e.run for e in entries] == ["1_lr=1"]
    assert entries[0].label == "classifier_only"
    assert "val/acc=0.8000 best of 3 runs" == entries[0].selection
    assert len(notes) == 1 and "selected run 1_lr=1" in notes[0]

    cfg = _eval_cfg(make_cfg, f"artifacts={sweep}", "best_by_val=true", "limit_test_batches=1")
    result = evaluate(cfg)
    (row,) = result["rows"]
    assert row["run"] == "1_lr=1" and row["selection"].startswith("val/acc=0.8000")
    assert any("selected run 1_lr=1" in n for n in result["notes"])
    assert "selected run 1_lr=1" in (Path(cfg.paths.output_dir) / "results.md").read_text()


def test_a_run_from_scratch_is_evaluated_on_the_same_random_init(make_cfg, tmp_path, demo_cache):
    """``backbone.weights=null``: the init is drawn from ``backbone.init_seed`` (the run's
    seed), so evaluate.py rebuilds the very weights the tasks trained on (it used to refuse
    them: another random init, another fingerprint) and gets the run's own test accuracy."""
    cfg = make_cfg(*TINY_RUN, "data=digits/rotated", "method=wsn", "backbone.weights=null",
                   "seed=3")  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"]
    artifact = load_artifact(tmp_path / "run" / "artifacts" / "digits_rotated.safetensors")
    assert artifact.config["backbone"]["init_seed"] == 3
    result = evaluate(_eval_cfg(make_cfg, f"artifacts={tmp_path / 'run'}", "limit_test_batches=2"))
    with open(Path(result["output_dir"]) / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["source"] == "test split"
    assert float(row["top1_pct"]) == pytest.approx(100 * record["digits_rotated"]["test/acc"])


def test_a_random_init_is_a_function_of_its_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    a = build_backbone("small_cnn", weights=None, init_seed=5).model.state_dict()
    assert torch.equal(torch.rand(3), before)  # the global stream did not move
    b = build_backbone("small_cnn", weights=None, init_seed=5).model.state_dict()
    c = build_backbone("small_cnn", weights=None, init_seed=6).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
