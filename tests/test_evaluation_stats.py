"""Hand-computed checks of the evaluation statistics."""

import csv
import json
import math

import numpy as np
import pytest

from detoxrl.evaluation.stats import (
    distinct_n,
    distinct_n_per_prompt,
    expected_max_toxicity,
    length_stats,
    mcnemar_exact,
    mcnemar_power,
    paired_bootstrap_ci,
    paired_permutation_p_value,
    perplexity,
    qualitative_table,
    quality_metrics,
    relative_change,
    repeated_token,
    rouge_scores,
    side_summary,
    toxicity_probability,
    toxicity_summary,
    write_table_csv,
)

METRICS = ("toxicity_probability", "expected_max_toxicity", "toxic_rate", "mean_toxicity")


def test_no_change_gives_zero_difference_and_p_one():
    before = np.random.default_rng(0).uniform(size=(40, 3))
    s = toxicity_summary(before, before.copy(), n_resamples=2000)
    for key in METRICS:
        d = s["difference"][key]
        assert d["estimate"] == 0.0
        assert d["ci_low"] <= 0.0 <= d["ci_high"]
        assert d["p_value"] == pytest.approx(1.0)
    assert s["difference"]["toxicity_probability"]["discordant"] == {"reference_only": 0, "policy_only": 0}
    assert all(c["value"] == 0.0 for c in s["relative_change"].values())


def test_strong_shift_is_significant():
    before = np.random.default_rng(1).uniform(0.5, 1.0, size=(50, 4))
    s = toxicity_summary(before, before - 0.4, n_resamples=2000)
    d = s["difference"]["mean_toxicity"]
    assert d["estimate"] == pytest.approx(-0.4)
    assert d["ci_high"] < 0
    # No random relabelling is as extreme; scipy adds one to both counts and doubles the smaller tail.
    assert d["p_value"] == pytest.approx(2 / 2001) == pytest.approx(d["p_floor"])  # only bounded: reported so
    assert d["test"] == "paired permutation"
    assert s["difference"]["toxic_rate"]["ci_high"] < 0


def test_hand_computed_summary():
    before = [[0.2, 0.4], [0.6, 0.8]]  # mean 0.5, std sqrt(0.05); 2 toxic samples, in 1 of 2 prompts
    after = [[0.1, 0.2], [0.3, 0.4]]  # mean 0.25, std sqrt(0.0125); none toxic
    s = toxicity_summary(before, after)
    assert s["reference"] == pytest.approx({
        "toxicity_probability": 0.5, "toxic_prompts": 1, "prompts": 2,
        "expected_max_toxicity": 0.6, "expected_max_toxicity_std": 0.2,  # maxima 0.4 and 0.8
        "toxic_rate": 0.5, "toxic_samples": 2, "samples": 4, "mean": 0.5, "std": math.sqrt(0.05)})
    assert s["policy"] == pytest.approx({
        "toxicity_probability": 0.0, "toxic_prompts": 0, "prompts": 2,
        "expected_max_toxicity": 0.3, "expected_max_toxicity_std": 0.1,
        "toxic_rate": 0.0, "toxic_samples": 0, "samples": 4, "mean": 0.25, "std": math.sqrt(0.0125)})
    d = s["difference"]
    assert d["toxicity_probability"]["estimate"] == pytest.approx(-0.5)
    assert d["expected_max_toxicity"]["estimate"] == pytest.approx(-0.3)
    assert d["toxic_rate"]["estimate"] == pytest.approx(-0.5)
    assert d["mean_toxicity"]["estimate"] == pytest.approx(-0.25)
    # McNemar: one discordant prompt (toxic only for the reference): P(Bin(1, 1/2) as extreme) = 1.
    assert d["toxicity_probability"]["test"] == "exact McNemar"
    assert d["toxicity_probability"]["discordant"] == {"reference_only": 1, "policy_only": 0}
    assert d["toxicity_probability"]["p_value"] == 1.0
    rel = s["relative_change"]
    assert {k: v["value"] for k, v in rel.items()} == pytest.approx({
        "toxicity_probability": -1.0, "expected_max_toxicity": -0.5, "toxic_rate": -1.0, "mean_toxicity": -0.5,
        "std_toxicity": -0.5})
    assert not any(v["reliable"] for v in rel.values())  # 2 toxic samples, 1 toxic prompt: far below 10


def test_threshold_is_inclusive():
    scores = [[0.5, 0.1], [0.49, 0.2]]
    assert toxicity_probability(scores, 0.5) == 0.5
    side = side_summary(scores, 0.5)
    assert (side["toxic_samples"], side["toxic_prompts"], side["toxic_rate"]) == (1, 1, 0.25)


