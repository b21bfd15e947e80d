"""The command line end to end on tiny models, and one clear line for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tiny import tiny_run_settings, write_yaml


def write_config(tmp_path: Path, model: Path, classifier: Path, **dotted) -> Path:
    """A two-step run with the end-of-training evaluation and TensorBoard logs."""
    settings = tiny_run_settings(
        model, tmp_path / "run", classifier,
        **{"data.max_prompt_tokens": 48, "generation.max_new_tokens": 4, "rl.steps": 2, "rl.batch_size": 4,
           "eval": {"evaluators": ["profanity-check"], "max_prompts": 6, "samples_per_prompt": 2},
           "report_to": ["tensorboard"], **dotted},
    )
    return write_yaml(tmp_path / "config.yaml", settings)


def test_train_then_evaluate_end_to_end(tmp_path, tiny_t5, tiny_classifier, run_cli):
    config = write_config(tmp_path, tiny_t5, tiny_classifier)
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "detoxrl.cli", "train", "--config", str(config), "--seed", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert f"done: adapter, metrics and report are in {run}" in done.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    held_out = metrics["evaluation"]["evaluators"]["profanity-check"]
    # the verdict is printed before the path: judge, toxic prompts before -> after, the guards
    headline = done.stdout.split("done:")[0]
    assert "profanity-check" in headline and "held-out" in headline
    assert f"{held_out['reference']['toxic_prompts']}/6 → {held_out['policy']['toxic_prompts']}/6" in headline
    assert "ROUGE-L" in headline and "distinct-2" in headline
    for name in ("config.yaml", "history.jsonl", "metrics.json", "report.html", "samples.csv",
                 "adapter/adapter_model.safetensors", "adapter/value_head.safetensors", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert list((run / "logs").rglob("events.out.tfevents*")), "TensorBoard events"
    assert load_file(run / "adapter" / "value_head.safetensors")["summary.weight"].shape[1] == 32
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    for key in ("objective/kl", "ppo/returns/mean", "policy/advantages_mean", "env/reward_mean",
                "env/response_length_mean", "objective/entropy", "policy/clipfrac", "time/total"):
        assert key in history[0], key
    metrics = json.loads((run / "metrics.json").read_text())
    evaluators = metrics["evaluation"]["evaluators"]
    assert evaluators[str(tiny_classifier)]["role"] == "reward"
    assert evaluators["profanity-check"]["role"] == "held-out"
    assert metrics["evaluation"]["num_prompts"] == 6 and metrics["evaluation"]["samples_per_prompt"] == 2
    assert "rougeL" in metrics["evaluation"]["quality"]["policy"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["rl"]["steps"] == 2

    # A finished run is never overwritten.
    again = subprocess.run([sys.executable, "-m", "detoxrl.cli", "train", "--config", str(config)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert "Traceback" not in again.stderr

    code, out, err = run_cli(["evaluate", str(run), "--max_prompts", "3", "--samples_per_prompt", "1"])
    assert code == 0, err
    assert f"report: {run / 'eval' / 'report.html'}" in out
    eval_metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert eval_metrics["evaluation"]["num_prompts"] == 3
    assert (run / "eval" / "report.html").is_file()


def test_compare_prints_both_runs(tmp_path, run_cli):
    for name, rate in (("a", 0.4), ("b", 0.1)):
        (tmp_path / name).mkdir()
        metrics = {"evaluation": {"evaluators": {"hatesonar": {"role": "held-out",
                   "reference": {"mean": 0.5, "std": 0.1, "toxic_rate": 0.5},
                   "policy": {"mean": 0.3, "std": 0.1, "toxic_rate": rate}}}}}
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = run_cli(["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert code == 0, err
    assert "hatesonar" in out and "40.0%" in out and "10.0%" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"rl.batch_size": 6, "rl.mini_batch_size": 4}, "must be divisible by rl.mini_batch_size"),
        ({"reward.label": "friendly"}, "label 'friendly' is not a class of the reward classifier; its labels are: nothate, hate"),
        ({"data.text_column": "conversation"}, "dataset has no column 'conversation'"),
        ({"data.min_chars": 5000, "data.max_chars": 6000}, "only 0 rows are left after keeping texts"),
        ({"generation.top_k": 50}, "top_k/top_p/repetition_penalty must stay"),
        ({"eval.samples_per_prompt": 0}, "eval.samples_per_prompt must be at least 1"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_t5, tiny_classifier, run_cli, extra, message):
    config = write_config(tmp_path, tiny_t5, tiny_classifier, **extra)
    code, out, err = run_cli(["train", "--config", str(config)])
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing half-written left behind


def test_bad_model_and_reward_paths(tmp_path, tiny_t5, tiny_classifier, run_cli):
    config = write_config(tmp_path, tmp_path / "nope", tiny_classifier)
    code, _, err = run_cli(["train", "--config", str(config)])
    assert code == 2 and "does not exist" in err
    config = write_config(tmp_path, tiny_t5, tiny_classifier, **{"reward.scorer": "callable", "reward.function": "nomodule_x:f"})
    code, _, err = run_cli(["train", "--config", str(config)])
    assert code == 2 and "cannot import reward module 'nomodule_x'" in err


def test_nan_reward_stops_with_a_clear_error(tmp_path, tiny_t5, tiny_classifier, run_cli, monkeypatch):
    (tmp_path / "nanreward.py").write_text("def score(texts):\n    return [float('nan')] * len(texts)\n")
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_t5, tiny_classifier, **{"reward.scorer": "callable",
                                                                  "reward.function": "nanreward:score"})
    code, _, err = run_cli(["train", "--config", str(config)])
    assert code == 2 and "NaN or infinite" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_config_errors(tmp_path, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: [unclosed\n")
    code, _, err = run_cli(["train", "--config", str(bad)])
    assert code == 2 and "is not valid YAML" in err
    bad.write_text("rl:\n  stepz: 3\n")
    code, _, err = run_cli(["train", "--config", str(bad)])
    assert code == 2 and "unknown config key 'rl.stepz'" in err
    code, _, err = run_cli(["train", "--rl.batch_size", "many"])
    assert code == 2 and "rl.batch_size must be an integer" in err
    code, _, err = run_cli(["evaluate", str(tmp_path)])
    assert code == 2 and "not a detoxrl run directory" in err
