"""Terminal output a user can read: Lightning's per-Trainer banners once per run.

A run builds one Lightning Trainer per task and per continual-learning test (nine for the
demo), and ``evaluate.py`` one per task; each prints the same "GPU available / TPU
available" banner and a "💡 Tip" advertisement through Lightning's ``rank_zero_info``
(the ``lightning.pytorch.utilities.rank_zero`` logger; ``lightning.fabric`` has its own),
and on a GPU the ``LOCAL_RANK ... CUDA_VISIBLE_DEVICES`` line from
``lightning.pytorch.accelerators.cuda``. :class:`OncePerRun` puts a logging filter on those
loggers that lets each such message through the first time and drops its repeats; every
other message (progress bars, model summary, "max_epochs reached", warnings) is untouched.

It also silences one warning nobody here can act on: Lightning's ``_pytree`` helper still
constructs torch's deprecated ``LeafSpec`` (torch >= 2.10 warns with a ``FutureWarning`` on
every such call site); the filter matches that message from that module only.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ContextDecorator
from typing import Any

__all__ = ["REPEATED_BANNERS", "OncePerRun", "OnceFilter"]

#: Loggers whose per-Trainer banners repeat, and the starts of the messages to show once.
REPEATED_BANNERS: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        "GPU available:",
        "TPU available:",
        "💡 Tip:",
        "Running in `fast_dev_run` mode",
    ),
    "lightning.fabric.utilities.rank_zero": ("GPU available:", "TPU available:", "💡 Tip:"),
    "lightning.pytorch.accelerators.cuda": ("LOCAL_RANK:",),
}

#: Lightning's own call of torch's deprecated ``LeafSpec()`` (lightning/pytorch/utilities/_pytree).
LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LEAFSPEC_MODULE = r"lightning\.pytorch\.utilities\._pytree"


class OnceFilter(logging.Filter):
    """Passes a message that starts with one of ``prefixes`` only the first time it is seen."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefixes):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class OncePerRun(ContextDecorator):
    """While active (a ``with`` block or a decorated function), each banner of
    :data:`REPEATED_BANNERS` is printed once and the LeafSpec warning not at all; on exit
    the loggers and warning filters are as they were, so a second run shows them again."""

    def _recreate_cm(self) -> OncePerRun:
        return type(self)()  # a fresh filter set per call of a decorated function

    def __enter__(self) -> OncePerRun:
        self._filters = [
            (logging.getLogger(name), OnceFilter(prefixes))
            for name, prefixes in REPEATED_BANNERS.items()
        ]
        for logger, once in self._filters:
            logger.addFilter(once)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings(
            "ignore", message=LEAFSPEC_MESSAGE, category=FutureWarning, module=LEAFSPEC_MODULE
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self._warnings.__exit__(*exc)
        for logger, once in self._filters:
            logger.removeFilter(once)
