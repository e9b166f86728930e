"""Lightning's per-Trainer banners reach the terminal once per run (``piggyback.utils.console``).

A demo run builds nine Trainers (three fits, six continual-learning tests) and evaluation one
per task; before ``OncePerRun`` each printed the "GPU available / TPU available" banner and the
"💡 Tip: ... litlogger" line, and Lightning's ``LeafSpec`` call added a FutureWarning.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

from lightning.pytorch.utilities._pytree import _tree_flatten

from piggyback.utils.console import REPEATED_BANNERS, OncePerRun

REPO = Path(__file__).resolve().parents[2]
RANK_ZERO = "lightning.pytorch.utilities.rank_zero"
BANNER = "GPU available: False, used: False"
OTHER = "`Trainer.fit` stopped: `max_epochs=1` reached."


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages[record.getMessage()] += 1


def test_a_banner_passes_once_per_run_and_other_messages_always():
    log = logging.getLogger(RANK_ZERO)  # Lightning's own handler; it does not propagate
    recorder = _Recorder()
    log.addHandler(recorder)
    try:
        with OncePerRun():
            for _ in range(3):
                log.info(BANNER)
                log.info(OTHER)
        log.info(BANNER)  # outside a run nothing is filtered

        @OncePerRun()
        def run() -> None:
            log.info(BANNER)
            log.info(BANNER)

        run()
        run()  # each call is a run of its own: the banner once more
    finally:
        log.removeHandler(recorder)
    assert recorder.messages[BANNER] == 1 + 1 + 2
    assert recorder.messages[OTHER] == 3
    assert not log.filters


def test_leafspec_warning_is_silenced_only_inside_a_run():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with OncePerRun():
            _tree_flatten(1)  # Lightning constructs torch's deprecated LeafSpec here
        inside = len(caught)
        _tree_flatten(1)
    assert inside == 0
    leafspec = [w for w in caught if "LeafSpec" in str(w.message)]
    assert len(leafspec) == 1 and leafspec[0].category is FutureWarning


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PIGGYBACK_CACHE": str(cache), "PYTHONPATH": str(REPO / "src")}


def _repeats(output: str) -> dict[str, int]:
    """Lines printed more than once among those that start like a repeated banner."""
    prefixes = tuple(p for group in REPEATED_BANNERS.values() for p in group)
    lines = Counter(line.strip() for line in output.splitlines())
    return {line: n for line, n in lines.items() if line.startswith(prefixes) and n > 1}


def test_demo_run_and_its_evaluation_print_each_banner_once(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "debug=fast", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=_env(demo_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    out = train.stdout + train.stderr
    assert _repeats(out) == {}
    assert out.count("GPU available:") <= 1 and out.count("💡 Tip") <= 1
    assert "LeafSpec" not in out
    assert out.count("Total params") == 1  # the model summary, once for the three tasks
    # the progress bars stay (TQDM's "Epoch 0:", or Rich's "Epoch 0/0" where rich is installed)
    assert re.search(r"Epoch 0[:/]", out)
    assert "average accuracy" in train.stdout  # and the tables

    evaluate = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), f"artifacts={run_dir}"]
        + [f"hydra.run.dir={tmp_path}/eval"],
        cwd=tmp_path,
        env=_env(demo_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    out = evaluate.stdout + evaluate.stderr
    assert _repeats(out) == {}
    assert out.count("GPU available:") <= 1 and out.count("💡 Tip") <= 1
    assert "was configured so 100%" not in out
    assert "LeafSpec" not in out
    assert "### Per task" in evaluate.stdout
