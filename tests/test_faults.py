"""Issue 18: a full disk, a read-only or vanished output folder, a diverging run, two runs in
one folder, and a data root that is not a folder each end in one ``error:`` line and exit 2,
leaving what was written before intact."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from piggyback.data.base import DataError
from piggyback.train import run
from piggyback.training.finite_loss import FiniteLossCheck, NonFiniteLoss
from piggyback.utils.atomic import atomic_write, atomic_write_stream, atomic_write_text
from piggyback.utils.checkpoint_io import AtomicCheckpointIO
from piggyback.utils.instantiate import build
from piggyback.utils.run_lock import HOLDER_FILE, RunLock, RunLocked
from piggyback.utils.write_errors import WriteError, exists_for_cli

REPO = Path(__file__).resolve().parents[1]
BASE = (
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
)
TINY = ("data=digits/rotated", *BASE, "trainer.max_epochs=2", "callbacks=default")
ONE = ("data=digits/rotated", *BASE, "trainer.max_epochs=1", "callbacks=none")
TASK = "digits_rotated"


def _leftovers(folder: Path) -> list[str]:
    """Temporary files left anywhere under ``folder`` (there must be none)."""
    return sorted(str(p) for p in folder.rglob("*.tmp"))


# --- 1. every write is atomic in its own folder; a failed write keeps the previous version


class _FailingFile(io.BufferedWriter):
    """A real file whose writes hit a full disk after ``limit`` bytes."""

    limit = 10

    def write(self, data):  # type: ignore[override]
        if self.tell() + len(data) > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _inject(monkeypatch, site: str, code: int = errno.ENOSPC, match: str = "") -> None:
    """Make the write of any file whose name contains ``match`` fail at ``site``."""
    error = OSError(code, os.strerror(code))
    if site == "write":
        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            if "w" not in mode or match not in os.path.basename(str(file)):
                return real_open(file, mode, *args, **kwargs)
            failing = _FailingFile(real_open(file, "wb", buffering=0))
            if "b" in mode:
                return failing
            return io.TextIOWrapper(failing, encoding=kwargs.get("encoding") or "utf-8")

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)  # Path.write_text opens through io.open
    elif site == "fsync":
        real_fsync = os.fsync

        def fake_fsync(fd):
            name = os.readlink(f"/proc/self/fd/{fd}")
            if name.endswith(".tmp") and match in os.path.basename(name):
                raise error
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fake_fsync)
    else:  # the final rename / link into place
        for name in ("replace", "link"):
            real = getattr(os, name)

            def fake(src, dst, *args, _real=real, **kwargs):
                if match in os.path.basename(str(dst)) and str(src).endswith(".tmp"):
                    raise error
                return _real(src, dst, *args, **kwargs)

            monkeypatch.setattr(os, name, fake)


@pytest.mark.parametrize("site", ["write", "fsync", "replace"])
@pytest.mark.parametrize("previous", [True, False])
def test_a_failed_write_keeps_the_previous_version_and_leaves_no_temp_file(
    tmp_path, monkeypatch, site, previous
):
    target = tmp_path / "run" / "last.ckpt"
    if previous:
        atomic_write_stream(target, lambda f: torch.save({"epoch": 0}, f), what="checkpoint")
    before = target.read_bytes() if previous else None
    _inject(monkeypatch, site)
    with pytest.raises(WriteError) as info:
        atomic_write_stream(
            target, lambda f: torch.save({"epoch": 1}, f), overwrite=True, what="checkpoint"
        )
    state = (
        f"the previous checkpoint is intact ({target})"
        if previous
        else "there was no previous checkpoint there and nothing partial is left"
    )
    assert str(info.value) == f"no space left on device while writing {target}; {state}"
    assert info.value.errno == errno.ENOSPC
    assert (target.read_bytes() if previous else None) == before
    assert target.exists() == previous
    assert sorted(p.name for p in target.parent.iterdir()) == (["last.ckpt"] if previous else [])


def test_the_temp_file_is_written_next_to_the_target(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append((a, b)), real_replace(a, b)))
    target = tmp_path / "a" / "metrics.json"
    atomic_write_text(target, "{}", overwrite=True)
    ((src, dst),) = seen
    assert Path(src).parent == target.parent and Path(dst) == target
    assert Path(src).name.startswith(".metrics.json.") and not Path(src).exists()


@pytest.mark.parametrize(
    ("code", "cause"),
    [(errno.EROFS, "read-only file system"), (errno.EDQUOT, "disk quota exceeded")],
)
def test_read_only_folder_and_quota_are_named(tmp_path, monkeypatch, code, cause):
    target = tmp_path / "r.json"
    _inject(monkeypatch, "replace", code)
    with pytest.raises(WriteError) as info:
        atomic_write_text(target, "{}", overwrite=True)
    assert str(info.value) == (
        f"{cause} while writing {target}; there was no previous version there and nothing "
        "partial is left"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_vanished_output_folder_is_not_recreated_for_a_checkpoint(tmp_path):
    root = tmp_path / "run"
    path = root / "checkpoints" / TASK / "last.ckpt"
    root.mkdir()
    io_ = AtomicCheckpointIO(root=root)
    io_.save_checkpoint({"epoch": 0}, path)
    assert torch.load(path)["epoch"] == 0
    for p in sorted(root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    root.rmdir()  # the output folder is deleted (or unmounted) under the run
    with pytest.raises(WriteError) as info:
        io_.save_checkpoint({"epoch": 1}, path)
    assert str(info.value) == (
        f"the folder {root} no longer exists (deleted or unmounted) while writing {path}; "
        "there was no previous checkpoint there and nothing partial is left"
    )
    assert not root.exists()


def test_an_existing_file_names_the_cli_option(tmp_path):
    target = atomic_write_text(tmp_path / "a.safetensors", "x")
    with pytest.raises(FileExistsError) as info:
        atomic_write(target, lambda tmp: Path(tmp).write_text("y"))
    assert exists_for_cli(info.value) == (
        f"{target} already exists; pick another output folder (hydra.run.dir=...) or set "
        "overwrite_artifacts=true"
    )
    assert "overwrite=True" not in exists_for_cli(info.value)


class WriteMeanwhile(L.Callback):
    """Another process writes ``path`` while this run trains."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"someone else's artifact")


