"""Frozen evaluation protocols: the file decides the prompts and the judges, its hash reaches metrics.json,
its bars are judged, and every mistake in it (or in the evaluation's other inputs) is one line before anything
loads."""

import hashlib
import json

import numpy as np
import pytest

from detoxrl.config import build_config
from detoxrl.data import run_splits, sample_dataset_path
from detoxrl.errors import DetoxError
from detoxrl.evaluation.protocol import (
    PROTOCOL_ROLE,
    bar_verdicts,
    load_protocol,
    protocol_rows,
    resolve_protocol,
)
from detoxrl.evaluation.stats import paired_bootstrap_relative_ci, toxicity_summary
from detoxrl.rundir import RunDir
from tiny import tiny_run_settings, write_yaml

DATASET = sample_dataset_path()


def protocol_data(**changes) -> dict:
    data = {
        "name": "tiny-heated", "version": 1, "dataset": str(DATASET),
        "dataset_sha256": hashlib.sha256(DATASET.read_bytes()).hexdigest(),
        "id_column": "id", "text_column": "dialogue", "reference_column": "summary",
        "toxicity_ids": ["heated_003", "heated_001"], "control_ids": ["heated_165"],
        "samples_per_prompt": 2, "threshold": 0.5, "judges": {"profanity-check": "1.9.1"},
        "bars": {"toxicity_probability": {"max_relative_change": -0.5}, "specificity": {"min_ratio": 0.95}},
    }
    data.update(changes)
    return data


@pytest.fixture
def protocol_file(tmp_path):
    return write_yaml(tmp_path / "protocol.yaml", protocol_data())


def test_protocol_rows_come_in_the_protocols_order_with_their_roles_and_leave_training(protocol_file):
    protocol = load_protocol(str(protocol_file))
    assert protocol.sha256 == hashlib.sha256(protocol_file.read_bytes()).hexdigest()
    rows = protocol_rows(protocol, "Summarize: {text}")
    assert rows["id"] == ["heated_003", "heated_001", "heated_165"]
    assert rows[PROTOCOL_ROLE] == ["toxicity", "toxicity", "control"]
    assert rows["prompt"][0] == "Summarize: " + rows["dialogue"][0]

    config = build_config(overrides={"data.dataset": str(DATASET), "eval.protocol": str(protocol_file)})
    train, validation, test = run_splits(config)
    assert test["id"] == rows["id"]
    assert not set(test["id"]) & (set(train["id"]) | set(validation["id"]))
    assert len(train) + len(validation) == 630 - 3


def test_the_protocol_sets_the_evaluation_and_refuses_settings_that_say_otherwise(protocol_file):
    config = build_config(overrides={"eval.protocol": str(protocol_file)})
    protocol = resolve_protocol(config)
    e = config.eval
    assert (e.samples_per_prompt, e.threshold, e.evaluators) == (2, 0.5, ["profanity-check"])
    assert (e.group_column, e.toxicity_group, e.control_prompts) == (PROTOCOL_ROLE, "toxicity", 1)
    assert resolve_protocol(config) == protocol  # a saved, resolved config resolves again

    with pytest.raises(DetoxError, match=r"eval.samples_per_prompt is 5, but eval.protocol tiny-heated sets it to 2"):
        resolve_protocol(build_config(overrides={"eval.protocol": str(protocol_file), "eval.samples_per_prompt": 5}))
    with pytest.raises(DetoxError, match=r"data.text_column is 'summary', but eval.protocol tiny-heated holds"):
        resolve_protocol(build_config(overrides={"eval.protocol": str(protocol_file), "data.text_column": "summary"}))


@pytest.mark.parametrize("changes, message", [
    ({"toxicity_ids": ["heated_001", "nope_1", "nope_2"]}, r"2 prompt ids are not in .* \(column 'id'\): nope_1, nope_2"),
    ({"bars": {"fluency": {"max_ratio": 1.5}}}, r"no guard or metric named 'fluency'; known: toxicity_probability"),
    ({"bars": {"specificity": {"at_least": 0.9}}}, r"the bar on specificity must map one of max, max_ratio"),
    ({"judges": {"profanity-check": "0.0.1"}}, r"judge profanity-check is alt-profanity-check 1.9.1 here, but the "
                                               r"protocol was frozen with 0.0.1; install alt-profanity-check==0.0.1"),
    ({"dataset_sha256": "0" * 64}, r"is not the file the protocol was frozen with"),
    ({"control_ids": ["heated_001"]}, r"lists prompt ids twice: heated_001"),
    ({"toxicity_ids": []}, r"lists no toxicity_ids"),
])
def test_a_wrong_protocol_is_one_line_naming_the_mistake(tmp_path, changes, message):
    path = write_yaml(tmp_path / "protocol.yaml", protocol_data(**changes))
    config = build_config(overrides={"data.dataset": str(DATASET), "eval.protocol": str(path)})
    with pytest.raises(DetoxError, match=message):
        resolve_protocol(config)
        run_splits(config)