def test_expected_max_toxicity_by_hand():
    assert expected_max_toxicity([[0.2, 0.9], [0.1, 0.3]]) == pytest.approx(0.6)
    assert expected_max_toxicity([0.2, 0.4]) == pytest.approx(0.3)  # flat: one sample per prompt


def test_mcnemar_exact_by_hand():
    reference = [1] * 9 + [0] * 3
    policy = [0] * 8 + [1] + [1] + [0] * 2  # 8 toxic only for the reference, 1 only for the policy
    # two-sided exact binomial: 2 * P(X <= 1 | n=9, p=1/2) = 2 * (1 + 9) / 512
    assert mcnemar_exact(reference, policy) == {"reference_only": 8, "policy_only": 1,
                                                "p_value": pytest.approx(20 / 512)}
    assert mcnemar_exact([0, 1], [0, 1])["p_value"] == 1.0


def test_relative_change_is_reliable_only_with_ten_reference_events():
    def side(toxic_prompts, toxic_samples, rate):
        return {"toxicity_probability": rate, "expected_max_toxicity": rate, "toxic_rate": rate, "mean": rate,
                "std": rate, "toxic_prompts": toxic_prompts, "toxic_samples": toxic_samples}

    # The reference has 20 toxic prompts but 9 toxic samples; the policy's few events do not matter.
    rel = relative_change(side(20, 9, 0.4), side(1, 40, 0.1))
    assert rel["toxicity_probability"] == {"value": pytest.approx(-0.75), "reliable": True}
    assert rel["expected_max_toxicity"]["reliable"] is True
    assert rel["toxic_rate"] == {"value": pytest.approx(-0.75), "reliable": False}
    assert rel["mean_toxicity"]["reliable"] is False and rel["std_toxicity"]["reliable"] is False
    # A detoxification to nothing is reliable when the reference had enough.
    assert relative_change(side(31, 39, 0.35), side(0, 0, 0.0))["toxicity_probability"] == \
        {"value": pytest.approx(-1.0), "reliable": True}
    assert relative_change(side(0, 0, 0.0), side(0, 0, 0.1))["toxic_rate"] == {"value": None, "reliable": False}


def test_zero_denominators_are_none_and_json_safe():
    s = toxicity_summary(np.zeros((5, 2)), np.full((5, 2), 0.1))
    assert all(c["value"] is None and not c["reliable"] and c.get("ci_low") is None
               for c in s["relative_change"].values())
    json.dumps(s, allow_nan=False)


def test_flat_input_is_one_sample_per_prompt_and_shapes_must_match():
    s = toxicity_summary([0.1, 0.9], [0.1, 0.2])
    assert s["reference"]["toxic_rate"] == 0.5 and s["reference"]["toxicity_probability"] == 0.5
    with pytest.raises(ValueError):
        toxicity_summary(np.zeros((3, 2)), np.zeros((3, 3)))


def test_one_prompt_has_no_interval():
    s = toxicity_summary([[0.9, 0.1]], [[0.1, 0.1]])
    assert s["difference"]["mean_toxicity"]["ci_low"] is None
    json.dumps(s, allow_nan=False)


def test_summary_is_reproducible_with_seed():
    rng = np.random.default_rng(2)
    before, after = rng.uniform(size=(30, 2)), rng.uniform(size=(30, 2))
    assert toxicity_summary(before, after, seed=7) == toxicity_summary(before, after, seed=7)


def test_exact_paired_permutation_p_value():
    # 8 relabellings of the differences (1, 2, 3); only all-plus and all-minus reach |mean| = 2
    assert paired_permutation_p_value([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]) == pytest.approx(2 / 8)


def test_bootstrap_ci_of_constant_differences_is_the_constant():
    low, high = paired_bootstrap_ci(np.full(20, 0.5), np.full(20, 0.2), n_resamples=500)
    assert (low, high) == pytest.approx((-0.3, -0.3))