def test_an_artifact_written_meanwhile_names_the_cli_option(make_cfg, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    cfg = make_cfg(*ONE)
    artifact = Path(cfg.paths.output_dir) / "artifacts" / f"{TASK}.safetensors"
    with open_dict(cfg):
        cfg.callbacks = {"meanwhile": {"_target_": "tests.test_faults.WriteMeanwhile"}}
        cfg.callbacks.meanwhile.path = str(artifact)
    code, err = _run_exit(cfg, capsys)
    assert (code, err[-1]) == (
        2,
        f"error: {artifact} already exists; pick another output folder (hydra.run.dir=...) or "
        "set overwrite_artifacts=true",
    )
    assert artifact.read_bytes() == b"someone else's artifact"


@pytest.mark.parametrize("option", ["cpu", "gpu", "ddp", "default"])
def test_every_trainer_config_writes_checkpoints_atomically(make_cfg, option):
    cfg = make_cfg(f"trainer={option}")
    cpu = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"}
    trainer = build(cfg.trainer, logger=False, **cpu)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.strategy.checkpoint_io.root == Path(cfg.paths.output_dir)


# --- 2. a full disk at each write site: one line, exit 2, nothing partial, previous intact


def _run_exit(cfg, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        run(cfg)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return info.value.code, err


class FailOnSecond(L.Callback):
    """After the first epoch's checkpoints, make the next write of ``last.ckpt`` hit ENOSPC
    (in the rename) and remember the first epoch's bytes."""

    before: bytes | None = None

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            type(self).before = self.path.read_bytes()
            real = os.replace

            def fail(src, dst, *args, **kwargs):
                if str(dst) == str(self.path):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(src, dst, *args, **kwargs)

            os.replace = fail


def test_disk_full_on_last_ckpt_keeps_the_previous_one_and_exits_2(make_cfg, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setattr(os, "replace", os.replace)  # restored after the test
    cfg = make_cfg(*TINY)
    last = Path(cfg.paths.output_dir) / "checkpoints" / TASK / "last.ckpt"
    with open_dict(cfg):
        cfg.callbacks["fail"] = {"_target_": "tests.test_faults.FailOnSecond", "path": str(last)}
    code, err = _run_exit(cfg, capsys)
    assert code == 2
    assert err[-1] == (
        f"error: no space left on device while writing {last}; the previous checkpoint is "
        f"intact ({last})"
    )
    assert "Traceback" not in "\n".join(err)
    assert last.read_bytes() == FailOnSecond.before  # the epoch-0 resume point, untouched
    assert torch.load(last, weights_only=False)["epoch"] == 0
    out = Path(cfg.paths.output_dir)
    assert not (out / "artifacts").exists() and not (out / "metrics.json").exists()
    assert _leftovers(out) == []


@pytest.mark.parametrize("site", ["write", "fsync", "replace"])
@pytest.mark.parametrize("target", [f"artifacts/{TASK}.safetensors", "metrics.json"])
def test_disk_full_on_artifact_or_metrics_exits_2_with_nothing_partial(
    make_cfg, capsys, monkeypatch, site, target
):
    cfg = make_cfg(*ONE)
    out = Path(cfg.paths.output_dir)
    _inject(monkeypatch, site, match=Path(target).name)
    code, err = _run_exit(cfg, capsys)
    assert code == 2
    assert err[-1] == (
        f"error: no space left on device while writing {out / target}; there was no previous "
        "version there and nothing partial is left"
    )
    assert not (out / target).exists()
    assert _leftovers(out) == []


def test_disk_full_on_evaluation_results_exits_2(make_cfg, capsys, monkeypatch):
    from piggyback.evaluate import run as evaluate_run

    trained = make_cfg(*ONE)
    run(trained)
    artifact = Path(trained.paths.output_dir) / "artifacts" / f"{TASK}.safetensors"
    cfg = make_cfg(f"artifacts={artifact}", "limit_test_batches=1", config_name="eval")
    out = Path(cfg.paths.output_dir) / "eval"
    cfg.paths.output_dir = str(out)
    _inject(monkeypatch, "replace", match="results.json")
    code, err = _run_exit_eval(evaluate_run, cfg, capsys)
    assert code == 2
    assert err[-1] == (
        f"error: no space left on device while writing {out / 'results.json'}; there was no "
        "previous version there and nothing partial is left"
    )
    assert _leftovers(out) == []


def _run_exit_eval(fn, cfg, capsys):
    with pytest.raises(SystemExit) as info:
        fn(cfg)
    return info.value.code, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


# --- 2b. the same on a real, small file system (root may mount tmpfs here)


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MB tmpfs mounted as ``run/checkpoints`` of an output folder under tmp_path, or a
    skip saying why there is none. (Only the checkpoints live on it: the run lock holds a
    file in the output folder open for writing, and a busy file system cannot be remounted
    read-only.)"""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class FillDisk(L.Callback):
    """At the start of epoch 1, fill the file system (or remount it read-only)."""

    before: bytes | None = None

    def __init__(self, mount: str, last: str, how: str) -> None:
        self.mount, self.last, self.how = Path(mount), Path(last), how

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        type(self).before = self.last.read_bytes()
        if self.how == "ro":
            subprocess.run(["mount", "-o", "remount,ro", str(self.mount)], check=True)
            return
        with open(self.mount / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass


@pytest.mark.parametrize(
    ("how", "cause"), [("full", "no space left on device"), ("ro", "read-only file system")]
)
def test_a_real_full_or_read_only_file_system(make_cfg, capsys, monkeypatch, small_fs, how, cause):
    monkeypatch.syspath_prepend(str(REPO))
    cfg = make_cfg(*TINY, "callbacks.model_checkpoint=null")
    cfg.paths.output_dir = str(small_fs.parent)
    last = small_fs / TASK / "last.ckpt"
    with open_dict(cfg):
        cfg.callbacks["fill"] = {
            "_target_": "tests.test_faults.FillDisk",
            "mount": str(small_fs),
            "last": str(last),
            "how": how,
        }
    code, err = _run_exit(cfg, capsys)
    assert code == 2, err[-5:]
    assert err[-1] == (
        f"error: {cause} while writing {last}; the previous checkpoint is intact ({last})"
    )
    assert last.read_bytes() == FillDisk.before
    assert _leftovers(small_fs) == []


# --- 3. a non-finite training loss stops the run


class Poison(L.Callback):
    """Set the head's weights to ``value`` before batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int, value: float) -> None:
        self.at, self.value = (epoch, batch), value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            with torch.no_grad():
                for p in pl_module.head.parameters():
                    p.fill_(self.value)


def _poisoned(make_cfg, monkeypatch, *extra: str):
    monkeypatch.syspath_prepend(str(REPO))
    cfg = make_cfg(*TINY, *extra)
    with open_dict(cfg):
        cfg.callbacks["poison"] = {
            "_target_": "tests.test_faults.Poison",
            "epoch": 1,
            "batch": 1,
            "value": float("nan"),
        }
    return cfg


def test_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(make_cfg, capsys, monkeypatch):
    cfg = _poisoned(make_cfg, monkeypatch)
    out = Path(cfg.paths.output_dir)
    last = out / "checkpoints" / TASK / "last.ckpt"
    code, err = _run_exit(cfg, capsys)
    assert code == 2
    # the demo's schedule drops x0.1 at 0.7 of the run: epoch 1 of these 2 epochs
    assert err[-1] == (
        f"error: task '{TASK}': the training loss became nan at epoch 1, step 1 (learning "
        "rates: masks=1e-05, bn=1e-05, head=1e-05); lower the learning rate "
        f"(method.lr_scale=0.1) or resume from {last}"
    )
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 0  # the epoch-0 resume point, not the poisoned weights
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    assert not (out / "artifacts").exists()
    assert not (out / "metrics.json").exists()


def test_a_diverging_learning_rate_exits_2(make_cfg, capsys):
    """A learning rate that sends the weights to inf (finetune at lr_scale=1e20 diverges in
    a few steps) exited 0 with chance accuracy and an artifact."""
    cfg = make_cfg(*TINY, "method=finetune", "method.lr_scale=1e20", "trainer.max_epochs=3")
    code, err = _run_exit(cfg, capsys)
    assert code == 2
    assert re.fullmatch(
        rf"error: task '{TASK}': the training loss became (nan|inf) at epoch \d+, step \d+ "
        r"\(learning rates: backbone=1e\+17, head=1e\+17\); lower the learning rate "
        r"\(method\.lr_scale=1e19\)( or resume from .*last\.ckpt|; no good checkpoint was "
        r"written before it)",
        err[-1],
    ), err[-1]
    assert not (Path(cfg.paths.output_dir) / "artifacts").exists()


def test_nonfinite_loss_warn_trains_on(make_cfg, capsys, monkeypatch):
    cfg = _poisoned(make_cfg, monkeypatch, "nonfinite_loss=warn")
    assert run(cfg) is None or True  # finishes; the sweeper's metric may be nan
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert err == [
        f"warning: task '{TASK}': the training loss became nan at epoch 1, step 1 (learning "
        "rates: masks=1e-05, bn=1e-05, head=1e-05); training goes on (nonfinite_loss=warn)"
    ]
    assert (Path(cfg.paths.output_dir) / "artifacts" / f"{TASK}.safetensors").exists()


def test_nonfinite_loss_in_a_multirun_is_a_failed_job(make_cfg, capsys, monkeypatch):
    cfg = _poisoned(make_cfg, monkeypatch)
    monkeypatch.setattr("piggyback.config.cli.multirun_job", lambda: "job 3 (method.lr_scale=1)")
    assert run(cfg) is None  # returns: the sweep's other jobs go on
    error = (Path(cfg.paths.output_dir) / "error.txt").read_text()
    assert error.startswith(
        f"error: job 3 (method.lr_scale=1) failed, the other jobs go on: task '{TASK}': the "
        "training loss became nan at epoch 1, step 1"
    )


def test_bad_nonfinite_loss_option_is_refused(make_cfg, capsys):
    cfg = make_cfg(*TINY, "nonfinite_loss=ignore")
    code, err = _run_exit(cfg, capsys)
    assert (code, err[-1]) == (
        2,
        "error: nonfinite_loss='ignore' is not valid; choose one of stop, warn",
    )


class _Optimizer:
    param_groups = [{"name": "masks", "lr": 1e-4}, {"lr": 2.5e-3}]


class _Trainer:
    current_epoch = 4
    optimizers = [_Optimizer()]


@pytest.mark.parametrize(
    ("loss", "kind"), [(float("inf"), "inf"), (float("-inf"), "inf"), (float("nan"), "nan")]
)
def test_the_check_names_nan_or_inf_and_says_when_no_checkpoint_exists(tmp_path, loss, kind):
    check = FiniteLossCheck("t", tmp_path / "last.ckpt", lr_scale=1e-2)
    check.on_train_batch_end(_Trainer(), None, {"loss": torch.tensor(1.0)}, None, 6)
    with pytest.raises(NonFiniteLoss) as info:
        check.on_train_batch_end(_Trainer(), None, {"loss": torch.tensor(loss)}, None, 7)
    assert str(info.value) == (
        f"task 't': the training loss became {kind} at epoch 4, step 7 (learning rates: "
        "masks=0.0001, group1=0.0025); lower the learning rate (method.lr_scale=0.001); no good "
        "checkpoint was written before it"
    )


def test_a_deferred_flag_is_read_one_step_later_or_before_any_checkpoint(tmp_path):
    """On an accelerator the flag of step k is read at the end of step k+1 (no sync on the
    step just queued); a checkpoint or validation reads a pending flag first."""
    (tmp_path / "last.ckpt").write_bytes(b"good")
    check = FiniteLossCheck("t", tmp_path / "last.ckpt", defer=True)
    trainer = _Trainer()
    check.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("nan"))}, None, 7)
    with pytest.raises(NonFiniteLoss, match=r"became nan at epoch 4, step 7 .* or resume from"):
        check.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, 8)
    for hook in ("on_save_checkpoint", "on_validation_start", "on_train_epoch_end"):
        check = FiniteLossCheck("t", defer=True)
        check.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("inf"))}, None, 9)
        args = (trainer, None, {}) if hook == "on_save_checkpoint" else (trainer, None)
        with pytest.raises(NonFiniteLoss, match=r"became inf at epoch 4, step 9"):
            getattr(check, hook)(*args)


