"""piggyback.methods.compaction: the round schedule, the goal's inputs and their errors (the
compaction's training is tested through CPG in test_cpg.py and test_cpg_growth.py)."""

import json
from types import SimpleNamespace

import pytest

from piggyback.methods.compaction import GoalCompaction, reference_accuracies


def _host(max_epochs: int) -> SimpleNamespace:
    return SimpleNamespace(trainer=SimpleNamespace(max_epochs=max_epochs))


def test_rounds_fill_the_last_compact_epochs_and_prune_evenly_or_by_step():
    even = GoalCompaction(compact_epochs=4, round_epochs=2, max_prune=0.9)
    assert even.rounds_total(_host(10)) == 2  # epochs 6-9, two rounds of two
    assert [even.round_target(r, 2) for r in (1, 2)] == pytest.approx([0.45, 0.9])
    stepped = GoalCompaction(compact_epochs=3, prune_step=0.4, max_prune=0.95)
    assert stepped.rounds_total(_host(10)) == 3
    assert [stepped.round_target(r, 3) for r in (1, 2, 3)] == pytest.approx([0.4, 0.8, 0.95])
    assert GoalCompaction(compact_epochs=0).rounds_total(_host(10)) == 0


def test_the_reference_comes_from_a_runs_metrics_or_a_number(tmp_path):
    run = tmp_path / "metrics.json"
    run.write_text(json.dumps({"tasks": {"a": {"val/acc": 0.8}, "b": {"val/acc": 0.6}}}))
    assert reference_accuracies(run) == {"a": 0.8, "b": 0.6}
    assert GoalCompaction(reference=str(run)).reference == {"a": 0.8, "b": 0.6}
    with pytest.raises(ValueError, match="no accuracy for tasks \\['c'\\]"):
        GoalCompaction(reference=str(run)).check_tasks(["a", "c"])
    with pytest.raises(ValueError, match="does not exist"):
        reference_accuracies(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="0.83, not 83"):
        GoalCompaction(reference=83)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"goal": 0}, "goal must be > 0"),
        ({"max_prune": 1.0}, "max_prune must be in \\(0, 1\\)"),
        ({"prune_step": 0.0}, "prune_step must be in \\(0, 1\\) or null"),
        ({"round_epochs": 0}, "round_epochs >= 1"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        GoalCompaction(**options)
