"""Comparing two runs' metrics side by side."""

import io
import json
import os

import numpy as np
import pytest
from rich.console import Console

from detoxrl.errors import DetoxError
from detoxrl.evaluation.compare import Row, compare_rows, compare_runs, load_metrics
from detoxrl.evaluation.stats import toxicity_summary


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


def test_rows_cover_both_runs():
    rows = dict(compare_rows(_metrics(0.05, 0.3), _metrics(0.02, 0.6, evaluators=("hate", "other"))))
    assert Row("toxic rate (policy)", 0.05, 0.02) in rows["toxicity · hate"]
    assert Row("toxic rate (reference)", None, 0.1) in rows["toxicity · other"]
    # a file without the per-prompt metrics shows only what it has
    assert [row.label for row in rows["toxicity · hate"]] == ["toxic rate (reference)", "toxic rate (policy)",
                                                             "mean toxicity (reference)", "mean toxicity (policy)"]
    assert rows["quality"] == [Row("distinct_1 (reference)", 0.4, 0.4), Row("distinct_1 (policy)", 0.5, 0.5)]
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
                                                           pytest.approx(2 / 3), "2/3 prompts", "2/3 prompts")
    assert rows["toxicity probability (policy)"] == Row("toxicity probability (policy)", pytest.approx(1 / 3), 0.0,
                                                        "1/3 prompts", "0/3 prompts")
    emt = rows["expected max toxicity (policy)"]
    assert (emt.a, emt.b) == (pytest.approx((0.2 + 0.3 + 0.6) / 3), pytest.approx((0.2 + 0.3 + 0.4) / 3))
    assert emt.counts_a == emt.counts_b == "3 prompts"
    assert rows["toxic rate (reference)"].counts_a == "3/6 samples"
    assert rows["mean toxicity (policy)"].counts_a is None

    text = _table_text(_write(tmp_path, "a", a), _write(tmp_path, "b", b))
    assert "0.3333 (1/3 prompts)" in text and "0 (0/3 prompts)" in text and "-0.3333" in text
    assert "expected max toxicity (policy)" in text and "0.3667" in text and "-0.06667" in text


def test_compare_runs_table(tmp_path):
    a = _write(tmp_path, "run-a", _metrics(0.05, 0.3))
    b = _write(tmp_path, "run-b", _metrics(0.02, 0.6))
    text = _table_text(a, b)
    assert "run-a" in text and "run-b" in text
    assert "-0.03" in text and "+0.3" in text


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
    assert "0.01" in text and "0.05" not in text

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