@pytest.mark.gpu
def test_the_check_on_a_gpu_stops_at_the_nan_step():
    check = FiniteLossCheck("t")
    trainer = _Trainer()
    for step in range(3):
        check.on_train_batch_end(trainer, None, {"loss": torch.ones((), device="cuda")}, None, step)
    nan = torch.full((), float("nan"), device="cuda")
    check.on_train_batch_end(trainer, None, {"loss": nan}, None, 3)  # read at the next step
    with pytest.raises(NonFiniteLoss, match=r"became nan at epoch 4, step 3"):
        check.flush(trainer)


# --- 4. one run per folder


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from piggyback.utils.run_lock import RunLock; "
        f"lock = RunLock({str(folder)!r}).acquire(); print('held', flush=True); time.sleep(300)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_locked_folder_is_refused_at_once(make_cfg, capsys):
    cfg = make_cfg(*TINY)
    out = Path(cfg.paths.output_dir)
    holder = _hold_lock(out)
    try:
        start = time.monotonic()
        code, err = _run_exit(cfg, capsys)
        took = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    info = json.loads((out / HOLDER_FILE).read_text())
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["started"]))
    assert code == 2
    assert err[-1] == (
        f"error: another run (pid {holder.pid} on {info['host']}, started {started}) is writing "
        f"into {out}; wait for it to end, or pick another output folder (hydra.run.dir=...)"
    )
    assert took < 10
    assert not (out / "checkpoints").exists()  # refused before any work


