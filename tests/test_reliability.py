"""Issue 11: bad input fails fast with one `error:` line and exit 2; signals exit non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from piggyback.config.validate import ConfigError, check_channels, check_config, check_task_name
from piggyback.models.module import PiggybackModule
from piggyback.train import build_module, run, train
from piggyback.utils.instantiate import build

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "data=digits/rotated",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
)


@pytest.mark.parametrize("name", ["digits_rotated", "Vögel 2", "a-b_c", "鳥"])
def test_plain_task_names_pass(name):
    assert check_task_name(name) == name


@pytest.mark.parametrize("name", ["/abs/path/x", "a/b", "a.b", "..", "a\\b", "", " x", None])
def test_task_names_that_are_paths_are_refused(name):
    with pytest.raises(ConfigError, match=r"^invalid task name .*: use letters, digits"):
        check_task_name(name)


CASES = {
    "data.task_name=/abs/path/x": "invalid task name '/abs/path/x': use letters, digits, '_', "
    "'-' and spaces (no dots, path separators or leading/trailing spaces)",
    "artifact_encoding=zip": "artifact_encoding='zip' is not valid; choose one of bits, rice",
    "mask.threshold_fn=nonsense": "mask.threshold_fn='nonsense' is not valid; "
    "choose one of binarizer, ternarizer",
    "mask.mask_init=zeros": "mask.mask_init='zeros' is not valid; "
    "choose one of 1s, uniform, weight_based_1s",
    "mask.grad_rescale=x": "mask.grad_rescale='x' is not valid; "
    "choose one of none, average, individual",
    "data.batch_size=0": "data.batch_size must be a positive integer, got 0",
    "+model.compile_options.bogus=1": "model.compile_options.bogus is not an Inductor option "
    "(torch._inductor.config; e.g. layout_optimization, max_autotune)",
    "model.compile_options=3": "model.compile_options must be a mapping of Inductor options, got 3",
}


@pytest.mark.parametrize("override", list(CASES))
def test_bad_config_is_refused_before_training(make_cfg, override):
    cfg = make_cfg(*TINY, override)
    with pytest.raises(ConfigError) as info:
        check_config(cfg, [cfg.data])
    assert str(info.value) == CASES[override]


SIB = "method.optimizer._target_=piggyback.optim.StepInBackward"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (("method=piggyback_lean", "+trainer.gradient_clip_val=1.0"), "gradient_clip_val"),
        (("method=piggyback_lean", "+trainer.accumulate_grad_batches=2"), "accumulate_grad"),
        (("method=packnet", SIB), "method=packnet edits gradients after backward"),
        (("method=cpg", SIB), "method=cpg edits gradients after backward"),
        (
            ("method=piggyback_lean", "+method.optimizers.masks._target_=torch.optim.Adam"),
            r"StepInBackward cannot be one of several optimizers",
        ),
    ],
)
def test_step_in_backward_refuses_what_needs_gradients_after_backward(make_cfg, overrides, match):
    cfg = make_cfg(*TINY, *overrides)
    with pytest.raises(ConfigError, match=match):
        check_config(cfg, [cfg.data])


def test_compile_options_pass_the_checks_and_reach_torch_compile(make_cfg, monkeypatch):
    cfg = make_cfg(*TINY, "model.compile=true", "+model.compile_options.layout_optimization=false")
    check_config(cfg, [cfg.data])
    seen, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or real(m, **kw))
    module = build_module(cfg, build(cfg.data))  # torch.compile is lazy: nothing compiles yet
    assert seen == [{"options": {"layout_optimization": False}}]
    assert isinstance(module, PiggybackModule)  # from_compiled keeps the LightningModule


def test_lean_piggyback_config_passes_the_checks(make_cfg):
    cfg = make_cfg(*TINY, "method=piggyback_lean", "model.recompute_masked_weights=true")
    check_config(cfg, [cfg.data])


def test_ternary_masks_with_compressed_encoding_are_refused(make_cfg):
    cfg = make_cfg("mask=ternary", "artifact_encoding=rice")
    with pytest.raises(ConfigError, match=r"^artifact_encoding=rice stores binary masks only"):
        check_config(cfg, list(cfg.data.tasks.values()))


def test_existing_artifact_is_refused_before_training(make_cfg):
    cfg = make_cfg(*TINY)
    folder = Path(cfg.paths.output_dir) / "artifacts"
    folder.mkdir(parents=True)
    (folder / "digits_rotated.safetensors").write_bytes(b"old")
    with pytest.raises(ConfigError, match=r"digits_rotated.safetensors already exists"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # nothing trained


def test_three_channel_backbone_on_one_channel_data_is_named():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ConfigError) as info:
        check_channels(net, 1, "digits_rotated")
    assert str(info.value) == (
        "task 'digits_rotated': the backbone's first conv expects 3 input channels but the "
        "data has 1; pick a matching backbone or data transform"
    )
    check_channels(net, 3)


def test_wrong_num_classes_exits_2_with_one_line(make_cfg, capsys):
    cfg = make_cfg(*TINY, "data.num_classes=7", "logger=none")
    with pytest.raises(SystemExit) as info:
        run(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: task 'digits_rotated': config says num_classes=7 but digits variant 'rotated' "
        "has 10 classes. Fix the dataset or set data.num_classes=10."
    ]


def test_logger_none_with_default_callbacks_trains(make_cfg):
    cfg = make_cfg(*TINY, "logger=none", "callbacks=default")
    assert "test/acc" in train(cfg)


def test_rerun_into_same_folder_keeps_earlier_csv_logs(make_cfg):
    cfg = make_cfg(*TINY, "logger=csv", "callbacks=none", "overwrite_artifacts=true")
    train(cfg)
    first = Path(cfg.paths.output_dir) / "csv" / "digits_rotated" / "metrics.csv"
    before = first.read_bytes()
    train(cfg)
    assert first.read_bytes() == before
    assert (first.parents[1] / "digits_rotated_v1" / "metrics.csv").exists()


def _env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PIGGYBACK_CACHE": str(cache),
        "PYTHONPATH": str(REPO / "src"),
        "WANDB_MODE": "offline",
    }


def test_cli_user_errors_print_one_line_and_exit_2(tmp_path, demo_cache):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *TINY, "data.task_name=a.b"]
        + [f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        env=_env(demo_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: invalid task name 'a.b'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")]
)
def test_signal_saves_checkpoint_and_exits_with_the_shell_code(
    tmp_path, demo_cache, sig, code, name
):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "data=digits/rotated", "trainer.max_epochs=500"]
        + ["+trainer.limit_train_batches=5", "+trainer.limit_val_batches=1"]
        + ["trainer.enable_progress_bar=false", "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=_env(demo_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt = run_dir / "checkpoints" / "digits_rotated" / "epoch000.ckpt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    last = run_dir / "checkpoints" / "digits_rotated" / "last.ckpt"
    assert last.exists()
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted by {name}; checkpoint saved to {last}; resume with: "
        f"python train.py <same overrides> resume={last}"
    )
    assert "Traceback" not in err


def _bad_version_file(path: Path) -> Path:
    from piggyback.formats import ARTIFACT_FORMAT, write_checked_file

    return write_checked_file(
        path, {"x": torch.zeros(1)}, {}, file_format=ARTIFACT_FORMAT, version="v2x"
    )


def test_artifact_with_non_numeric_version_is_an_artifact_error(tmp_path):
    from piggyback.formats import ArtifactError, load_artifact

    path = _bad_version_file(tmp_path / "t.safetensors")
    with pytest.raises(ArtifactError) as info:
        load_artifact(path)
    assert str(info.value) == (f"{path} has a damaged header: version 'v2x' is not a number")


def test_evaluate_on_artifact_with_non_numeric_version_exits_2(make_cfg, tmp_path, capsys):
    from piggyback.evaluate import run as evaluate_run

    path = _bad_version_file(tmp_path / "a" / "artifacts" / "t.safetensors")
    cfg = make_cfg(f"artifacts={path}", config_name="eval")
    with pytest.raises(SystemExit) as info:
        evaluate_run(cfg)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {path} has a damaged header: version 'v2x' is not a number"
    ]


def test_every_written_file_gets_the_umask_mode(tmp_path):
    from piggyback.utils.atomic import atomic_write_text

    path = _bad_version_file(tmp_path / "t.safetensors")
    mode = 0o666 & ~_current_umask()
    assert path.stat().st_mode & 0o777 == mode
    text = atomic_write_text(tmp_path / "r.json", "{}")
    assert text.stat().st_mode & 0o777 == mode
    with pytest.raises(FileExistsError):
        atomic_write_text(text, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.safetensors"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_from_another_task_method_or_an_artifact_is_refused(tmp_path):
    from piggyback.config.validate import check_resume

    ckpt = tmp_path / "last.ckpt"
    hp = {"task": "digits_rotated", "method": "piggyback", "backbone": {"name": "small_cnn"}}
    torch.save({"state_dict": {}, "hyper_parameters": hp}, ckpt)
    check_resume(ckpt, "digits_rotated", "piggyback", "small_cnn")
    with pytest.raises(ConfigError) as info:
        check_resume(ckpt, "digits_mod3", "piggyback", "small_cnn")
    assert str(info.value) == (
        f"resume={ckpt} is a checkpoint of task 'digits_rotated', but this run is task "
        "'digits_mod3'; resume with the same data/method/backbone"
    )
    with pytest.raises(ConfigError, match=r"of method 'piggyback', but this run is method"):
        check_resume(ckpt, "digits_rotated", "finetune", "small_cnn")
    artifact = tmp_path / "t.safetensors"
    artifact.write_bytes(b"x")
    with pytest.raises(ConfigError) as info:
        check_resume(artifact, "digits_rotated", "piggyback", "small_cnn")
    assert str(info.value) == (
        f"resume={artifact} is a task artifact, not a training checkpoint; "
        "resume from checkpoints/<task>/last.ckpt of the killed run"
    )
    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(2), bare)
    with pytest.raises(ConfigError, match=r"is not a piggyback training checkpoint"):
        check_resume(bare, "digits_rotated", "piggyback", "small_cnn")


@pytest.mark.parametrize("method", ["piggyback", "ksm", "piggyback_lean"])
def test_resume_after_epoch_1_equals_the_uninterrupted_run(make_cfg, tmp_path, method):
    """Case 7: data order, RNG, optimizer and scheduler state all carry over last.ckpt
    (``ksm``: kernel-granular masks and their soft scales too; ``piggyback_lean``:
    LeanAdam's bf16 first moment, stepped in backward)."""
    args = (*TINY[:1], "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1")
    args += (f"method={method}",)
    args += ("+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false")
    args += ("logger=none", "callbacks=default", "method.scheduler.milestones=[0.6]")

    def run_to(epochs: int, out: str, *extra: str) -> Path:
        cfg = make_cfg(*args, f"trainer.max_epochs={epochs}", *extra)
        cfg.paths.output_dir = str(tmp_path / out)
        train(cfg)
        return Path(cfg.paths.output_dir) / "checkpoints" / "digits_rotated" / "last.ckpt"

    full = run_to(3, "full")
    killed = run_to(1, "killed")
    resumed = run_to(3, "resumed", f"resume={killed}")
    a = torch.load(full, weights_only=False)["state_dict"]
    b = torch.load(resumed, weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    learned = [k for k in a if k.endswith(("mask_real", "soft_scale")) or k.startswith("heads.")]
    assert learned and any("mask_real" in k for k in learned)
    assert any(k.endswith("soft_scale") for k in learned) == (method == "ksm")
    start = torch.load(killed, weights_only=False)["state_dict"]
    assert not all(torch.equal(start[k], a[k]) for k in learned)  # epochs 2-3 changed them
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refused_rerun_keeps_the_earlier_runs_hydra_config(tmp_path, demo_cache):
    """Case 5: Hydra writes .hydra/ before the job starts; a rerun gets .hydra_v1/ instead."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    earlier = run_dir / ".hydra" / "config.yaml"
    earlier.write_text("seed: 1\n")
    artifact = run_dir / "artifacts" / "digits_rotated.safetensors"
    artifact.parent.mkdir()
    artifact.write_bytes(b"an earlier run's artifact")
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=_env(demo_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {artifact} already exists; pick another output folder (hydra.run.dir=...) "
        "or set overwrite_artifacts=true"
    )
    assert earlier.read_text() == "seed: 1\n"
    assert artifact.read_bytes() == b"an earlier run's artifact"
    assert (run_dir / ".hydra_v1" / "config.yaml").exists()


def test_fresh_subdir_never_reuses_a_folder(tmp_path):
    from piggyback.utils.resolvers import fresh_subdir

    assert fresh_subdir(str(tmp_path), ".hydra") == ".hydra"
    (tmp_path / ".hydra").mkdir()
    assert fresh_subdir(str(tmp_path), ".hydra") == ".hydra_v1"
    (tmp_path / ".hydra_v1").mkdir()
    assert fresh_subdir(str(tmp_path), ".hydra") == ".hydra_v2"


def test_a_stopped_runs_last_ckpt_is_neither_overwritten_nor_resumed_silently(make_cfg):
    """A rerun into a folder whose run was stopped would overwrite its resume point (or, with
    Lightning's OnExceptionCheckpoint, silently resume from it): it is refused up front,
    unless it is that resume."""
    cfg = make_cfg(*TINY, "logger=none", "callbacks=default", "save_artifacts=false")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "digits_rotated" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert str(info.value) == (
        f"{last} exists: an earlier run in this folder stopped there; continue it with "
        f"resume={last}, pick another output folder (hydra.run.dir=...) or set "
        "overwrite_artifacts=true"
    )
    assert last.read_bytes() == before
    cfg.resume = str(last)
    check_config(cfg, [cfg.data])  # continuing that run in place is what it is there for
    other = make_cfg(*TINY, "logger=none", "callbacks=none", "overwrite_artifacts=true")
    other.method = make_cfg("method=classifier_only").method  # another run's optimizer state
    train(other)  # explicitly allowed: runs from scratch, does not load the old last.ckpt


def test_demo_recipe_on_other_data_gets_a_note(make_cfg):
    from piggyback.train import demo_recipe_note

    cfg = make_cfg("backbone=resnet18", "data=imagefolder")
    choices = {"experiment": "demo", "backbone": "resnet18", "data": "imagefolder"}
    choices["method"] = "piggyback_bn"  # what experiment=demo picks
    assert demo_recipe_note(choices, cfg) == (
        "note: backbone=resnet18 data=imagefolder runs under experiment=demo (the default), "
        "the demo's recipe (method=piggyback_bn, 10 epochs), not the paper's; add "
        "experiment=paper for the paper's recipe"
    )
    ours = {"experiment": "demo", "backbone": "small_cnn", "data": "digits/rotated"}
    assert demo_recipe_note(ours, cfg) is None
    assert demo_recipe_note({**choices, "experiment": "paper"}, cfg) is None
    paper = make_cfg("experiment=paper")
    assert (paper.method.name, paper.trainer.max_epochs, paper.method.scheduler.milestones) == (
        "piggyback",
        30,
        [0.5],
    )


def test_a_later_tasks_channel_mismatch_is_refused_before_the_first_trains(make_cfg, tmp_path):
    """A sequence whose third task has RGB images on the 1-channel demo backbone fails up
    front, not after the first two tasks have trained."""
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = tmp_path / "rgb" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    cfg = make_cfg(*TINY, "logger=none", "callbacks=none", "data=demo")
    rgb = make_cfg("data=imagefolder").data
    rgb.update(root=str(tmp_path / "rgb"), num_classes=2, task_name="photos", num_workers=0)
    with open_dict(cfg):
        cfg.data.tasks["photos"] = rgb
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert str(info.value) == (
        "task 'photos': the backbone's first conv expects 1 input channels but the data has 3; "
        "pick a matching backbone or data transform"
    )
    assert not (Path(cfg.paths.output_dir) / "artifacts").exists()  # nothing trained


class SigtermAt(L.Callback):
    """Sends this process SIGTERM, as a scheduler would, after one given training batch."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_after_sigterm_mid_epoch_equals_the_uninterrupted_run(
    make_cfg, tmp_path, monkeypatch
):
    """A preempted run (SIGTERM after batch 2 of epoch 2, after the LR step) resumed from its
    last.ckpt ends bit-identical: that epoch goes on with exactly the batches it had left."""
    from piggyback.train import Interrupted

    monkeypatch.syspath_prepend(str(REPO))  # callbacks.sigterm below is tests.test_reliability
    # whole epochs (no limit_train_batches): the resumed epoch must end where the full one does
    args = (*TINY[:1], "data.batch_size=128", "+trainer.limit_val_batches=1")
    args += ("+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false")
    args += ("logger=none", "callbacks=default", "method.scheduler.milestones=[0.5]")

    def run_to(out: str, *extra: str) -> Path:
        cfg = make_cfg(*args, "trainer.max_epochs=2", *extra)
        cfg.paths.output_dir = str(tmp_path / out)
        train(cfg)
        return Path(cfg.paths.output_dir) / "checkpoints" / "digits_rotated" / "last.ckpt"

    full = run_to("full")
    with pytest.raises(Interrupted):
        run_to(
            "killed",
            "+callbacks.sigterm._target_=tests.test_reliability.SigtermAt",
            "+callbacks.sigterm.epoch=1",
            "+callbacks.sigterm.batch=1",
        )
    killed = tmp_path / "killed" / "checkpoints" / "digits_rotated" / "last.ckpt"
    a = torch.load(full, weights_only=False)
    per_epoch = a["global_step"] // 2
    stopped = torch.load(killed, weights_only=False)
    assert (stopped["epoch"], stopped["global_step"]) == (1, per_epoch + 2)  # 2 batches in
    resumed = run_to("resumed", f"resume={killed}")
    b = torch.load(resumed, weights_only=False)
    assert b["global_step"] == a["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
