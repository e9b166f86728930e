"""What both entry points share with Hydra and with the user's terminal.

The config folder, the errors a user can fix (printed as one ``error: ...`` line, exit code
2, never a traceback), the multirun rule that a failed job records its error and lets its
siblings run, and the note printed when the default demo recipe runs on other data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from piggyback.backbones import BackboneError
from piggyback.config.sweep import record_job_failure
from piggyback.config.validate import ConfigError
from piggyback.data.base import DataError
from piggyback.formats import ArtifactError
from piggyback.nn import MaskingError
from piggyback.nn.widen import WideningError
from piggyback.training.finite_loss import NonFiniteLoss
from piggyback.utils.run_lock import RunLocked
from piggyback.utils.write_errors import WriteError, exists_for_cli

CONF_DIR = os.environ.get("PIGGYBACK_CONF", str(Path(__file__).resolve().parents[3] / "conf"))
USER_ERRORS = (
    DataError,
    BackboneError,
    ArtifactError,
    ConfigError,
    FileExistsError,
    FileNotFoundError,
    WriteError,  # full disk, read-only or vanished output folder
    RunLocked,  # another run holds the output folder
    NonFiniteLoss,  # the training loss became nan/inf
    MaskingError,  # a layer the method cannot act on (HAT's refusals), named
    WideningError,  # a network that cannot grow as asked (CPG's growth), named
)

__all__ = [
    "CONF_DIR",
    "DEMO_CHOICES",
    "USER_ERRORS",
    "demo_recipe_note",
    "exit_with_error",
    "hydra_choices",
    "multirun_job",
    "user_error",
]


def _message(exc: BaseException) -> str:
    """What the user reads: a file that appeared meanwhile names the CLI option
    (``overwrite_artifacts=true``), never the Python argument ``overwrite=True``."""
    return exists_for_cli(exc) if isinstance(exc, FileExistsError) else str(exc)


def exit_with_error(exc: BaseException) -> NoReturn:
    """``error: <message>`` on stderr and exit code 2."""
    print(f"error: {_message(exc)}", file=sys.stderr)
    raise SystemExit(2) from None


def multirun_job() -> str | None:
    """``job N (overrides)`` inside a Hydra multirun, else None."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under @hydra.main (tests call train directly)
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"job {hydra_cfg.job.num} ({','.join(hydra_cfg.overrides.task)})"


def user_error(exc: BaseException, output_dir: str) -> None:
    """One line and exit 2; in a multirun, the job's overrides and no exit, so the sibling
    jobs of a sweep still run (the basic and joblib launchers stop at a job's exception),
    and an ``error.txt`` that makes the whole sweep exit 2 at its end
    (``piggyback.config.sweep``)."""
    job = multirun_job()
    if job is None:
        exit_with_error(exc)
    message = f"error: {job} failed, the other jobs go on: {_message(exc)}"
    print(message, file=sys.stderr, flush=True)
    record_job_failure(output_dir, message)


def hydra_choices() -> dict[str, Any]:
    """The config groups Hydra composed (``backbone``, ``data``, ...), empty outside Hydra."""
    try:
        return dict(HydraConfig.get().runtime.choices)
    except ValueError:  # not under @hydra.main
        return {}


DEMO_CHOICES = {"backbone": ("small_cnn",), "data": ("demo", "digits/")}


def demo_recipe_note(choices: dict[str, Any], cfg: DictConfig) -> str | None:
    """A note when the default ``experiment=demo`` (piggyback_bn, 10 epochs) runs on other
    data or another backbone, where a user would expect the paper's recipe."""
    if choices.get("experiment") != "demo":
        return None
    foreign = [
        f"{group}={choices.get(group)}"
        for group, ours in DEMO_CHOICES.items()
        if not str(choices.get(group)).startswith(ours)
    ]
    if not foreign:
        return None
    return (
        f"note: {' '.join(foreign)} runs under experiment=demo (the default), the demo's "
        f"recipe (method={choices.get('method')}, {cfg.trainer.max_epochs} epochs), not the "
        "paper's; add experiment=paper for the paper's recipe"
    )
