"""`benchmarks/domains_table.py --quick`: the experiment=domains sweep on generated image
folders in the real layout, then issue 21's table (rows, S, bytes, BWT) from its run folders.

Kept to seconds: two small domains and cifar10_small (the other domains are dropped with
``~data.tasks.<name>``), two methods, one epoch, and the small CNN with 3 input channels and
random weights as the backbone (the table, not the accuracy, is under test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piggyback.models.testing import markdown_rows, paper_table_header
from piggyback.scores.decathlon import scores_against_reference

KEPT = {"pacs_sketch": 7, "retina": 5}
DROPPED = ("sign_digits", "gtsrb", "flowers17", "magnetic_tiles")
FAST = (
    "backbone=small_cnn",
    "backbone.weights=null",
    "+backbone.kwargs.in_channels=3",
    "trainer.max_epochs=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=8",
)


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import compare_table
    import domains_table

    return compare_table, domains_table


def test_quick_sweep_prints_the_domains_table(
    benchmarks, image_tree, tmp_path, capsys, monkeypatch
):
    compare_table, domains_table = benchmarks
    data = tmp_path / "data"
    for seed, (name, classes) in enumerate(KEPT.items()):
        image_tree(data / "domains" / name, classes, seed)
    image_tree(data / "cifar10_small", 10, 99)
    monkeypatch.chdir(tmp_path)  # nothing may be written outside --out
    out = tmp_path / "sweep"
    domains_table.main(
        [
            "--quick",
            "--out",
            str(out),
            "--methods",
            "piggyback,finetune",
            f"paths.data_dir={data}",
            *(f"~data.tasks.{name}" for name in DROPPED),
            *FAST,
        ]
    )
    printed = capsys.readouterr().out
    table = markdown_rows(printed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "sweep"]
    assert table["method"] == paper_table_header(["pacs_sketch", "retina"])
    assert list(table)[1:] == ["finetune", "piggyback"]  # the reference first
    runs = {
        r["method"]: r["summary"]
        for r in compare_table.best_by_val(compare_table.load_runs(out)).values()
    }
    final = {m: compare_table.final_accuracy(s) for m, s in runs.items()}
    domains = {m: {t: final[m][t] for t in KEPT} for m in runs}
    for method, cells in ((m, table[m]) for m in runs):
        assert cells[0] == "1"  # --quick: one learning rate
        assert cells[1:3] == [f"{100 * final[method][t]:.1f}" for t in KEPT]
        assert cells[4] == f"{100 * final[method]['cifar10_small']:.1f}"
        score = sum(scores_against_reference(domains[method], domains["finetune"]).values())
        assert cells[5] == f"{score:.0f}"
        task_bytes = [runs[method]["cl"]["task_bytes"][t] for t in KEPT]
        assert cells[6:8] == [
            compare_table.format_bytes(sum(task_bytes) / 2),
            compare_table.format_bytes(sum(task_bytes)),
        ]
        seconds = [runs[method]["cl"]["train_seconds"][t] for t in KEPT]
        assert all(v > 0 for v in seconds) and cells[8] == f"{sum(seconds) / 2:.0f}"
        # no forgetting by construction: one network per task / masks on a frozen backbone
        assert runs[method]["cl"]["bwt"] == 0.0 and cells[9] == "+0.0"
    assert table["finetune"][5] == "500"  # 250 per domain by construction
    # 1 bit per weight against 32: the masks (and the head) are a small fraction of a network
    ratio = [runs[m]["cl"]["task_bytes"]["retina"] for m in ("piggyback", "finetune")]
    assert ratio[0] < ratio[1] / 20
    assert "this sweep, never on test" in printed
    assert printed.strip().endswith(
        "Budget: small_cnn, 32 px, 1 epoch(s) per task of at most 2 batches."
    )

    # the same folder reprinted, with the lr choice taken from it as if it were another sweep
    domains_table.main(["--out", str(out), "--table-only", "--lr-from", str(out)])
    again = capsys.readouterr().out
    assert markdown_rows(again) == table
    assert "(tasks: pacs_sketch, retina, cifar10_small), whose choice is reused here" in again


def test_an_existing_sweep_folder_is_refused(benchmarks, tmp_path, capsys):
    _, domains_table = benchmarks
    (tmp_path / "0_method=finetune").mkdir()
    (tmp_path / "0_method=finetune" / "metrics.json").write_text(json.dumps({}))
    with pytest.raises(SystemExit) as info:
        domains_table.main(["--quick", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path} already holds runs; choose a new --out, or add --table-only"
    )


def test_lr_from_runs_each_method_once_at_its_chosen_scale(benchmarks, tmp_path):
    _, domains_table = benchmarks
    lr_sweep = tmp_path / "lr"
    for job, (method, lr, val) in enumerate(
        [("piggyback", "0.3", 0.2), ("piggyback", "3", 0.4), ("finetune", "1", 0.5)]
    ):
        folder = lr_sweep / str(job)
        (folder / ".hydra").mkdir(parents=True)
        tasks = {"retina": {"task": "retina", "val/acc": val, "test/acc": 0.0}}
        (folder / "metrics.json").write_text(json.dumps({"method": method, "tasks": tasks}))
        overrides = f"- method={method}\n- method.lr_scale={lr}\n"
        (folder / ".hydra" / "overrides.yaml").write_text(overrides)
    commands = domains_table.sweep_commands(
        tmp_path / "out", quick=True, methods=None, overrides=["x=1"], lr_from=lr_sweep
    )
    tails = [c[c.index("experiment=domains") + 1 :] for c in commands]
    quick = [o for o in domains_table.QUICK if not o.startswith("method.lr_scale")]
    sweep_dir = f"hydra.sweep.dir={tmp_path / 'out'}"
    assert tails == [
        [*quick, "method=finetune", "method.lr_scale=1", "x=1", sweep_dir],
        [*quick, "method=piggyback", "method.lr_scale=3", "x=1", sweep_dir],
    ]
