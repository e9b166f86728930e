"""The sweep callback: exit 2 when a job of this sweep failed, not for older failures."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from piggyback.config.sweep import SweepExitCode, record_job_failure


def _config(sweep_dir) -> object:
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})


def test_a_failed_job_of_this_sweep_exits_2(tmp_path, capsys):
    config = _config(tmp_path)
    old = record_job_failure(tmp_path / "0_data=a", "error: job 0 failed earlier")
    os.utime(old, (0, 0))  # from an earlier sweep into the same folders
    callback = SweepExitCode()
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)  # the old failure alone does not count
    record_job_failure(tmp_path / "1_data=b", "error: job 1 failed")
    with pytest.raises(SystemExit) as info:
        callback.on_multirun_end(config)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: 1 job(s) of this sweep failed (see error.txt in {tmp_path / '1_data=b'})"
    )
    assert (tmp_path / "1_data=b" / "error.txt").read_text() == "error: job 1 failed\n"
