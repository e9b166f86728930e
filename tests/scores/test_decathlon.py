"""Decathlon score against the paper's published numbers, and the published tables as data."""

from __future__ import annotations

import pytest

from piggyback.scores.decathlon import (
    DECATHLON_BASELINE_ACC,
    DECATHLON_DOMAINS,
    FINE_GRAINED_TABLE,
    PIGGYBACK_DECATHLON_ACC,
    PUBLISHED,
    canonical_decathlon_domain,
    decathlon_domain_scores,
    decathlon_score,
    is_decathlon_task,
    scores_against_reference,
)


def test_domains_in_devkit_order_with_class_counts():
    assert list(DECATHLON_DOMAINS) == [
        "aircraft",
        "cifar100",
        "daimlerpedcls",
        "dtd",
        "gtsrb",
        "imagenet12",
        "omniglot",
        "svhn",
        "ucf101",
        "vgg-flowers",
    ]
    assert DECATHLON_DOMAINS["omniglot"] == 1623
    assert DECATHLON_DOMAINS["daimlerpedcls"] == 2
    assert set(DECATHLON_BASELINE_ACC) == set(DECATHLON_DOMAINS)
    assert set(PIGGYBACK_DECATHLON_ACC) == set(DECATHLON_DOMAINS)


def test_published_piggyback_score():
    assert decathlon_score(PIGGYBACK_DECATHLON_ACC) == pytest.approx(2838, abs=3)
    assert decathlon_score(PUBLISHED["decathlon_piggyback"]) == pytest.approx(2838, abs=3)
    mean = sum(PIGGYBACK_DECATHLON_ACC.values()) / 10
    assert mean == pytest.approx(PUBLISHED["decathlon_methods"]["piggyback"]["mean_acc"], abs=0.01)


def test_baseline_scores_exactly_2500():
    assert decathlon_score(DECATHLON_BASELINE_ACC) == 2500.0
    assert all(v == 250.0 for v in decathlon_domain_scores(DECATHLON_BASELINE_ACC).values())


def test_perfect_and_hopeless_domains():
    assert decathlon_score({d: 100.0 for d in DECATHLON_DOMAINS}) == pytest.approx(10_000.0)
    assert decathlon_score({"svhn": 100.0}) == pytest.approx(1000.0)
    # baseline error on svhn is 3.45 %, so Emax = 6.9 %: 93 % accuracy (7 % error) scores 0
    assert decathlon_score({"svhn": 93.0}) == 0.0
    assert decathlon_score({"svhn": 0.0, "dtd": 0.0}) == 0.0


def test_fractions_and_subsets():
    fractions = {d: a / 100 for d, a in PIGGYBACK_DECATHLON_ACC.items()}
    assert decathlon_score(fractions, percent=False) == pytest.approx(
        decathlon_score(PIGGYBACK_DECATHLON_ACC)
    )
    subset = {"aircraft": 60.34, "gtsrb": 97.53}
    assert decathlon_score(subset) == pytest.approx(500.0)
    assert decathlon_score({}) == 0.0


def test_scores_against_a_reference_run():
    reference = {"signs": 0.8, "tiles": 0.6, "retina": 1.0}
    assert scores_against_reference(reference, reference) == {
        "signs": 250.0,
        "tiles": 250.0,
        "retina": 250.0,  # no error: a tie with a perfect reference, scored like any tie
    }
    scores = scores_against_reference({"signs": 1.0, "tiles": 0.0, "retina": 0.99}, reference)
    assert scores == {"signs": 1000.0, "tiles": 0.0, "retina": 0.0}
    # signs: reference error 0.2, Emax 0.4; error 0.1 scores 1000 * (0.3 / 0.4)^2
    assert scores_against_reference({"signs": 0.9}, reference)["signs"] == pytest.approx(562.5)
    with pytest.raises(ValueError, match="no reference accuracy for gtsrb"):
        scores_against_reference({"gtsrb": 0.5}, reference)


def test_aliases():
    acc = {
        "Airc": 60.34,
        "C100": 82.12,
        "DPed": 92.82,
        "DTD": 55.53,
        "GTSR": 97.53,
        "imagenet": 59.87,
        "OGlt": 87.69,
        "svhn": 96.55,
        "UCF": 51.20,
        "flowers": 81.41,
    }
    assert decathlon_score(acc) == 2500.0
    assert canonical_decathlon_domain("vgg_flowers") == "vgg-flowers"
    assert canonical_decathlon_domain("decathlon_imagenet12") == "imagenet12"
    assert canonical_decathlon_domain("ImageNet") == "imagenet12"


def test_unknown_domain_and_bad_values_raise():
    with pytest.raises(ValueError, match="unknown Visual Decathlon domain 'cubs_cropped'"):
        decathlon_score({"cubs_cropped": 80.0})
    with pytest.raises(ValueError, match="given twice"):
        decathlon_score({"flowers": 80.0, "vgg-flowers": 80.0})
    with pytest.raises(ValueError, match="percent"):
        decathlon_score({"svhn": 140.0})
    with pytest.raises(ValueError, match="fraction"):
        decathlon_score({"svhn": 97.0}, percent=False)
    with pytest.raises(ValueError):
        decathlon_score({"svhn": float("nan")})


def test_is_decathlon_task():
    for name in DECATHLON_DOMAINS:
        assert is_decathlon_task(name)
    assert is_decathlon_task("vgg_flowers")
    assert is_decathlon_task("decathlon_flowers")
    assert is_decathlon_task("Daimler")
    # fine-grained dataset names are not decathlon tasks, even where they alias for scoring
    for name in ("flowers", "imagenet", "cubs_cropped", "stanford_cars_cropped", "sketches"):
        assert not is_decathlon_task(name)


def test_fine_grained_table():
    assert list(FINE_GRAINED_TABLE) == [
        "classifier only",
        "individual fine-tuning",
        "packnet",
        "piggyback",
        "cpg",
    ]
    assert FINE_GRAINED_TABLE["piggyback"]["stanford_cars_cropped"] == 89.62
    assert FINE_GRAINED_TABLE["cpg"]["wikiart"] == 77.15
    assert PUBLISHED["fine_grained"]["classifier only"]["sketches"] == 50.86
    assert all(len(row) == 6 for row in FINE_GRAINED_TABLE.values())
