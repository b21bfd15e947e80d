"""The HTML report: self-contained, complete, and visibly rendered by a real browser."""

import base64
import re
import shutil
import subprocess

import numpy as np
import pytest

from detoxrl.evaluation.report import REFERENCE_COLOR, render_report
from detoxrl.evaluation.stats import qualitative_table, toxicity_summary

EVALUATORS = ("roberta-hate-speech", "toxigen-hatebert")
PNG_SRC = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _synthetic():
    rng = np.random.default_rng(0)
    evaluators, raw = {}, {}
    for name, role in zip(EVALUATORS, ("reward", "held-out")):
        before = rng.beta(0.6, 2.5, size=(60, 4))
        after = before * rng.uniform(0.3, 1.0, size=before.shape)
        evaluators[name] = {"role": role, **toxicity_summary(before, after, n_resamples=500)}
        raw[name] = {"reference": before.ravel().tolist(), "policy": after.ravel().tolist()}
    quality = {"reference": {"length_mean": 20.0, "distinct_1": 0.4, "perplexity": 12.0},
               "policy": {"length_mean": 18.0, "distinct_1": 0.5, "rouge1": 0.3, "perplexity": 15.0}}
    metrics = {
        "run": {"model": "tiny-model", "steps": 50, "wall_time_s": 123.4},
        "train": {"final_reward_mean": 0.8, "final_kl": 0.3},
        "evaluation": {"num_prompts": 60, "samples_per_prompt": 4, "threshold": 0.5, "evaluators": evaluators,
                       "reward": "profanity-check (log-odds of non-toxic) + 10 x ROUGE-L against the reference summary",
                       "reward_scorer": "profanity-check", "reward_unit": "log-odds of non-toxic",
                       "examples_judge": EVALUATORS[1], "quality": quality, "group_column": "heated",
                       "groups": {"False": {"num_prompts": 20, **quality}, "True": {"num_prompts": 40, **quality}}},
    }
    queries = [f"query {i} <script>alert(1)</script>" for i in range(25)]
    before = [f"before {i}" for i in range(25) for _ in range(2)]
    after = [f"after {i}" for i in range(25) for _ in range(2)]
    table = qualitative_table(queries, before, after, rng.uniform(size=(25, 2)), rng.uniform(size=(25, 2)),
                              rng.normal(size=(25, 2)), rng.normal(size=(25, 2)))
    history = [{"step": s, "env/reward_mean": s / 50, "objective/kl": s / 100, "env/response_length_mean": 30 - s / 5,
                "loss/policy": 0.01} for s in range(50)]
    for s in range(0, 50, 10):
        history[s]["eval/toxicity_probability"] = 0.5 - s / 200
    return metrics, table, history, raw


def test_report_is_self_contained_with_plots(tmp_path):
    metrics, table, history, raw = _synthetic()
    path = render_report(metrics, table, history, tmp_path / "report.html", raw=raw)
    doc = path.read_text(encoding="utf-8")
    images = PNG_SRC.findall(doc)
    assert len(images) == 4  # improvement, histograms, training curves, learning curves
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    assert all(name in doc for name in EVALUATORS)
    assert "<script>" not in doc and "&lt;script&gt;" in doc
    assert not re.search(r'(src|href)="https?:', doc)
    assert doc.count("query ") == 20  # top 10 and bottom 10 of 25
    assert "ROUGE-1 F1" in doc and "Distinct-1 (pooled)" in doc and "ROUGE-2" not in doc
    assert "Perplexity under the reference model" in doc


def test_report_shows_counts_units_tests_and_groups(tmp_path):
    metrics, table, history, raw = _synthetic()
    doc = render_report(metrics, table, history, tmp_path / "report.html", raw=raw).read_text(encoding="utf-8")
    ref = metrics["evaluation"]["evaluators"][EVALUATORS[0]]["reference"]
    assert f"({ref['toxic_prompts']}/60 prompts)" in doc and f"({ref['toxic_samples']}/240 samples)" in doc
    assert "exact McNemar" in doc and "discordant" in doc and "paired permutation" in doc
    assert "log-odds of non-toxic" in doc and "profanity-check" in doc
    assert "Quality per group (heated)" in doc and "heated = True" in doc and "40 prompts" in doc
    assert f"Ranked by {EVALUATORS[1]}" in doc


def test_unreliable_relative_change_is_flagged(tmp_path):
    metrics, table, history, raw = _synthetic()
    summary = metrics["evaluation"]["evaluators"][EVALUATORS[0]]
    for change in summary["relative_change"].values():
        change["reliable"] = True
    summary["relative_change"]["toxic_rate"]["reliable"] = False
    doc = render_report(metrics, table, [], tmp_path / "report.html").read_text(encoding="utf-8")
    flags = doc.count(">unreliable</span>")
    summary["relative_change"]["toxic_rate"]["reliable"] = True
    doc = render_report(metrics, table, [], tmp_path / "report.html").read_text(encoding="utf-8")
    assert flags == doc.count(">unreliable</span>") + 1


