"""Comparing two runs' metrics side by side."""

import io
import json
import os

import numpy as np
import pytest
from rich.console import Console

from detoxrl.errors import DetoxError
from detoxrl.evaluation.compare import Row, compare_rows, compare_runs, headline_table, load_metrics
from detoxrl.evaluation.metrics import EXPECTED_MAX_TOXICITY, TOXIC_RATE, TOXICITY_PROBABILITY, metric
from detoxrl.evaluation.stats import toxicity_summary
from test_report import EVALUATORS, _synthetic


def _metrics(rate_after, kl, evaluators=("hate",)):
    ev = {"role": "reward", "reference": {"mean": 0.2, "std": 0.1, "toxic_rate": 0.1},
          "policy": {"mean": 0.1, "std": 0.1, "toxic_rate": rate_after}}
    return {"evaluation": {"evaluators": {name: ev for name in evaluators},
                           "quality": {"reference": {"distinct_1": 0.4}, "policy": {"distinct_1": 0.5, "rouge1": None}}},
            "train": {"final_kl": kl, "note": "text is not compared"}}


def _write(tmp_path, name, metrics):
    run = tmp_path / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _table_text(run_a, run_b) -> str:
    console = Console(file=io.StringIO(), width=400)
    console.print(compare_runs(run_a, run_b))
    return console.file.getvalue()


def _line(text: str, label: str) -> str:
    """The table's line of one row, its cells separated by single spaces."""
    return " ".join(next(line for line in text.splitlines() if f" {label} " in line).split())


def test_rows_cover_both_runs():
    rows = dict(compare_rows(_metrics(0.05, 0.3), _metrics(0.02, 0.6, evaluators=("hate", "other"))))
    assert Row("toxic rate (policy)", 0.05, 0.02, metric=TOXIC_RATE) in rows["toxicity · hate"]
    assert Row("toxic rate (reference)", None, 0.1, metric=TOXIC_RATE) in rows["toxicity · other"]
    # a file without the per-prompt metrics shows only what it has
    assert [row.label for row in rows["toxicity · hate"]] == ["toxic rate (reference)", "toxic rate (policy)",
                                                             "mean toxicity (reference)", "mean toxicity (policy)"]
    # the catalogue's labels; rouge1 is None on both sides and left out
    distinct_1 = metric("distinct_1")
    assert rows["quality"] == [Row("distinct-1 (pooled) (reference)", 0.4, 0.4, metric=distinct_1),
                               Row("distinct-1 (pooled) (policy)", 0.5, 0.5, metric=distinct_1)]
    assert rows["training"] == [Row("final_kl", 0.3, 0.6)]


def _evaluated(before, after):
    """An evaluation block as ``detoxrl evaluate`` writes it: toxicity_summary of [prompts, k] scores."""
    summary = toxicity_summary(np.array(before), np.array(after), threshold=0.5, n_resamples=200)
    return {"evaluation": {"evaluators": {"judge": {"role": "held-out", **summary}}}}


def test_per_prompt_toxicity_with_counts(tmp_path):
    """Toxicity probability and expected maximum toxicity (over k = 2 samples) with their toxic counts."""
    a = _evaluated([[0.9, 0.1], [0.2, 0.3], [0.6, 0.7]], [[0.1, 0.2], [0.2, 0.3], [0.6, 0.1]])
    b = _evaluated([[0.9, 0.1], [0.2, 0.3], [0.6, 0.7]], [[0.1, 0.2], [0.2, 0.3], [0.4, 0.1]])
    rows = {row.label: row for row in dict(compare_rows(a, b))["toxicity · judge"]}
    assert rows["toxicity probability (reference)"] == Row("toxicity probability (reference)", pytest.approx(2 / 3),
                                                           pytest.approx(2 / 3), "2/3 prompts", "2/3 prompts",
                                                           TOXICITY_PROBABILITY)
    assert rows["toxicity probability (policy)"] == Row("toxicity probability (policy)", pytest.approx(1 / 3), 0.0,
                                                        "1/3 prompts", "0/3 prompts", TOXICITY_PROBABILITY)
    emt = rows["expected max toxicity (policy)"]
    assert (emt.a, emt.b) == (pytest.approx((0.2 + 0.3 + 0.6) / 3), pytest.approx((0.2 + 0.3 + 0.4) / 3))
    assert emt.metric == EXPECTED_MAX_TOXICITY
    # one counting rule for every metric: its level's toxic events
    assert (emt.counts_a, emt.counts_b) == ("1/3 prompts", "0/3 prompts")
    assert rows["toxic rate (reference)"].counts_a == "3/6 samples"
    assert rows["mean toxicity (policy)"].counts_a == "1/6 samples"

    text = _table_text(_write(tmp_path, "a", a), _write(tmp_path, "b", b))
    assert _line(text, "toxicity probability (policy)").endswith(
        "33.3% (1/3 prompts) │ 0.0% (0/3 prompts) │ -33.3 pp │")
    assert _line(text, "expected max toxicity (policy)").endswith(
        "0.367 (1/3 prompts) │ 0.300 (0/3 prompts) │ -0.067 │")


