"""The model card states what was trained and measured: the whole reward, and the counts behind each metric."""

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard

from detoxrl.config import build_config
from detoxrl.evaluation.stats import toxicity_summary
from detoxrl.modelcard import write_model_card
from detoxrl.rewards.composite import reward_description


def finished_run(tmp_path, config, metrics):
    """A run directory as training leaves it (config.yaml, metrics.json) and an adapter directory beside it."""
    run, adapter = tmp_path / "run", tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    config.save(run / "config.yaml")
    (run / "metrics.json").write_text(json.dumps(metrics))
    (adapter / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    return run, adapter


def card_of(tmp_path, config, metrics) -> str:
    run, adapter = finished_run(tmp_path, config, metrics)
    write_model_card(run, adapter)
    return ModelCard.load(adapter / "README.md").text


def test_card_states_the_composite_reward_of_the_saved_config(tmp_path):
    text = card_of(tmp_path, build_config("smollm2-offline"), {})
    assert ("- Reward: profanity-check (log-odds of non-toxic) + 5 x ROUGE-L against the reference summary "
            "+ 15 x bigram novelty\n") in text


@pytest.mark.parametrize("overrides, expected", [
    ({}, "classifier `facebook/roberta-hate-speech-dynabench-r4-target` (logit of class 'nothate')"),
    ({"reward.scorer": "hatesonar", "reward.transform": "prob", "reward.score_query": True,
      "reward.novelty_weight": 0.5},
     "hatesonar (probability of non-toxic) on query + response + 0.5 x bigram novelty"),
    ({"reward.scorer": "callable", "reward.function": "mine:score", "reward.fidelity_weight": 2,
      "data.reference_column": "target"},
     "`mine:score` + 2 x ROUGE-L against the reference target"),
], ids=["classifier", "built-in-on-query-with-novelty", "callable-with-fidelity"])
def test_reward_description_names_each_term_that_was_trained(overrides, expected):
    assert reward_description(build_config(overrides=overrides)) == expected


def test_toxicity_counts_are_prompts_for_per_prompt_metrics_and_samples_otherwise(tmp_path):
    """3 prompts x 2 samples: toxic samples (3/6 before) differ from toxic prompts (2/3 before)."""
    before = np.array([[0.9, 0.8], [0.1, 0.7], [0.2, 0.1]])
    after = np.array([[0.9, 0.1], [0.1, 0.2], [0.2, 0.1]])
    evaluation = {"num_prompts": 3, "samples_per_prompt": 2, "threshold": 0.5, "evaluators": {
        "hatesonar": {"role": "held-out", **toxicity_summary(before, after, n_resamples=100)}}}
    text = card_of(tmp_path, build_config("smollm2-offline"), {"evaluation": evaluation})
    counts = {line.split(" | ")[1]: line.rsplit(" | ", 1)[1] for line in text.splitlines()
              if line.startswith("| hatesonar (held-out) |")}
    assert counts == {"toxicity probability": "2/3 → 1/3 |", "expected max toxicity": "2/3 → 1/3 |",
                      "toxic rate": "3/6 → 1/6 |", "mean toxicity": "3/6 → 1/6 |"}


def test_card_marks_what_the_reward_trained_and_shows_the_catalogues_formats(tmp_path):
    """The offline preset trains on fidelity and novelty: ROUGE-L and distinct-2 are marked, length is a guard."""
    before = np.array([[0.9, 0.8], [0.1, 0.7], [0.2, 0.1]])
    after = np.array([[0.9, 0.1], [0.1, 0.2], [0.2, 0.1]])
    evaluation = {"num_prompts": 3, "samples_per_prompt": 2, "threshold": 0.5, "evaluators": {
        "profanity-check": {"role": "reward", **toxicity_summary(before, after, n_resamples=100)}},
        "reward_terms": {side: {"scorer": 0.0, "fidelity": 0.0, "novelty": 0.0} for side in ("reference", "policy")},
        "quality": {"reference": {"rougeL": 0.25, "distinct_2": 0.5, "length_mean": 20.0},
                    "policy": {"rougeL": 0.2, "distinct_2": 0.6, "length_mean": 18.0, "kl_mean": 1.5}}}
    text = card_of(tmp_path, build_config("smollm2-offline"), {"evaluation": evaluation})
    assert "| profanity-check (reward; trained on: not a guard) | toxicity probability | 66.7% | 33.3% | -33.3 pp [" \
        in text
    assert "| ROUGE-L F1 (trained on: not a guard) | 0.250 | 0.200 |" in text
    assert "| distinct-2 (pooled) (trained on: not a guard) | 0.500 | 0.600 |" in text
    assert "| mean length (words) | 20.0 | 18.0 |" in text
    assert "| KL to reference (nats/response) | n/a | 1.500 |" in text
