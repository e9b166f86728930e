"""A multirun sweep in which a job failed exits with code 2 after all its jobs ran.

A job that fails with a user error reports it and returns, so its siblings still run (the
basic and joblib launchers stop a sweep at a job's exception). Without more, the sweep would
then exit 0 and ``train.py -m ... && next_step`` would go on as if all had worked. Each failed
job leaves ``error.txt`` in its own folder (launchers may run jobs in other processes, so a
file is what reaches the main process), and this Hydra callback, at the end of the sweep,
names them and exits 2. Files older than the sweep (a rerun into the same folders) are not
counted.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from piggyback.utils.atomic import atomic_write_text

ERROR_FILE = "error.txt"


def record_job_failure(job_dir: str | Path, message: str) -> Path:
    """Write (or replace) the job's ``error.txt``; it lives in the job's own folder."""
    return atomic_write_text(Path(job_dir) / ERROR_FILE, message + "\n", overwrite=True)


class SweepExitCode(Callback):
    """Hydra callback: exit 2 at the end of a sweep in which any job recorded a failure."""

    def __init__(self) -> None:
        self._start = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.time() - 1.0  # file mtimes may be rounded down to the second

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = sorted(
            path
            for path in Path(config.hydra.sweep.dir).glob(f"*/{ERROR_FILE}")
            if path.stat().st_mtime >= self._start
        )
        if failed:
            folders = ", ".join(str(p.parent) for p in failed)
            print(
                f"error: {len(failed)} job(s) of this sweep failed (see {ERROR_FILE} in {folders})",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(2)
