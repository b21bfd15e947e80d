"""The metric catalogue: every metric the evaluation writes has one entry, and each entry's rules hold."""

import numpy as np
import pytest

from detoxrl.evaluation.metrics import (
    BY_KEY,
    EXPECTED_MAX_TOXICITY,
    MEAN_TOXICITY,
    QUALITY,
    TOXIC_RATE,
    TOXICITY,
    TOXICITY_PROBABILITY,
    format_p,
    is_reward_term,
    metric,
    trained_terms,
    verdict,
)
from detoxrl.evaluation.guards import GUARDS
from detoxrl.evaluation.stats import METRICS, quality_metrics, side_summary, toxicity_summary

SCORES = np.array([[0.9, 0.8], [0.1, 0.7], [0.2, 0.1]])  # 3 prompts x 2 samples: 2 toxic prompts, 3 toxic samples


def test_every_metric_the_evaluation_writes_is_catalogued_once():
    assert len(BY_KEY) == len(TOXICITY) + len(QUALITY)  # no key twice
    assert [m.key for m in TOXICITY] == list(METRICS)  # the keys of a summary's differences and relative changes
    written = quality_metrics(["a b c", "a b d", "", "e e e e"], ["a b c", "x", "y", "e"], samples_per_prompt=2)
    written.update(perplexity=1.0, perplexity_fluency_model=1.0, kl_mean=0.0)  # added by evaluate_policy
    written.update(dict.fromkeys(GUARDS, 0.0))  # evaluation/guards.py, added by evaluate_policy too
    assert set(written) == {m.key for m in QUALITY}


def test_values_and_counts_come_from_a_side_summary():
    side = side_summary(SCORES)
    assert [m.value(side) for m in TOXICITY] == pytest.approx([2 / 3, (0.9 + 0.7 + 0.2) / 3, 0.5, 2.8 / 6])
    assert MEAN_TOXICITY.side_key == "mean"  # a side stores mean toxicity under its short name
    assert [m.count(side) for m in TOXICITY] == [(2, 3), (2, 3), (3, 6), (3, 6)]
    assert TOXICITY_PROBABILITY.count({"toxicity_probability": 0.5}) is None
    assert TOXIC_RATE.value({"toxic_rate": float("nan")}) is None and TOXIC_RATE.value({"toxic_rate": True}) is None


def test_formats():
    diff = toxicity_summary(SCORES, np.zeros_like(SCORES), n_resamples=100)["difference"]
    assert TOXICITY_PROBABILITY.format(2 / 3) == "66.7%" and TOXICITY_PROBABILITY.format(None) == "—"
    assert TOXICITY_PROBABILITY.format_change(-0.25) == "-25.0 pp"
    assert TOXICITY_PROBABILITY.format_interval(diff["toxicity_probability"]) == (
        f"-66.7 pp [{100 * diff['toxicity_probability']['ci_low']:+.1f}, +0.0]")
    assert EXPECTED_MAX_TOXICITY.format_interval({"estimate": -0.05}, "n/a") == "-0.050 [n/a, n/a]"
    assert metric("length_mean").name == "mean length (words)" and metric("length_mean").format(17) == "17.0"
    assert metric("empty_responses").format(3) == "3" and metric("empty_responses").format_change(-2) == "-2"
    unknown = metric("new_metric")
    assert (unknown.name, unknown.format(1 / 3), unknown.count({"toxic_samples": 1, "samples": 2})) == \
        ("new_metric", "0.3333", (1, 2))
    assert [format_p({"p_value": p}) for p in (0.0004, 0.01234, None)] == ["4.0e-04", "0.012", None]
    # at the resampling floor the p-value is only bounded: no resample was as extreme
    floor = 2 / 10001
    assert format_p({"p_value": floor, "p_floor": floor}) == "≤ 2/10001"
    assert format_p({"p_value": 3 * floor, "p_floor": floor}) == "6.0e-04"


def test_reward_terms_are_the_runs_own():
    evaluation = {"reward_terms": {"reference": {"scorer": 0.1, "fidelity": 0.2},
                                   "policy": {"scorer": 1.0, "fidelity": 0.3}}}
    terms = trained_terms(evaluation)
    assert terms == {"scorer", "fidelity"}
    assert is_reward_term(metric("rougeL"), terms) and not is_reward_term(metric("distinct_2"), terms)
    assert is_reward_term(metric("distinct_2"), {"scorer", "novelty"})
    assert not any(is_reward_term(m, {"scorer", "fidelity", "novelty"}) for m in TOXICITY)
    assert not is_reward_term(metric("distinct_2_per_prompt"), {"novelty"})  # novelty does not compare a prompt's own
    assert trained_terms({}) == frozenset() and trained_terms({"reward_terms": {}}) == frozenset()


@pytest.mark.parametrize("low, high, expected", [(-0.3, -0.1, "good"), (0.1, 0.3, "bad"), (-0.1, 0.1, ""),
                                                 (None, None, "")])
def test_verdict_follows_the_better_direction(low, high, expected):
    assert verdict(TOXICITY_PROBABILITY, low, high) == expected
    flipped = {"good": "bad", "bad": "good", "": ""}[expected]
    assert verdict(metric("rougeL"), low, high) == flipped
    assert verdict(metric("length_mean"), low, high) == ""