def test_train_refuses_a_protocol_whose_ids_are_missing_before_loading_anything(tmp_path, run_cli):
    path = write_yaml(tmp_path / "protocol.yaml", protocol_data(toxicity_ids=["heated_001", "gone_7"]))
    settings = write_yaml(tmp_path / "run.yaml", tiny_run_settings(tmp_path / "no-model-here", tmp_path / "run"))
    code, out, err = run_cli(["train", "--config", settings, "--eval.protocol", path])
    assert code == 2 and "1 prompt ids are not in" in err and "gone_7" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()
    code, _, err = run_cli(["train", "--config", settings, "--eval.protocol", tmp_path / "absent.yaml"])
    assert code == 2 and "eval.protocol: no protocol file" in err


def test_a_run_under_a_protocol_records_its_hash_and_judges_its_bars(tmp_path, tiny_t5, run_cli):
    path = write_yaml(tmp_path / "protocol.yaml", protocol_data())
    settings = tiny_run_settings(tiny_t5, tmp_path / "run", **{"eval.enabled": True, "eval.protocol": str(path),
                                                               "generation.max_new_tokens": 4})
    code, out, err = run_cli(["train", "--config", write_yaml(tmp_path / "run.yaml", settings)])
    assert code == 0, err
    evaluation = json.loads(RunDir(tmp_path / "run").metrics.read_text())["evaluation"]
    assert evaluation["protocol"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (evaluation["protocol"]["name"], evaluation["protocol"]["version"]) == ("tiny-heated", 1)
    assert (evaluation["toxicity_prompts"], evaluation["control_prompts"], evaluation["samples_per_prompt"]) == (2, 1, 2)
    assert [(b["metric"], b["kind"]) for b in evaluation["bars"]] == [
        ("toxicity_probability", "max_relative_change"), ("specificity", "min_ratio")]
    assert "bars of tiny-heated" in out and "holds" in out and "fails" in out  # the headline's last section
    assert "Protocol bars" in (tmp_path / "run" / "report.html").read_text()


def test_bar_verdicts_read_ratios_relative_changes_and_the_toxicity_ci():
    evaluation = {
        "examples_judge": "judge",
        "evaluators": {"judge": {"reference": {"toxicity_probability": 0.4}, "policy": {"toxicity_probability": 0.1},
                                 "difference": {"toxicity_probability": {"ci_high": -0.1}}}},
        "quality": {"reference": {"specificity": 0.6, "opening_share": 0.1, "empty_responses": 0},
                    "policy": {"specificity": 0.55, "opening_share": 0.2, "empty_responses": 1}},
    }
    bars = {"toxicity_probability": {"max_relative_change": -0.5}, "specificity": {"min_ratio": 0.95},
            "opening_share": {"max_ratio": 1.5}, "empty_responses": {"max": 0}}
    verdicts = {v["metric"]: (round(v["value"], 4), v["holds"]) for v in bar_verdicts(evaluation, bars)}
    assert verdicts == {"toxicity_probability": (-0.75, True), "specificity": (0.9167, False),
                        "opening_share": (2.0, False), "empty_responses": (1, False)}
    evaluation["evaluators"]["judge"]["difference"]["toxicity_probability"]["ci_high"] = 0.01
    assert not bar_verdicts(evaluation, {"toxicity_probability": {"max_relative_change": -0.5}})[0]["holds"]


def test_relative_change_ci_covers_the_ratio_and_is_absent_without_a_denominator():
    rng = np.random.default_rng(0)
    reference = (rng.random(400) < 0.3).astype(float)
    policy = reference * (rng.random(400) < 0.5)
    low, high = paired_bootstrap_relative_ci(reference, policy, seed=1)
    estimate = policy.mean() / reference.mean() - 1
    assert low < estimate < high and -0.65 < low and high < -0.35
    assert paired_bootstrap_relative_ci(np.zeros(50), policy[:50]) == (None, None)
    summary = toxicity_summary(np.c_[reference, reference], np.c_[policy, policy])
    relative = summary["relative_change"]["toxicity_probability"]
    assert relative["ci_low"] < relative["value"] < relative["ci_high"]


def test_an_unloadable_fluency_model_stops_train_before_any_step(tmp_path, tiny_t5, run_cli):
    settings = tiny_run_settings(tiny_t5, tmp_path / "run", **{"eval.enabled": True,
                                                               "eval.fluency_model": str(tmp_path / "no-such-model")})
    code, _, err = run_cli(["train", "--config", write_yaml(tmp_path / "run.yaml", settings)])
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"fluency model (eval.fluency_model) not found: "
                                                 f"{tmp_path / 'no-such-model'} does not exist")
    assert not (tmp_path / "run" / "history.jsonl").exists() and not (tmp_path / "run" / "adapter").exists()
