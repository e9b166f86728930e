"""`benchmarks/family.py`: run records gathered into results/family.json, the tables and plots
rendered from it (numbers checked), the lr chosen on validation, the resumable runner, and the
README's headline table kept equal to what the committed results render to.

Run folders are written with the code train.py uses (``run_summary``, ``cl_summary``,
``run_info``), so the records are in the real format."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from piggyback.models.testing import markdown_rows
from piggyback.scores.continual import cl_summary
from piggyback.training.records import run_info, run_summary

REPO = Path(__file__).resolve().parents[2]
TASKS = ("signs", "tiles", "cifar10_small")
PAGE = "intro\n<!-- {m}:begin -->\nold\n<!-- {m}:end -->\noutro\n"


@pytest.fixture
def family(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import family

    return family


def write_run(
    folder: Path,
    method: str,
    seed: int,
    scale: float,
    final: tuple[float, ...],
    *,
    val: float,
    first: tuple[float, ...] | None = None,
    task_bytes: int = 500_000,
    masked_off: float | None = None,
    collapsed: tuple[str, ...] = (),
    variant: str = "",
) -> None:
    """A finished run of the three-task sequence, as train.py writes it (metrics.json with
    its cl and run blocks, .hydra/config.yaml). ``first``: the accuracy matrix's diagonal."""
    first = first or final
    cfg = OmegaConf.create(
        {
            "seed": seed,
            "backbone": {"name": "efficientnet_lite0"},
            "method": {"name": method, "lr_scale": scale},
            "data": {"image_size": 64, "batch_size": 32},
            "trainer": {"max_epochs": 10, "limit_train_batches": 15, "precision": "32-true"},
            "model": {"channels_last": True},
        }
    )
    records = []
    for i, task in enumerate(TASKS):
        record = {"task": task, "method": method, "test/acc": first[i], "val/acc": val}
        record |= {"task_bytes": task_bytes, "train_seconds": 10.0 * (i + 1)}
        record |= {
            "collapsed": task in collapsed,
            "collapse_epochs": [3] if task in collapsed else [],
        }
        if masked_off is not None:
            record["masked_off"] = masked_off
        records.append(record)
    matrix = [[first[0], None, None], [final[0], first[1], None], list(final)]
    summary = run_summary(cfg, records)
    summary["cl"] = cl_summary(
        list(TASKS),
        matrix,
        task_bytes=[r["task_bytes"] for r in records],
        train_seconds=[r["train_seconds"] for r in records],
    )
    overrides = [f"method={method}", f"method.lr_scale={scale:g}", f"seed={seed}"]
    overrides += variant.split()
    summary["run"] = run_info(
        cfg, lr={"head": 1e-4 * scale}, seconds=300.0, overrides=overrides,
        choices={"method": method},
    )  # fmt: skip
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(OmegaConf.to_container(cfg)))
    (folder / "metrics.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path) -> Path:
    """finetune at x1 (chosen) and x3 (better test, worse val); piggyback at x1 (chosen, three
    seeds, tiles collapsed at seed 1) and x10."""
    root = tmp_path / "runs"
    write_run(root / "finetune/lr1/seed0", "finetune", 0, 1, (0.8, 0.6, 0.9), val=0.7,
              task_bytes=13_730_000)  # fmt: skip
    write_run(root / "finetune/lr1/seed1", "finetune", 1, 1, (0.6, 0.4, 0.7), val=0.7,
              task_bytes=13_730_000)  # fmt: skip
    write_run(root / "finetune/lr3/seed0", "finetune", 0, 3, (0.99, 0.99, 0.99), val=0.5,
              task_bytes=13_730_000)  # fmt: skip
    pb = {"masked_off": 0.004, "val": 0.8}
    write_run(root / "piggyback/lr1/seed0", "piggyback", 0, 1, (0.7, 0.5, 0.8), **pb)
    write_run(root / "piggyback/lr1/seed1", "piggyback", 1, 1, (0.9, 0.6, 0.8), **pb,
              collapsed=("tiles",))  # fmt: skip
    write_run(root / "piggyback/lr1/seed2", "piggyback", 2, 1, (0.6, 0.4, 0.8), **pb)
    write_run(root / "piggyback/lr10/seed0", "piggyback", 0, 10, (0.1, 0.1, 0.1), val=0.3,
              masked_off=0.5)  # fmt: skip
    return root


@pytest.fixture
def pages(family, tmp_path, monkeypatch) -> dict[str, Path]:
    """README and docs/results.md stand-ins with the markers, in tmp_path."""
    (tmp_path / "docs").mkdir()
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text(PAGE.format(m="family-headline"))
    docs.write_text(PAGE.format(m="family"))
    monkeypatch.setattr(family, "README", readme)
    monkeypatch.setattr(family, "DOCS", docs)
    return {"readme": readme, "docs": docs}


def _score(acc: float, ref: float) -> float:
    """The Visual Decathlon score of one domain against a reference accuracy."""
    e, e_max = 1 - acc, 2 * (1 - ref)
    return 1000 * max(0.0, e_max - e) ** 2 / e_max**2


def test_gather_chooses_on_validation_and_renders_mean_and_std(family, runs, pages, tmp_path):
    out = tmp_path / "results" / "family.json"
    family.main(["gather", str(runs), "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["tasks"] == list(TASKS) and results["near"] == ["cifar10_small"]
    # x1 wins on validation although x3's test accuracy is higher
    assert results["methods"]["finetune"]["lr_scale"] == 1.0
    assert results["methods"]["finetune"]["grid_val"] == pytest.approx({"1": 0.7, "3": 0.5})
    assert [r["seed"] for r in results["methods"]["piggyback"]["runs"]] == [0, 1, 2]
    run = results["methods"]["piggyback"]["runs"][1]
    assert run["collapsed"] == {"signs": False, "tiles": True, "cifar10_small": False}
    assert run["command"] == "python train.py method=piggyback method.lr_scale=1 seed=1"
    for key in ("commit", "torch", "machine", "cpu_count", "date", "seconds", "lr"):
        assert key in run

    readme = pages["readme"].read_text()
    assert readme.startswith("intro\n<!-- family-headline:begin -->\n| method |")
    assert readme.endswith("<!-- family-headline:end -->\noutro\n")
    table = markdown_rows(readme)
    assert table["method"] == [
        "lr ×", "seeds", "mean (2 domains)", "cifar10_small", "S", "bytes / task", "BWT",
        "masked off", "collapsed",
    ]  # fmt: skip
    assert list(table)[1:] == ["piggyback", "finetune"]  # best mean first
    # finetune: domain means 0.7 and 0.5 -> 60.0 ± 14.1; the reference is its seed mean
    # (signs 0.7, tiles 0.5), so S per seed: 444.4 + 360 and 111.1 + 160
    s0 = _score(0.8, 0.7) + _score(0.6, 0.5)
    s1 = _score(0.6, 0.7) + _score(0.4, 0.5)
    assert (round(s0, 1), round(s1, 1)) == (804.4, 271.1)
    # "1 ↓": 1 is the smallest scale of finetune's grid (1, 3), the best may lie below it
    assert table["finetune"] == [
        "1 ↓", "2", "60.0 ± 14.1", "80.0 ± 14.1", "538 ± 377", "13.73 MB", "+0.0 ± 0.0", "-", "0",
    ]  # fmt: skip
    # piggyback: domain means 0.6, 0.75, 0.5 -> 61.7 ± 12.6
    scores = [_score(a, 0.7) + _score(b, 0.5) for a, b in ((0.7, 0.5), (0.9, 0.6), (0.6, 0.4))]
    assert [round(s) for s in scores] == [500, 1054, 271]  # mean 608.5, std 402.8
    assert table["piggyback"] == [
        "1 ↓", "3", "61.7 ± 12.6", "80.0 ± 0.0", "609 ± 403", "0.50 MB", "+0.0 ± 0.0",
        "0.40 %", "1: tiles s1",
    ]  # fmt: skip

    docs = pages["docs"].read_text()
    rows = markdown_rows(docs.split("Final test accuracy per task")[1])
    assert rows["piggyback"] == ["73.3 ± 15.3", "50.0 ± 10.0 †", "80.0 ± 0.0", "15", "5.0"]
    date = results["methods"]["piggyback"]["runs"][0]["date"][:10]
    assert f"Runs: 5, {date}, on " in docs  # the chosen scale's runs, when and where
    assert "grid `method.lr_scale` 1, 10 (finetune: 1, 3)" in docs  # per method where it differs
    assert "family_accuracy_vs_bytes.png" in docs and "family_accuracy_matrix.png" in docs
    for name in ("family_accuracy_vs_bytes.png", "family_accuracy_matrix.png"):
        png = tmp_path / "docs" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_fails_when_a_page_differs_from_the_results(family, runs, pages, tmp_path):
    out = tmp_path / "family.json"
    family.main(["gather", str(runs), "--out", str(out)])
    family.main(["render", str(out), "--check"])  # up to date: no exit
    pages["readme"].write_text(pages["readme"].read_text().replace("61.7", "99.9"))
    with pytest.raises(SystemExit) as stop:
        family.main(["render", str(out), "--check"])
    assert stop.value.code == 1
    family.main(["render", str(out)])
    family.main(["render", str(out), "--check"])


def test_a_page_without_markers_is_an_error(family, runs, pages, tmp_path, capsys):
    pages["readme"].write_text("no markers\n")
    with pytest.raises(SystemExit) as stop:
        family.main(["gather", str(runs), "--out", str(tmp_path / "r.json")])
    assert stop.value.code == 2
    assert "family-headline:begin" in capsys.readouterr().err


def test_no_finished_run_is_an_error(family, tmp_path, capsys):
    (tmp_path / "empty" / "killed").mkdir(parents=True)
    (tmp_path / "empty" / "killed" / "metrics.json").write_text('{"tasks": {}}')  # no run block
    with pytest.raises(SystemExit) as stop:
        family.main(["gather", str(tmp_path / "empty"), "--no-render"])
    assert stop.value.code == 2
    assert "no finished run" in capsys.readouterr().err


def test_the_runner_chooses_at_seed_0_then_skips_finished_runs(family, tmp_path):
    out = tmp_path / "runs"
    launched = []
    vals = {"1": 0.5, "3": 0.9, "10": 0.1}

    def launch(overrides: list[str], folder: Path) -> int:
        options = dict(o.split("=", 1) for o in overrides)
        launched.append(options)
        method, seed, scale = options["method"], options["seed"], options["method.lr_scale"]
        write_run(folder, method, int(seed), float(scale), (0.5, 0.5, 0.5), val=vals[scale])
        return 0

    kwargs = {"methods": ["finetune", "cpg"], "scales": ["1", "3", "10"], "seeds": ["0", "1"]}
    assert family.run_family(out, launch=launch, overrides=["x=1"], **kwargs) == []
    done = [(o["method"], o["method.lr_scale"], o["seed"]) for o in launched]
    assert done == [
        ("finetune", "1", "0"), ("finetune", "3", "0"), ("finetune", "10", "0"),
        ("finetune", "3", "1"),
        ("cpg", "1", "0"), ("cpg", "3", "0"), ("cpg", "10", "0"), ("cpg", "3", "1"),
    ]  # fmt: skip
    assert all(o["x"] == "1" and o["overwrite_artifacts"] == "true" for o in launched)
    # CPG's reference: the fine-tuning run of its seed at fine-tuning's chosen scale
    assert launched[-1]["method.reference"] == str(
        (out / "finetune/lr3/seed1/metrics.json").resolve()
    )
    assert launched[-1]["hydra.run.dir"] == str((out / "cpg/lr3/seed1").resolve())

    launched.clear()
    assert family.run_family(out, launch=launch, **kwargs) == []
    assert launched == []  # run again: everything is finished, nothing is launched
    # CPG alone, later: its reference is still the fine-tuning run chosen earlier
    write_run(out / "finetune/lr3/seed2", "finetune", 2, 3, (0.5, 0.5, 0.5), val=0.9)
    kwargs = {"methods": ["cpg"], "scales": ["1", "3", "10"], "seeds": ["0", "2"]}
    assert family.run_family(out, launch=launch, **kwargs) == []
    assert [(o["method"], o["seed"]) for o in launched] == [("cpg", "2")]
    assert launched[0]["method.reference"] == str(
        (out / "finetune/lr3/seed2/metrics.json").resolve()
    )


def test_a_variant_is_tried_at_the_chosen_scale_and_chosen_on_validation(family, tmp_path):
    out = tmp_path / "runs"
    launched = []
    vals = {("1", ""): 0.5, ("10", ""): 0.6, ("10", "method.prune=0.5"): 0.8}

    def launch(overrides: list[str], folder: Path) -> int:
        options = dict(o.split("=", 1) for o in overrides)
        variant = "method.prune=0.5" if "method.prune" in options else ""
        launched.append((options["method.lr_scale"], variant, options["seed"], folder.name))
        scale, seed = options["method.lr_scale"], int(options["seed"])
        write_run(folder, "packnet", seed, float(scale), (0.5, 0.5, 0.5),
                  val=vals[scale, variant], variant=variant)  # fmt: skip
        return 0

    kwargs = {"methods": ["packnet"], "scales": ["1", "10"], "seeds": ["0", "1"]}
    variants = {"packnet": ["method.prune=0.5"]}
    assert family.run_family(out, launch=launch, variants=variants, **kwargs) == []
    assert [(s, v, seed) for s, v, seed, _ in launched] == [
        ("1", "", "0"), ("10", "", "0"), ("10", "method.prune=0.5", "0"),
        ("10", "method.prune=0.5", "1"),
    ]  # fmt: skip
    assert (out / "packnet/lr10_prune0.5/seed1/metrics.json").is_file()

    results = family.family_data.gather([out])
    entry = results["methods"]["packnet"]
    assert (entry["lr_scale"], entry["variant"]) == (10.0, "prune=0.5")
    assert entry["grid_val"] == pytest.approx({"1": 0.5, "10": 0.6, "10, prune=0.5": 0.8})
    assert [r["seed"] for r in entry["runs"]] == [0, 1]
    table = markdown_rows(family.family_render.headline_table(results))
    assert table["packnet"][0] == "10, prune=0.5 ↑"  # 10: the top of the lr grid
    assert "beyond the lr (at the chosen scale): packnet prune=0.5" in (
        family.family_render.provenance(results)
    )
    launched.clear()
    assert family.run_family(out, launch=launch, variants=variants, **kwargs) == []
    assert launched == []


def test_a_variant_may_set_several_keys(family, tmp_path):
    """``"method.grow=0.1 method.max_grows=8"``: both overrides reach train.py, the run has a
    folder of its own, and the gathered variant names both keys."""
    out = tmp_path / "runs"
    launched = []

    def launch(overrides: list[str], folder: Path) -> int:
        launched.append(overrides)
        options = dict(o.split("=", 1) for o in overrides)
        keys = ("method.grow", "method.max_grows")
        variant = " ".join(o for o in overrides if o.split("=", 1)[0] in keys)
        val = 0.9 if variant else 0.5
        write_run(folder, "cpg", int(options["seed"]), float(options["method.lr_scale"]),
                  (0.5, 0.5, 0.5), val=val, variant=variant)  # fmt: skip
        return 0

    variants = {"cpg": ["method.grow=0.1 method.max_grows=8"]}
    kwargs = {"methods": ["cpg"], "scales": ["1"], "seeds": ["0"]}
    assert family.run_family(out, launch=launch, variants=variants, **kwargs) == []
    assert "method.grow=0.1" in launched[1] and "method.max_grows=8" in launched[1]
    assert (out / "cpg/lr1_grow0.1_max_grows8/seed0/metrics.json").is_file()
    entry = family.family_data.gather([out])["methods"]["cpg"]
    assert entry["variant"] == "grow=0.1,max_grows=8"


def test_the_variants_are_read_from_the_experiment(family):
    variants = family.grid_variants()
    assert variants["packnet"] == ["method.prune=0.5", "method.prune=0.25"]
    assert (
        variants["piggyback"]
        == variants["ksm"]
        == [
            "method.lr.masks=2e-4",
            "method.lr.masks=5e-4",
        ]
    )


def test_a_failed_run_is_reported_and_the_others_go_on(family, tmp_path):
    def launch(overrides: list[str], folder: Path) -> int:
        return 1

    failed = family.run_family(
        tmp_path, launch=launch, methods=["piggyback"], scales=["1"], seeds=["0", "1"]
    )
    assert failed == [str(tmp_path / "piggyback/lr1/seed0")]


def test_the_protocol_is_read_from_the_experiment(family):
    methods, scales, seeds = family.sweep_params()
    assert methods[0] == "finetune" and "piggyback" in methods and "cpg" in methods
    assert scales == ["1", "10", "30"] and seeds == ["0", "1", "2"]
    registered = {p.stem for p in (REPO / "conf" / "method").glob("*.yaml")}
    assert set(methods) == registered - {"piggyback_lean"}  # a memory variant of piggyback


@pytest.mark.parametrize("experiment", ["family", "text_family", "family_split", "family_scratch"])
def test_the_pages_are_what_the_committed_results_render_to(family, experiment):
    """The README's headline table and every protocol's docs block (results/<name>.json)."""
    results = REPO / "results" / f"{experiment}.json"
    if not results.is_file():
        pytest.skip(f"results/{experiment}.json is not committed yet: benchmarks/family.py gather")
    assert family.render(results, check=True, plots=False, experiment=experiment) == [], (
        f"README.md or docs/results.md differ from results/{experiment}.json: "
        f"python benchmarks/family.py --experiment {experiment} render"
    )


def test_run_command_launches_train_py_with_one_thread(family, tmp_path, monkeypatch):
    calls, real_run = [], subprocess.run

    def fake_run(command, env=None, **kwargs):
        if "train.py" not in str(command[1]):
            return real_run(command, env=env, **kwargs)  # git, for the record's commit
        calls.append((command, env))
        options = dict(o.split("=", 1) for o in command[2:])
        write_run(Path(options["hydra.run.dir"]), "piggyback", 0, 1.0, (0.5, 0.5, 0.5), val=0.5)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(family.subprocess, "run", fake_run)
    argv = ["run", "--out", str(tmp_path), "--methods", "finetune", "--scales", "1"]
    family.main([*argv, "--seeds", "0", "paths.data_dir=/data"])
    ((command, env),) = calls
    assert command[1] == str(REPO / "train.py") and command[-1] == "paths.data_dir=/data"
    assert env["OMP_NUM_THREADS"] == "1"
    family.main([*argv, "--seeds", "0"])  # finished: not launched again
    assert len(calls) == 1


def test_the_papers_orderings_are_checked_seed_by_seed(family, runs):
    import family_claims

    results = family.family_data.gather([runs])
    # shared seeds 0 and 1; domain means finetune 0.7, 0.5 and piggyback 0.6, 0.75
    claim = family_claims.Claim("finetune", "piggyback", "x")
    found = family_claims.check(results, claim)
    assert found["diffs"] == pytest.approx([10.0, -25.0])
    assert found["verdict"] == "within the seed spread"
    results["methods"]["finetune"]["runs"][1]["test_final"]["tiles"] = 1.0  # seed 1: 0.8, +5
    assert family_claims.check(results, claim)["verdict"] == "holds"
    reverse = family_claims.Claim("piggyback", "finetune", "x")
    assert family_claims.check(results, reverse)["verdict"] == "reversed"
    rows = markdown_rows(family_claims.claims_table(results))
    assert rows["Mallya et al. 2018: Piggyback close to, below, fine-tuning (`finetune` − "
                "`piggyback`)"] == ["+7.5 ± 3.5", "2 of 2", "holds"]  # fmt: skip
    missing = rows["Hung et al. 2019: CPG ≥ PackNet (`cpg` − `packnet`)"][-1]
    assert missing == "not in the table (cpg, packnet)"


def test_another_experiment_runs_into_its_own_folders_and_block(
    family, runs, tmp_path, monkeypatch
):
    """``--experiment text_family``: its sweep and grids, ``experiment=text_family`` in every
    command, results/<name>.json by default, and docs/results.md's block of that name."""
    methods, scales, seeds = family.sweep_params(family.experiment_file("text_family"))
    assert "piggyback_bn" not in methods and methods[0] == "finetune" and "hat" in methods
    assert family.grid_variants(family.experiment_file("text_family"))["packnet"] == [
        "method.prune=0.5"
    ]
    command = family.train_command("wsn", "1", "0", tmp_path, [], experiment="text_family")
    assert command[0] == "experiment=text_family"
    docs = tmp_path / "results.md"
    docs.write_text(PAGE.format(m="text_family"))
    out = tmp_path / "text.json"
    family.family_data.write_results(family.family_data.gather([runs]), out)
    monkeypatch.setattr(family, "DOCS", docs)
    assert family.render(out, plots=True, experiment="text_family") == [docs]
    assert "text_family_accuracy_vs_bytes.png" in docs.read_text()
    # its own claims: Zhao et al.'s first, no task-BN claim on a network without BatchNorm
    claims = [r for r in markdown_rows(docs.read_text()) if r.startswith(("Zhao", "Mallya"))]
    assert claims[0].startswith("Zhao et al. 2020: masks on a frozen BERT > its classifier only")
    assert not any("piggyback_bn" in r or "classifier_only`" in r for r in claims[2:])
    assert (tmp_path / "text_family_accuracy_matrix.png").is_file()
    with pytest.raises(SystemExit) as stop:
        family.main(["--experiment", "nope", "render"])
    assert stop.value.code == 2


def test_the_scratch_protocol_trains_from_a_random_init_with_hats_own_init_on_the_grid(family):
    protocol = family.experiment_file("family_scratch")
    cfg = yaml.safe_load(protocol.read_text())
    assert cfg["backbone"]["weights"] is None
    assert family.grid_variants(protocol)["hat"] == ["method.embedding_init=normal"]
    assert family.grid_variants(protocol)["wsn"] == ["method.score_init=kaiming"]
    methods, _, _ = family.sweep_params(protocol)
    assert {"wsn", "hat", "packnet", "finetune_sequential"} <= set(methods)


def test_the_split_protocol_is_the_scratch_one_from_the_pretrained_network(family):
    split = yaml.safe_load(family.experiment_file("family_split").read_text())
    scratch = yaml.safe_load(family.experiment_file("family_scratch").read_text())
    assert "weights" not in split.get("backbone", {})  # the backbone's default: ImageNet
    assert split["trainer"] == scratch["trainer"]
    assert split["hydra"]["sweeper"] == scratch["hydra"]["sweeper"]
    assert split["hydra"]["sweep"]["dir"] == "runs/family_split"
    assert family.grid_variants(family.experiment_file("family_split"))["packnet"] == [
        "method.prune=0.5",
        "method.prune=0.25",
    ]


def test_one_method_under_two_settings_is_compared_seed_by_seed(family, runs, tmp_path, capsys):
    """``family.py compare``: e.g. fp32 against bf16, the paired difference against the seed
    spread."""
    first = family.family_data.gather([runs])
    second = json.loads(json.dumps(first))
    for run, delta in zip(second["methods"]["piggyback"]["runs"], (0.01, -0.01, 0.0), strict=True):
        run["test_final"] = {t: v + delta for t, v in run["test_final"].items()}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    family.main(["compare", str(a), str(b), "--method", "piggyback", "--labels", "fp32", "bf16"])
    rows = markdown_rows(capsys.readouterr().out)
    assert rows["0"] == ["60.0", "61.0", "+1.0"] and rows["1"] == ["75.0", "74.0", "-1.0"]
    assert rows["mean"][-1] == "+0.0 (seed spread 12.6): within the seed spread"
    for run in second["methods"]["piggyback"]["runs"]:
        run["test_final"] = {t: v + 0.3 for t, v in run["test_final"].items()}
    b.write_text(json.dumps(second))
    family.main(["compare", str(a), str(b), "--method", "piggyback"])
    assert "beyond the seed spread" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        family.main(["compare", str(a), str(b), "--method", "hat"])
    assert stop.value.code == 2
