"""train(cfg) and the train.py CLI, end to end on the offline demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from piggyback.config.validate import ConfigError
from piggyback.formats import load_artifact
from piggyback.nn import get_masks
from piggyback.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
)


@pytest.mark.parametrize(
    "method",
    [
        "piggyback",
        "piggyback_bn",
        "piggyback_lean",
        "finetune",
        "finetune_sequential",
        "classifier_only",
        "packnet",
        "cpg",
    ],
)
def test_fast_dev_run_each_method(make_cfg, method):
    cfg = make_cfg("data=digits/rotated", f"method={method}", "debug=fast")
    metrics = train(cfg)
    assert "test/acc" in metrics
    artifact = load_artifact(
        Path(cfg.paths.output_dir) / "artifacts" / "digits_rotated.safetensors"
    )
    assert artifact.method == cfg.method.name
    assert bool(artifact.masks) == (cfg.method.name == "piggyback")
    assert bool(artifact.bn_state) == (method in ("piggyback_bn", "packnet", "cpg"))
    assert bool(artifact.weights) == method.startswith("finetune")
    # owner index + owned values (+ CPG's pick bits)
    assert bool(artifact.extra) == (method in ("packnet", "cpg"))


def test_packnet_runs_the_demo_sequence(make_cfg):
    cfg = make_cfg(*TINY, "method=packnet", "logger=none", "callbacks=none")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    names = sorted(p.name for p in (out / "artifacts").iterdir())
    assert names == [f"digits_{t}.safetensors" for t in ("inverted", "mod3", "rotated")]
    mod3 = load_artifact(out / "artifacts" / "digits_mod3.safetensors")
    assert mod3.extra_meta["previous_tasks"] == ["digits_rotated", "digits_inverted"]
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_sequence_writes_artifacts_metrics_and_table(make_cfg, capsys):
    cfg = make_cfg(*TINY, "logger=csv", "callbacks=none")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    names = sorted(p.name for p in (out / "artifacts").iterdir())
    assert names == [f"digits_{t}.safetensors" for t in ("inverted", "mod3", "rotated")]
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["tasks"]) == {"digits_rotated", "digits_inverted", "digits_mod3"}
    for record in summary["tasks"].values():
        assert 0.0 <= record["test/acc"] <= 1.0
        assert 0.0 <= record["masked_off"] < 1.0
        assert record["bits_per_masked_weight"] == pytest.approx(1.0, abs=0.01)
    accs = [r["test/acc"] for r in summary["tasks"].values()]
    assert metrics["test/acc"] == pytest.approx(sum(accs) / 3)
    assert metrics["digits_mod3/test/acc"] == summary["tasks"]["digits_mod3"]["test/acc"]
    table = capsys.readouterr().out
    assert "digits_inverted" in table and "masked off" in table
    # each task logs to its own CSV version folder, the continual-learning summary to "cl"
    assert sorted(p.name for p in (out / "csv").iterdir()) == sorted([*summary["tasks"], "cl"])
    # the artifacts carry the resolved config and the class names
    artifact = load_artifact(out / "artifacts" / "digits_mod3.safetensors")
    assert artifact.class_names == ["0", "1", "2"] and artifact.num_classes == 3
    assert artifact.config["data"]["tasks"]["mod3"]["variant"] == "mod3"


def test_existing_artifact_is_never_overwritten(make_cfg):
    cfg = make_cfg("data=digits/mod3", "debug=fast")
    train(cfg)
    path = Path(cfg.paths.output_dir) / "artifacts" / "digits_mod3.safetensors"
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="overwrite"):  # refused before training
        train(cfg)
    assert path.read_bytes() == before


def test_wandb_offline_run_dir_holds_logged_metrics(make_cfg):
    cfg = make_cfg("data=digits/mod3", *TINY, "logger=wandb", "callbacks=none")
    train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    # The offline record log stores history items as key + JSON-encoded value.
    record_log = files[0].read_bytes()
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    test_acc = logged["tasks"]["digits_mod3"]["test/acc"]
    for key in (b"test/acc", b"val/acc", b"train/loss", b"masks/zeros"):
        assert key in record_log, key
    assert json.dumps(test_acc).encode() in record_log


def _cli(*args: str, cwd: Path, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIGGYBACK_CACHE": str(cache), "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_multirun_over_two_demo_tasks_writes_two_artifacts(tmp_path, demo_cache):
    result = _cli(
        "-m",
        "data=digits/rotated,digits/mod3",
        *TINY,
        "logger=none",
        "callbacks=none",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
        cache=demo_cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    artifacts = sorted(p.name for p in (tmp_path / "sweep").rglob("artifacts/*.safetensors"))
    assert artifacts == ["digits_mod3.safetensors", "digits_rotated.safetensors"]
    assert len(list((tmp_path / "sweep").rglob("metrics.json"))) == 2


def test_a_failing_multirun_job_does_not_stop_its_siblings(tmp_path, demo_cache):
    """joblib launcher, two jobs at once: the one with a missing dataset is reported with
    its overrides; the healthy one still writes its artifact."""
    result = _cli(
        "-m",
        "hydra/launcher=parallel",
        "data=digits/rotated,finegrained/cubs",
        f"paths.data_dir={tmp_path}/nowhere",
        *TINY,
        "logger=none",
        "callbacks=none",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
        cache=demo_cache,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: job 1 (data=finegrained/cubs," in result.stderr
    assert "the other jobs go on" in result.stderr and "Traceback" not in result.stderr
    artifacts = [p.name for p in (tmp_path / "sweep").rglob("artifacts/*.safetensors")]
    assert artifacts == ["digits_rotated.safetensors"]
    failed = [p.parent.name for p in (tmp_path / "sweep").rglob("error.txt")]
    assert len(failed) == 1 and failed[0].startswith("1_")
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: 1 job(s) of this sweep failed (see error.txt in {tmp_path}/sweep/{failed[0]})"
    )


def test_missing_dataset_is_a_clear_error_with_exit_code_2(tmp_path, demo_cache):
    result = _cli(
        "data=finegrained/cubs",
        f"paths.data_dir={tmp_path}/nowhere",
        "logger=none",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        cache=demo_cache,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


class DumpMasks(L.Callback):
    """Each rank saves its final masks (module level: ddp_spawn pickles callbacks)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        masks = get_masks(pl_module.backbone)
        torch.save(masks, self.folder / f"masks_rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_cpu_ddp_two_processes_end_with_identical_masks(make_cfg, tmp_path, monkeypatch):
    # spawned ranks unpickle DumpMasks as tests.test_train: the repo root must be importable
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    cfg = make_cfg(
        "data=digits/rotated",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp_spawn",
        "trainer.precision=32-true",
        *TINY,
        "logger=none",
        "callbacks=none",
        "save_artifacts=false",
        "test=false",
        "method.lr.masks=1e-2",  # steps big enough that 3 of them flip some masks
    )
    from piggyback.train import build_module
    from piggyback.utils.instantiate import build

    datamodule = build(cfg.data)
    module = build_module(cfg, datamodule)
    trainer = build(
        cfg.trainer, logger=False, callbacks=[DumpMasks(tmp_path)], enable_checkpointing=False
    )
    trainer.fit(module, datamodule=datamodule)
    rank0 = torch.load(tmp_path / "masks_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "masks_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any((m == 0).any() for m in rank0.values())