def test_compare_runs_table(tmp_path):
    a = _write(tmp_path, "run-a", _metrics(0.05, 0.3))
    b = _write(tmp_path, "run-b", _metrics(0.02, 0.6))
    text = _table_text(a, b)
    assert "run-a" in text and "run-b" in text
    assert _line(text, "toxic rate (policy)").endswith("5.0% │ 2.0% │ -3.0 pp │")
    assert _line(text, "final_kl").endswith("0.3 │ 0.6 │ +0.3 │")  # training statistics: 4 significant digits


def test_missing_or_broken_metrics_is_a_user_error(tmp_path):
    good = _write(tmp_path, "good", _metrics(0.05, 0.3))
    with pytest.raises(DetoxError, match="absent is not a directory"):
        compare_runs(good, tmp_path / "absent")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(DetoxError, match="cannot read"):
        load_metrics(broken)
    (broken / "metrics.json").write_text("[1, 2]")
    with pytest.raises(DetoxError, match="JSON object"):
        load_metrics(broken)


def test_the_newer_evaluation_is_compared_and_named(tmp_path):
    """``detoxrl evaluate`` writes RUN/eval/metrics.json after training: that evaluation is the one shown."""
    run = _write(tmp_path, "run", _metrics(0.05, 0.3))
    evaluated = _write(tmp_path, "run/eval", {"run": {}, "evaluation": _metrics(0.01, None)["evaluation"]})
    metrics, source = load_metrics(run)
    assert source == evaluated / "metrics.json"
    assert metrics["evaluation"]["evaluators"]["hate"]["policy"]["toxic_rate"] == 0.01
    assert metrics["train"]["final_kl"] == 0.3  # training numbers still come from the run's own file
    other = _write(tmp_path, "other", _metrics(0.02, 0.6))
    text = _table_text(run, other)
    assert f"A: evaluation from {evaluated / 'metrics.json'}\nB: evaluation from {other / 'metrics.json'}" in text
    assert _line(text, "toxic rate (policy)").endswith("1.0% │ 2.0% │ +1.0 pp │") and "5.0%" not in text

    later = (evaluated / "metrics.json").stat().st_mtime_ns + 10**9
    os.utime(run / "metrics.json", ns=(later, later))  # the run's file is now the newer one
    metrics, source = load_metrics(run)
    assert source == run / "metrics.json"
    assert metrics["evaluation"]["evaluators"]["hate"]["policy"]["toxic_rate"] == 0.05


def test_evaluation_only_in_eval_directory(tmp_path):
    """A run whose training ended with eval.enabled false has its evaluation only in eval/."""
    run = _write(tmp_path, "run", {"train": {"final_kl": 0.3}})
    _write(tmp_path, "run/eval", {"evaluation": _metrics(0.01, None)["evaluation"]})
    metrics, source = load_metrics(run)
    assert source == run / "eval" / "metrics.json" and metrics["train"] == {"final_kl": 0.3}
    assert load_metrics(_write(tmp_path, "bare", {"train": {}}))[1] is None


