"""Hand-computed checks of the evaluation statistics."""

import csv
import json
import math

import numpy as np
import pytest

from detoxrl.evaluation.stats import (
    distinct_n,
    length_stats,
    paired_bootstrap_ci,
    qualitative_table,
    quality_metrics,
    rouge_scores,
    sign_flip_p_value,
    toxicity_summary,
    write_table_csv,
)


def test_no_change_gives_zero_difference_and_p_one():
    before = np.random.default_rng(0).uniform(size=(40, 3))
    s = toxicity_summary(before, before.copy(), n_resamples=2000)
    for key in ("mean_toxicity", "toxic_rate"):
        d = s["difference"][key]
        assert d["estimate"] == 0.0
        assert d["ci_low"] <= 0.0 <= d["ci_high"]
        assert d["p_value"] == pytest.approx(1.0)
    assert s["recipe_improvement"] == {"mean_pct": 0.0, "std_pct": 0.0}


def test_strong_shift_is_significant():
    before = np.random.default_rng(1).uniform(0.5, 1.0, size=(50, 4))
    s = toxicity_summary(before, before - 0.4, n_resamples=2000)
    d = s["difference"]["mean_toxicity"]
    assert d["estimate"] == pytest.approx(-0.4)
    assert d["ci_high"] < 0
    assert d["p_value"] == pytest.approx(1 / 2001)  # no random flip is as extreme
    assert s["difference"]["toxic_rate"]["ci_high"] < 0


def test_hand_computed_summary():
    before = [[0.2, 0.4], [0.6, 0.8]]  # mean 0.5, std sqrt(0.05), half toxic
    after = [[0.1, 0.2], [0.3, 0.4]]  # mean 0.25, std sqrt(0.0125), none toxic
    s = toxicity_summary(before, after)
    assert s["reference"] == pytest.approx({"mean": 0.5, "std": math.sqrt(0.05), "toxic_rate": 0.5})
    assert s["policy"] == pytest.approx({"mean": 0.25, "std": math.sqrt(0.0125), "toxic_rate": 0.0})
    assert s["relative_change"] == pytest.approx({"mean_toxicity": -0.5, "toxic_rate": -1.0})
    assert s["recipe_improvement"] == pytest.approx({"mean_pct": 50.0, "std_pct": 50.0})
    assert s["difference"]["mean_toxicity"]["estimate"] == pytest.approx(-0.25)
    assert s["difference"]["toxic_rate"]["estimate"] == pytest.approx(-0.5)


def test_zero_denominators_are_none_and_json_safe():
    s = toxicity_summary(np.zeros((5, 2)), np.full((5, 2), 0.1))
    assert s["relative_change"] == {"mean_toxicity": None, "toxic_rate": None}
    assert s["recipe_improvement"] == {"mean_pct": None, "std_pct": None}
    json.dumps(s, allow_nan=False)


def test_flat_input_is_one_sample_per_prompt_and_shapes_must_match():
    s = toxicity_summary([0.1, 0.9], [0.1, 0.2])
    assert s["reference"]["toxic_rate"] == 0.5
    with pytest.raises(ValueError):
        toxicity_summary(np.zeros((3, 2)), np.zeros((3, 3)))


def test_summary_is_reproducible_with_seed():
    rng = np.random.default_rng(2)
    before, after = rng.uniform(size=(30, 2)), rng.uniform(size=(30, 2))
    assert toxicity_summary(before, after, seed=7) == toxicity_summary(before, after, seed=7)


def test_exact_sign_flip_p_value():
    # 8 sign patterns of (1, 2, 3); only all-plus and all-minus reach |mean| = 2
    assert sign_flip_p_value(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 8)


def test_bootstrap_ci_of_constant_differences_is_the_constant():
    assert paired_bootstrap_ci(np.full(20, -0.3), n_resamples=500) == pytest.approx((-0.3, -0.3))


def test_distinct_n_by_hand():
    texts = ["a b a", "b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)  # a, b, a, b, c
    assert distinct_n(texts, 2) == pytest.approx(3 / 3)  # (a b), (b a), (b c)
    assert distinct_n(["a"], 2) == 0.0


def test_rouge_identical_and_disjoint():
    assert rouge_scores(["the cats are running"], ["the cats are running"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge_scores(["alpha beta"], ["gamma delta"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError):
        rouge_scores(["a"], [])


def test_length_and_quality_metrics():
    assert length_stats(["a b", "a b c d"]) == {"mean": 3.0, "std": 1.0, "min": 2.0, "max": 4.0}
    assert length_stats([])["mean"] is None
    q = quality_metrics(["a b", "a b"], references=["a b", "c d"])
    assert q["length_mean"] == 2.0 and q["distinct_1"] == 0.5 and q["rouge1"] == pytest.approx(0.5)


def test_qualitative_table_sorted_by_improvement(tmp_path):
    rows = qualitative_table(["q1", "q2", "q3"], ["b1", "b2", "b3"], ["a1", "a2", "a3"],
                             [0.0, 1.0, 0.5], [0.2, 0.0, 2.5])
    assert [r["query"] for r in rows] == ["q3", "q1", "q2"]
    assert [r["difference"] for r in rows] == pytest.approx([2.0, 0.2, -1.0])
    assert rows[0] == {"query": "q3", "response_before": "b3", "response_after": "a3",
                       "reward_before": 0.5, "reward_after": 2.5, "difference": 2.0}
    with pytest.raises(ValueError):
        qualitative_table(["q"], [], [], [], [])

    path = write_table_csv(rows, tmp_path / "out" / "table.csv")
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["query"] for r in read] == ["q3", "q1", "q2"]
    assert float(read[2]["difference"]) == pytest.approx(-1.0)
