"""Comparing two runs' metrics.json side by side."""

import io
import json

import pytest
from rich.console import Console

from detoxrl.errors import DetoxError
from detoxrl.evaluation.compare import compare_rows, compare_runs, load_metrics


def _metrics(rate_after, kl, evaluators=("hate",)):
    ev = {"role": "reward", "reference": {"mean": 0.2, "std": 0.1, "toxic_rate": 0.1},
          "policy": {"mean": 0.1, "std": 0.1, "toxic_rate": rate_after}}
    return {"evaluation": {"evaluators": {name: ev for name in evaluators},
                           "quality": {"reference": {"distinct_1": 0.4}, "policy": {"distinct_1": 0.5, "rouge1": None}}},
            "train": {"final_kl": kl, "note": "text is not compared"}}


def _write(tmp_path, name, metrics):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_rows_cover_both_runs():
    rows = dict(compare_rows(_metrics(0.05, 0.3), _metrics(0.02, 0.6, evaluators=("hate", "other"))))
    assert ("toxic rate (policy)", 0.05, 0.02) in rows["toxicity · hate"]
    assert ("toxic rate (reference)", None, 0.1) in rows["toxicity · other"]
    assert rows["quality"] == [("distinct_1 (reference)", 0.4, 0.4), ("distinct_1 (policy)", 0.5, 0.5)]
    assert rows["training"] == [("final_kl", 0.3, 0.6)]


def test_compare_runs_table(tmp_path):
    a = _write(tmp_path, "run-a", _metrics(0.05, 0.3))
    b = _write(tmp_path, "run-b", _metrics(0.02, 0.6))
    console = Console(file=io.StringIO(), width=120)
    console.print(compare_runs(a, b))
    text = console.file.getvalue()
    assert "run-a" in text and "run-b" in text
    assert "-0.03" in text and "+0.3" in text


def test_missing_or_broken_metrics_is_a_user_error(tmp_path):
    good = _write(tmp_path, "good", _metrics(0.05, 0.3))
    with pytest.raises(DetoxError, match="no metrics.json"):
        compare_runs(good, tmp_path / "absent")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(DetoxError, match="cannot read"):
        load_metrics(broken)
    (broken / "metrics.json").write_text("[1, 2]")
    with pytest.raises(DetoxError, match="JSON object"):
        load_metrics(broken)