def test_report_without_history_or_raw_skips_those_plots(tmp_path):
    metrics, table, _, _ = _synthetic()
    doc = render_report(metrics, table[:3], [], tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(PNG_SRC.findall(doc)) == 1  # only the improvement plot
    assert doc.count("query ") == 3  # few rows: each shown once


def test_report_of_empty_metrics_still_renders(tmp_path):
    doc = render_report({}, [], [], tmp_path / "report.html").read_text(encoding="utf-8")
    assert doc.startswith("<!DOCTYPE html>") and not PNG_SRC.findall(doc)
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_renders_in_a_browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("/usr/bin/chromium")
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    from PIL import Image

    metrics, table, history, raw = _synthetic()
    html = render_report(metrics, table, history, tmp_path / "report.html", raw=raw)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
                    f"--screenshot={shot}", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 500  # text, tables and antialiased plots, not a blank page
    orange = np.array([int(REFERENCE_COLOR[i:i + 2], 16) for i in (1, 3, 5)])
    # the reference colour is used only by the histogram plot, so seeing it proves the image decoded and laid out
    assert np.sum(np.abs(pixels - orange).sum(axis=1) < 90) > 500


def test_report_marks_reward_terms_and_counts_every_toxicity_metric(tmp_path):
    """A run trained on fidelity optimised ROUGE-L, and its reward scorer's toxicity: neither guards it."""
    metrics, table, _, _ = _synthetic()
    evaluation = metrics["evaluation"]
    evaluation["reward_terms"] = {"reference": {"scorer": -1.0, "fidelity": 0.3},
                                  "policy": {"scorer": 2.0, "fidelity": 0.2}}
    evaluation["quality"] = {"reference": {"rougeL": 0.25, "distinct_2": 0.5},
                             "policy": {"rougeL": 0.2, "distinct_2": 0.6}}
    doc = render_report(metrics, table, [], tmp_path / "report.html").read_text(encoding="utf-8")
    flag = '<span class="flag">trained on: not a guard</span>'
    assert f"<td>ROUGE-L F1 {flag}</td>" in doc and "<td>Distinct-2 (pooled)</td>" in doc
    assert doc.count(f'<span class="badge reward">reward</span> {flag}') == 2  # its card and its table rows
    assert '<span class="badge held-out">held-out</span> <span class="flag">' not in doc
    ref = evaluation["evaluators"][EVALUATORS[1]]["reference"]
    # expected max toxicity counts toxic prompts, mean toxicity toxic samples, as the card and compare do
    assert doc.count(f"({ref['toxic_prompts']}/60 prompts)") == 2
    assert doc.count(f"({ref['toxic_samples']}/240 samples)") == 2


def _judged_alone():
    """A model judged alone (``detoxrl evaluate --model`` without ``--adapter``): reference sides only."""
    side = {"toxicity_probability": 0.25, "toxic_prompts": 2, "prompts": 8, "expected_max_toxicity": 0.312,
            "expected_max_toxicity_std": 0.2, "toxic_rate": 0.125, "toxic_samples": 3, "samples": 24, "mean": 0.2,
            "std": 0.1}
    quality = {"reference": {"length_mean": 12.0, "rougeL": 0.3, "distinct_2": 0.6, "specificity": 0.75}}
    evaluation = {
        "num_prompts": 8, "samples_per_prompt": 3, "threshold": 0.5, "reward_scorer": "scorer",
        "reward_terms": {"reference": {"scorer": 1.0, "fidelity": 0.3, "novelty": 0.6}},
        "evaluators": {"scorer": {"role": "reward", "reference": side},
                       "judge": {"role": "held-out", "reference": side}},
        "quality": quality,
        "guards": {"reference": {"specificity": 0.75, "opening_share": 0.5, "near_duplicate_rate": 0.0,
                                 "most_common_opening": "the text goes on", "opening_responses": 12, "responses": 24}},
        "calibration": {"constant sentence": {"rougeL": 0.1, "distinct_2": 0.01}},
        "group_column": "heated", "groups": {"True": {"num_prompts": 8, **quality}}}
    run = {"model": "tiny-base", "adapter": None, "output_dir": "evals/tiny-base"}
    raw = {name: {"reference": np.linspace(0, 1, 24).tolist()} for name in ("scorer", "judge")}
    return {"run": run, "evaluation": evaluation}, raw


def test_a_model_judged_alone_gets_a_one_model_report(tmp_path):
    metrics, raw = _judged_alone()
    doc = render_report(metrics, [], [], tmp_path / "report.html", raw=raw).read_text(encoding="utf-8")
    assert "judged alone" in doc and "<code>detoxrl compare evals/tiny-base OTHER_DIR</code>" in doc
    assert ">Policy<" not in doc and "Difference" not in doc and "Relative change" not in doc
    assert "Improvement per evaluator" not in doc and len(PNG_SRC.findall(doc)) == 1  # the histogram alone
    # the one column: toxicity per judge, quality, groups; every toxicity figure with its counts
    assert doc.count("<th>Metric</th><th class='num'>Model</th></tr>") == 3
    assert doc.count("toxic prompts 2 of 8</div>") == 2  # the cards
    assert doc.count("25.0% <span class=\"muted\">(2/8 prompts)</span>") == 2
    assert doc.count("0.312 <span class=\"muted\">(2/8 prompts)</span>") == 2
    assert doc.count("12.5% <span class=\"muted\">(3/24 samples)</span>") == 2
    assert doc.count("0.200 <span class=\"muted\">(3/24 samples)</span> <span class=\"muted\">± 0.100</span>") == 2
    assert "<td>Specificity (own dialogue retrieved)</td><td class=\"num\">75.0%</td>" in doc
    assert "<li>model: “the text goes on” (12 of 24)</li>" in doc and "Calibration" in doc
    # nothing was trained, so neither the reward's scorer nor ROUGE-L or distinct-2 is marked as trained on
    assert "trained on" not in doc and '<span class="badge reward">reward</span>' in doc
