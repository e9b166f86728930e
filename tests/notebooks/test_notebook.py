"""The mask-sparsity notebook runs top to bottom on a fresh run's artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from piggyback.train import train

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "mask_sparsity.ipynb"


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("method", ["piggyback", "ksm"])
def test_notebook_runs_on_the_newest_demo_run(make_cfg, tmp_path, monkeypatch, method):
    """Laid out as after `python train.py`: outputs/demo/<time>/artifacts next to notebooks/.

    ``ksm``: kernel-granular soft masks (reduced shapes plus scales) go through the same cells.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cfg = make_cfg(
        f"method={method}",
        "data=demo",
        "~data.tasks.mod3",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "logger=none",
        "callbacks=none",
        "print_table=false",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "outputs" / "demo" / "2024-01-01_00-00-00")
    train(cfg)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.delenv("PIGGYBACK_ARTIFACTS", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path / "notebooks")}},
    )
    client.execute()  # raises CellExecutionError with the cell's traceback on failure

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "2 masked task(s)" in text and "digits_inverted" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # per-layer sparsity, change by depth, overlap heat map
    tables = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "separate fine-tuned networks" in tables and "digits_rotated" in tables
    assert ("kernel soft" in tables) == (method == "ksm")