def test_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    holder = _hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path) as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
        mine = json.loads((tmp_path / HOLDER_FILE).read_text())
        assert mine["pid"] == os.getpid()
        with pytest.raises(RunLocked):
            RunLock(tmp_path).acquire()  # held now, also within this process
    assert not (tmp_path / HOLDER_FILE).exists()  # a clean exit leaves no holder behind
    assert capsys.readouterr().err.startswith(
        f"note: taking over {tmp_path} from a run that was killed (pid {holder.pid} on "
    )
    with RunLock(tmp_path) as again:
        assert again.took_over is None


def test_other_ranks_of_a_distributed_run_do_not_lock(tmp_path, monkeypatch):
    with RunLock(tmp_path):
        monkeypatch.setenv("LOCAL_RANK", "1")
        with RunLock(tmp_path) as rank1:  # the same folder, not refused
            assert rank1.took_over is None


# --- 5. data.root that is a file, a dangling link or unreadable


def _imagefolder(make_cfg, root: Path):
    cfg = make_cfg(*BASE, "data=imagefolder", "data.num_classes=2", "data.task_name=t")
    cfg.data.root = str(root)
    cfg.data.num_workers = 0
    return cfg


def test_data_root_that_is_a_file_says_so(make_cfg, tmp_path, capsys):
    root = tmp_path / "images.zip"
    root.write_bytes(b"PK")
    code, err = _run_exit(_imagefolder(make_cfg, root), capsys)
    assert (code, err[-1]) == (
        2,
        f"error: task 't': dataset folder {root} is a file, not a folder; set data.root to "
        "the data set's folder",
    )


def test_data_root_that_is_a_dangling_link_says_so(make_cfg, tmp_path, capsys):
    root = tmp_path / "data"
    root.symlink_to(tmp_path / "unmounted" / "images")
    code, err = _run_exit(_imagefolder(make_cfg, root), capsys)
    assert (code, err[-1]) == (
        2,
        f"error: task 't': dataset folder {root} is a symbolic link to "
        f"{tmp_path / 'unmounted' / 'images'}, which does not exist; set data.root to the "
        "data set's folder",
    )


def test_data_root_that_is_unreadable_says_so(make_cfg, tmp_path, capsys, monkeypatch):
    root = tmp_path / "private"
    (root / "train" / "a").mkdir(parents=True)
    root.chmod(0)
    real = os.scandir

    def scandir(path="."):  # root reads anything: deny as the kernel would for a user
        if Path(path) == root:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "scandir", scandir)
    try:
        with pytest.raises(DataError) as info:
            cfg = _imagefolder(make_cfg, root)
            build(cfg.data).setup("fit")
    finally:
        root.chmod(0o755)
    assert str(info.value) == (
        f"task 't': dataset folder {root} is not readable by this user (permission denied); "
        "set data.root to the data set's folder"
    )