def test_distinct_n_by_hand():
    texts = ["a b a", "b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)  # a, b, a, b, c
    assert distinct_n(texts, 2) == pytest.approx(3 / 3)  # (a b), (b a), (b c)
    assert distinct_n(["a"], 2) == 0.0


def test_distinct_n_per_prompt_by_hand():
    texts = ["a a", "a a", "a b", "c d"]  # prompt 1: a a a a -> 1/4; prompt 2: a b c d -> 4/4
    assert distinct_n_per_prompt(texts, 1, 2) == pytest.approx((0.25 + 1.0) / 2)
    assert distinct_n(texts, 1) == pytest.approx(4 / 8)  # pooled: a, b, c, d of 8 tokens
    with pytest.raises(ValueError, match="not a whole number of groups of 3"):
        distinct_n_per_prompt(texts, 1, 3)


def test_perplexity_pools_tokens():
    assert perplexity([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(6 / 4))
    assert perplexity([0.0], [0]) is None


def test_rouge_identical_and_disjoint():
    assert rouge_scores(["the cats are running"], ["the cats are running"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge_scores(["alpha beta"], ["gamma delta"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError):
        rouge_scores(["a"], [])


def test_length_and_quality_metrics():
    assert length_stats(["a b", "a b c d"]) == {"mean": 3.0, "std": 1.0, "min": 2.0, "max": 4.0}
    assert length_stats([])["mean"] is None
    q = quality_metrics(["a b", "a b"], references=["a b", "c d"], samples_per_prompt=2)
    assert q["length_mean"] == 2.0 and q["distinct_1"] == 0.5 and q["rouge1"] == pytest.approx(0.5)
    assert q["distinct_2"] == 0.5 and q["distinct_3"] == 0.0  # (a b) twice; no trigram
    assert q["distinct_1_per_prompt"] == 0.5  # one prompt: its two samples pooled
    assert q["empty_responses"] == 0 and q["repeated_token_responses"] == 0


def test_empty_and_repeated_token_responses_are_counted():
    texts = ["", "  ", "a server server server crashed", "server server server server", "a b a c", "x x x"]
    # "a b a c": "a" is exactly half, not over; "x x x" has only 3 words.
    q = quality_metrics(texts)
    assert q["empty_responses"] == 2 and q["repeated_token_responses"] == 2
    assert [repeated_token(t) for t in texts] == [False, False, True, True, False, False]


def test_qualitative_table_ranked_by_judge_mean(tmp_path):
    queries = ["q1", "q2", "q3"]
    before = ["b1x", "b1y", "b2x", "b2y", "b3x", "b3y"]
    after = ["a1x", "a1y", "a2x", "a2y", "a3x", "a3y"]
    tox_before = [[0.2, 0.4], [0.9, 0.1], [0.5, 0.5]]
    tox_after = [[0.3, 0.3], [0.0, 0.2], [0.9, 0.7]]
    rows = qualitative_table(queries, before, after, tox_before, tox_after,
                             reward_before=[[1, 3], [0, 0], [1, 1]], reward_after=[[2, 2], [1, 1], [0, 0]])
    assert [r["query"] for r in rows] == ["q2", "q1", "q3"]  # differences -0.4, 0.0, +0.3
    assert [r["difference"] for r in rows] == pytest.approx([-0.4, 0.0, 0.3])
    assert rows[0] == {"query": "q2", "response_before": "b2x", "response_after": "a2y",  # most toxic of each side
                       "toxicity_before": pytest.approx(0.5), "toxicity_after": pytest.approx(0.1),
                       "difference": pytest.approx(-0.4), "reward_before": 0.0, "reward_after": 1.0}
    with pytest.raises(ValueError, match="do not match"):
        qualitative_table(["q"], ["a"], [], [[0.1]], [[0.1]])

    path = write_table_csv(rows, tmp_path / "out" / "table.csv")
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["query"] for r in read] == ["q2", "q1", "q3"]
    assert float(read[2]["difference"]) == pytest.approx(0.3) and float(read[1]["reward_before"]) == 2.0


def test_mcnemar_power_by_hand():
    # 6 prompts, half discordant for the reference, never for the policy: only 6 of 6 discordant
    # prompts reach p < 0.05 (2 / 2**6 = 0.031; 5 of 5 gives 0.0625), so the power is 0.5**6.
    assert mcnemar_power(6, 0.5, 0.0) == pytest.approx(0.5 ** 6)
    # No effect: the one-sided rejections stay under alpha / 2.
    assert mcnemar_power(89, 0.1, 0.1) < 0.025


def test_mcnemar_power_matches_simulation_and_grows_with_prompts():
    rng = np.random.default_rng(0)
    counts = rng.multinomial(48, [0.23, 0.065, 0.705], size=4000)
    simulated = np.mean([b > p and mcnemar_exact([1] * b + [0] * p, [0] * b + [1] * p)["p_value"] < 0.05
                         for b, p, _ in counts])
    assert mcnemar_power(48, 0.23, 0.065) == pytest.approx(simulated, abs=0.03)
    assert mcnemar_power(89, 0.23, 0.065) > mcnemar_power(48, 0.23, 0.065) + 0.2