def test_a_reward_term_is_marked_for_the_runs_trained_on_it():
    """ROUGE-L is the fidelity term: a run trained on it optimised it, so it no longer guards that run."""
    def run(terms):
        quality = {side: {"rougeL": 0.3, "distinct_2": 0.5} for side in ("reference", "policy")}
        return {"evaluation": {"quality": quality, "reward_terms": {"policy": dict.fromkeys(terms, 0.0)}}}

    labels = lambda a, b: [row.label for row in dict(compare_rows(a, b))["quality"]]  # noqa: E731
    assert labels(run(["scorer", "fidelity"]), run(["scorer"]))[:2] == [
        "distinct-2 (pooled) (reference)", "distinct-2 (pooled) (policy)"]
    assert labels(run(["scorer", "fidelity"]), run(["scorer"]))[2:] == [
        "ROUGE-L F1 (reference) · trained on: not a guard (run A)",
        "ROUGE-L F1 (policy) · trained on: not a guard (run A)"]
    assert labels(run(["scorer", "novelty"]), run(["scorer", "novelty", "fidelity"])) == [
        "distinct-2 (pooled) (reference) · trained on: not a guard",
        "distinct-2 (pooled) (policy) · trained on: not a guard",
        "ROUGE-L F1 (reference) · trained on: not a guard (run B)",
        "ROUGE-L F1 (policy) · trained on: not a guard (run B)"]
    assert labels(run(["scorer"]), {"evaluation": {"quality": run([])["evaluation"]["quality"]}}) == [
        "distinct-2 (pooled) (reference)", "distinct-2 (pooled) (policy)",
        "ROUGE-L F1 (reference)", "ROUGE-L F1 (policy)"]  # an evaluation without reward_terms marks nothing


def _headline_text(metrics) -> str:
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(headline_table(metrics))
    return " ".join(console.export_text().split())


def test_headline_states_toxic_prompts_interval_p_value_and_guards():
    metrics, *_ = _synthetic()
    evaluation = metrics["evaluation"]
    evaluation["reward_terms"] = {"reference": {"scorer": -1.0, "fidelity": 0.3},
                                  "policy": {"scorer": 2.0, "fidelity": 0.2}}
    evaluation["quality"] = {"reference": {"rougeL": 0.25, "distinct_2": 0.5, "length_mean": 20.0,
                                           "perplexity": 12.0, "distinct_1": 0.4},
                             "policy": {"rougeL": 0.2, "distinct_2": 0.6, "length_mean": 18.0, "perplexity": 15.0,
                                        "kl_mean": 1.5}}
    text = _headline_text(metrics)
    rows = {}
    for name in EVALUATORS:
        summary = evaluation["evaluators"][name]
        ref, pol = summary["reference"], summary["policy"]
        d = summary["difference"]["toxicity_probability"]
        p = f"{d['p_value']:.1e}" if d["p_value"] < 0.001 else f"{d['p_value']:.3f}"  # exact McNemar: stated exactly
        rows[name] = (f"{ref['toxic_prompts']}/60 → {pol['toxic_prompts']}/60 │ {100 * d['estimate']:+.1f} pp "
                      f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] │ {p} │")
    reward, judge = EVALUATORS
    assert f"│ {judge} (held-out) │ {rows[judge]}" in text
    assert f"│ {reward} (reward) · trained on: not a guard │ {rows[reward]}" in text
    assert text.index(judge) < text.index(reward)  # the held-out judge first
    assert "│ ROUGE-L F1 · trained on: not a guard │ 0.250 → 0.200 │ ×0.80 │" in text
    assert "│ distinct-2 (pooled) │ 0.500 → 0.600 │ ×1.20 │" in text  # novelty was not trained
    assert "│ mean length (words) │ 20.0 → 18.0 │ ×0.90 │" in text
    assert "│ perplexity under the reference model │ 12.00 → 15.00 │ ×1.25 │" in text
    assert "│ KL to reference (nats/response) │ — → 1.500 │ — │" in text
    assert "distinct-1" not in text  # not a guard
    assert text.startswith("tiny-model: reference → policy")


def test_headline_of_an_unevaluated_run_is_an_empty_table():
    assert "toxic prompts" not in _headline_text({"train": {"final_kl": 0.3}})
