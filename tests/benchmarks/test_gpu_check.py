"""`benchmarks/gpu_check.sh`: it refuses a machine without CUDA, and its 5-minute budget
runs every step in order or reports the ones it has no time left for.

A GPU session is short and rare, so the script's own logic is checked here, on CPU, with
stand-ins for ``python`` and ``pytest`` that answer at once: what runs on the GPU is
run.py and train.py, tested elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: a CUDA device, benchmarks that print one line, a train.py run
case "$1" in
  -c) case "$2" in
        *is_available*) exit 0 ;;
        *get_device_name*) echo "device = Fake GPU | torch test"; exit 0 ;;
      esac ;;
  benchmarks/run.py) shift; echo "fake_figure = 1.000  (info)  [run.py $*]"; exit 0 ;;
  train.py)
    for a in "$@"; do case "$a" in hydra.run.dir=*) dir="${a#hydra.run.dir=}" ;; esac; done
    mkdir -p "$dir" && echo '{"metrics": {"test/acc": 0.5}}' > "$dir/metrics.json"; exit 0 ;;
esac
exec REAL_PYTHON "$@"
"""


def run_check(tmp_path: Path, budget: int | None = None, fake: bool = True):
    env = dict(os.environ)
    if fake:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").write_text(FAKE_PYTHON.replace("REAL_PYTHON", sys.executable))
        (bin_dir / "pytest").write_text("#!/usr/bin/env bash\necho '1 passed in 0.1s'\n")
        for f in bin_dir.iterdir():
            f.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    (tmp_path / "data" / "cifar10_small").mkdir(parents=True)
    env["OUT"] = str(tmp_path / "out")
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    out = run_check(tmp_path, fake=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: no CUDA device visible to torch; run this on a GPU machine"
    ]
    assert " = " not in out.stdout


def test_every_step_runs_in_order_and_prints_its_figures(tmp_path):
    out = run_check(tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    headers = [line for line in lines if line.startswith("== ")]
    assert [h.split()[1] for h in headers] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    figures = [line for line in lines if line.startswith("fake_figure = ")]
    assert len(figures) == 3
    assert "--only train inference switch memory loader faults" in figures[0]
    assert figures[1].endswith("[run.py --device cuda --quick --only compile]")
    assert "--compile-option layout_optimization=false" in figures[2]
    assert "1 passed" in out.stdout
    assert any(line.startswith("gpu_cifar10_small_1epoch_test_acc = 0.5") for line in lines)
    assert "skipped" not in out.stdout
    wall = [line for line in lines if line.startswith("gpu_check_wall_s = ")]
    assert len(wall) == 1 and "(budget 290 s)" in wall[0]


def test_a_spent_budget_skips_each_step_with_a_line(tmp_path):
    out = run_check(tmp_path, budget=10)
    assert out.returncode == 0, out.stderr
    skipped = [line.split(" = ")[0] for line in out.stdout.splitlines() if "= skipped" in line]
    assert skipped == [
        "gpu_tests",
        "gpu_benchmarks",
        "gpu_compile",
        "gpu_cifar10_small_1epoch",
        "gpu_compile_nolayout",
    ]
    assert "fake_figure" not in out.stdout
