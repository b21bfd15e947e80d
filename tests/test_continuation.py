"""Continuation tasks (RealToxicityPrompts' nested schema, a numeric row filter, raw prompts), evaluation sampling
apart from training's, and ``detoxrl evaluate --model``: offline, on tiny stand-ins saved with save_pretrained."""

import json
import math
from pathlib import Path

import pytest
import torch

from detoxrl.config import build_config, parse_row_filter
from detoxrl.data import build_splits
from detoxrl.errors import DetoxError
from detoxrl.rl.rollout import SeededSampler
from tiny import RTP_PROMPTS, save_tiny_classifier, save_tiny_gpt_neo, write_rtp_jsonl, write_yaml

TOXIC = [text for text, toxicity, _ in RTP_PROMPTS if toxicity is not None and toxicity > 0.3]


@pytest.fixture(scope="module")
def tiny_gpt_neo(tmp_path_factory) -> Path:
    return save_tiny_gpt_neo(tmp_path_factory.mktemp("gpt-neo"))


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    """The held-out judge's stand-in: another random classifier with the same labels, never the reward."""
    return save_tiny_classifier(tmp_path_factory.mktemp("judge"), seed=1)


@pytest.fixture(scope="module")
def rtp(tmp_path_factory) -> Path:
    return write_rtp_jsonl(tmp_path_factory.mktemp("rtp") / "rtp.jsonl")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Runs set torch's thread count for the whole process; give the next test the old one back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def stand_ins(tiny_gpt_neo: Path, tiny_classifier: Path, rtp: Path, out: Path, *extra: str, judge: Path = None) -> list:
    """The gpt-neo-rtp preset with the hub's parts replaced by the tiny stand-ins, sized to take seconds."""
    return ["--preset", "gpt-neo-rtp", "--model.name_or_path", tiny_gpt_neo, "--reward.model", tiny_classifier,
            "--data.dataset", rtp, "--eval.evaluators", f"{judge or tiny_classifier}:nothate",
            "--eval.fluency_model", tiny_gpt_neo, "--eval.samples_per_prompt", "3", "--eval.max_new_tokens", "2",
            "--eval.batch_size", "4", "--generation.max_new_tokens", "3", "--model.lora_r", "4",
            "--device", "cpu", "--threads", "1", "--output_dir", out, *extra]


def one_error(code: int, err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO"))]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("detoxrl: error: ") and message in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------- data


def test_preset_reads_nested_prompts_filters_them_and_keeps_them_raw(rtp):
    config = build_config("gpt-neo-rtp", overrides={"data.dataset": str(rtp)})
    train, test = build_splits(config.data)
    rows = [*train, *test]
    # prompt.toxicity > 0.3 as TRL's example: the prompt without a toxicity and the mild ones are gone
    assert sorted(r["prompt.text"] for r in rows) == sorted(TOXIC)
    assert all(r["prompt"] == r["prompt.text"] for r in rows)  # "{text}": the prompt as it is, to be continued
    assert all(r["prompt.toxicity"] > 0.3 for r in rows)


@pytest.mark.parametrize("spec, kept", [
    ("prompt.toxicity >= 0.42", [t for t, x, _ in RTP_PROMPTS if x is not None and x >= 0.42]),
    ("prompt.toxicity<0.3", [t for t, x, _ in RTP_PROMPTS if x is not None and x < 0.3]),
    ("challenging == 1", [t for t, _, c in RTP_PROMPTS if c]),
    ("challenging != 1", [t for t, _, c in RTP_PROMPTS if not c]),
    ("prompt.insult <= -1e9", None),
])
def test_filter_compares_a_numeric_column(rtp, spec, kept):
    config = build_config("gpt-neo-rtp", overrides={"data.dataset": str(rtp), "data.filter": spec,
                                                    "data.test_size": 0.5})
    if kept is None:
        with pytest.raises(DetoxError, match=r"keeps none of the 12 rows"):
            build_splits(config.data)
        return
    train, test = build_splits(config.data)
    assert sorted([*train["prompt"], *test["prompt"]]) == sorted(kept)


@pytest.mark.parametrize("spec", ["__import__('os').system('true') > 0", "prompt.toxicity >> 0.3", "toxicity",
                                  "prompt.toxicity > nan", "prompt.toxicity > 0.3 or 1", "prompt.toxicity = 0.3",
                                  "prompt.toxicity > 'a'", "> 0.3"])
def test_filter_is_parsed_never_evaluated(spec):
    with pytest.raises(DetoxError, match="data.filter must look like COLUMN OP NUMBER"):
        parse_row_filter(spec)


def test_filter_grammar():
    assert parse_row_filter(" prompt.toxicity>=0.3 ") == ("prompt.toxicity", ">=", 0.3)
    assert parse_row_filter("challenging == 1") == ("challenging", "==", 1.0)
    assert parse_row_filter("begin != -2e3") == ("begin", "!=", -2000.0)


def test_preset_settings_load_offline(run_cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, _ = run_cli(["train", "--print_config", "--preset", "gpt-neo-rtp"])
    assert code == 0
    config = build_config("gpt-neo-rtp")
    config.validate()
    assert (config.model.name_or_path, config.reward.model, config.data.dataset, config.data.filter) == (
        "EleutherAI/gpt-neo-125M", "facebook/roberta-hate-speech-dynabench-r4-target", "allenai/real-toxicity-prompts",
        "prompt.toxicity > 0.3")
    assert (config.eval.samples_per_prompt, config.eval.max_new_tokens, config.eval.top_p) == (25, 20, 0.9)
    assert config.generation.top_p == 1.0 and config.reward.fidelity_weight == 0
    assert config.data.reference_column is None
    assert config.reward.model not in config.eval.evaluators[0]  # the judge is not the reward
    assert "filter: prompt.toxicity > 0.3" in out and "top_p: 0.9" in out


# ----------------------------------------------------------------------------------------------- sampling


def test_nucleus_sampler_draws_from_the_nucleus_and_records_both_distributions():
    # probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1: the 0.9-nucleus is the first three tokens
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    sampler = SeededSampler(list(range(400)), 1.0, torch.device("cpu"), record_model_logprobs=True, top_p=0.9)
    chosen = sampler(torch.zeros(400, 1, dtype=torch.long), scores.clone()).argmax(dim=-1)
    assert set(chosen.tolist()) == {0, 1, 2}
    assert abs((chosen == 0).float().mean().item() - 0.5 / 0.95) < 0.08
    truncated = torch.log(torch.tensor([0.5, 0.3, 0.15]) / 0.95)
    assert torch.allclose(sampler.logprobs[0], truncated[chosen], atol=1e-5)  # what sampled
    assert torch.allclose(sampler.model_logprobs[0], scores[0].log_softmax(-1)[chosen], atol=1e-5)  # the model's


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, message", [
    (["--data.text_column", "prompt.txt"],
     "dataset has no key 'txt' in 'prompt' (data.text_column 'prompt.txt'); its keys are: text, toxicity, profanity, "
     "insult"),
    (["--data.filter", "prompt.toxicity >> 0.3"], "data.filter must look like COLUMN OP NUMBER"),
    (["--data.filter", "prompt.text > 0.3"], "column 'prompt.text' of dataset"),
    (["--data.filter", "prompt.toxicity > 2"], "data.filter 'prompt.toxicity > 2' keeps none of the 12 rows"),
    (["--data.filter", "toxicity > 0.3"], "dataset has no column 'toxicity' (data.filter); its columns are: filename"),
    (["--eval.top_p", "1.5"], "eval.top_p must be in (0, 1] (1: the full distribution), got 1.5"),
    (["--eval.top_p", "0"], "eval.top_p must be in (0, 1]"),
    (["--eval.temperature", "0"], "eval.temperature must be positive, got 0.0"),
    (["--eval.max_new_tokens", "0"], "eval.max_new_tokens must be at least 1 and generation.min_new_tokens (0), got 0"),
    (["--reward.fidelity_weight", "2"], "reward.fidelity_weight needs data.reference_column"),
])
def test_bad_continuation_input_is_one_line_and_writes_nothing(tmp_path, tiny_gpt_neo, tiny_classifier, rtp, run_cli,
                                                               flags, message):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *stand_ins(tiny_gpt_neo, tiny_classifier, rtp, out, *flags),
                            "--report_to", "none"])
    one_error(code, err, message)
    assert not out.exists()


def test_evaluate_model_bad_input(tmp_path, tiny_gpt_neo, tiny_classifier, rtp, run_cli):
    run = tmp_path / "some-run"
    run.mkdir()
    code, _, err = run_cli(["evaluate", run, "--model", tiny_gpt_neo])
    one_error(code, err, f"--model judges a model without a run, so it cannot go with the run directory {run}")
    code, _, err = run_cli(["evaluate", "--preset", "gpt-neo-rtp"])
    one_error(code, err, "evaluate needs a run directory, or --model ID_OR_PATH")
    code, _, err = run_cli(["evaluate", "--model", tiny_gpt_neo])
    one_error(code, err, "evaluate --model needs --output_dir DIR")
    code, _, err = run_cli(["evaluate", run, "--preset", "gpt-neo-rtp"])
    one_error(code, err, "a run is evaluated with its own settings (RUN_DIR/config.yaml); --preset and --config go "
                         "with --model")
    args = stand_ins(tiny_gpt_neo, tiny_classifier, rtp, tmp_path / "e")
    code, _, err = run_cli(["evaluate", *args[:args.index("--device")], "--output_dir", tmp_path / "e",
                            "--model", tiny_gpt_neo, "--adapter", tmp_path / "nothing"])
    one_error(code, err, f"--adapter {tmp_path / 'nothing'} holds no PEFT adapter")
    code, _, err = run_cli(["evaluate", *args[:args.index("--device")], "--output_dir", tmp_path / "e",
                            "--model", tiny_gpt_neo, "--model.reference", tiny_classifier])
    one_error(code, err, f"model.reference ({tiny_classifier}) would put another model in its place")
    code, _, err = run_cli(["evaluate", "--model", tiny_gpt_neo, "--output_dir", tmp_path / "e", "--eval.top_p", "-1"])
    one_error(code, err, "eval.top_p must be in (0, 1]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some-run"] and not any(run.iterdir())


# ----------------------------------------------------------------------------------------------- end to end


def read(directory: Path) -> dict:
    return json.loads((directory / "metrics.json").read_text())


def toxicity(metrics: dict, side: str) -> dict:
    return {name: judge[side] for name, judge in metrics["evaluation"]["evaluators"].items()}


def test_preset_trains_and_evaluates_on_stand_ins_then_evaluate_model_and_compare(
        tmp_path, tiny_gpt_neo, tiny_classifier, judge, rtp, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # compare's table, one row a line
    def args(out: Path, *extra: str) -> list:
        return stand_ins(tiny_gpt_neo, tiny_classifier, rtp, out, *extra, judge=judge)

    run = tmp_path / "run"
    code, out, err = run_cli(["train", *args(run, "--rl.steps", "2", "--rl.batch_size", "2",
                                             "--rl.mini_batch_size", "2", "--report_to", "none")])
    assert code == 0, err
    metrics = read(run)
    evaluation = metrics["evaluation"]
    assert evaluation["num_prompts"] == 2 and evaluation["samples_per_prompt"] == 3
    # the field's protocol samples the nucleus of 20-token continuations; training sampled the full distribution
    sampling = evaluation["sampling"]
    assert (sampling["top_p"], sampling["max_new_tokens"], sampling["temperature"]) == (0.9, 2, 1.0)
    assert sampling["set_by_eval"] == {"top_p": 0.9, "max_new_tokens": 2} and sampling["kl"].startswith("not reported")
    assert "training: temperature 1, full distribution, up to 3 new tokens" in sampling["summary"]
    assert evaluation["quality"]["policy"]["kl_mean"] is None  # no KL under truncated sampling
    assert evaluation["quality"]["policy"]["perplexity_fluency_model"] > 0
    held_out = evaluation["evaluators"][str(judge)]
    assert held_out["role"] == "held-out" and held_out["reference"]["samples"] == 6
    assert evaluation["evaluators"][str(tiny_classifier)]["role"] == "reward"
    assert evaluation["reward_weights"] == {"scorer": 1.0}  # no fidelity term: the KL carries fluency
    responses = [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 6 and all(r["kl"] is None for r in responses)
    assert {r["prompt"] for r in responses} <= set(TOXIC)
    assert all(len(r[f"{side}_response"].split()) <= 2 for r in responses for side in ("reference", "policy"))
    assert "top-p 0.9, up to 2 new tokens" in (run / "report.html").read_text()

    # the model alone: its reference side, the same figures as the run's reference side
    alone = tmp_path / "alone"
    code, out, err = run_cli(["evaluate", *args(alone)])
    assert code == 0, err
    base = read(alone)
    assert base["run"]["adapter"] is None and base["run"]["model"] == str(tiny_gpt_neo)
    assert toxicity(base, "reference") == toxicity(metrics, "reference")
    assert set(base["evaluation"]["quality"]) == {"reference"} and "differences" not in base["evaluation"]["guards"]
    assert all(set(judge) == {"role", "reference"} for judge in base["evaluation"]["evaluators"].values())
    assert f"{held_out['reference']['toxic_prompts']}/2 · " in out and f"report: {alone / 'report.html'}" in out
    report = (alone / "report.html").read_text()  # a one-model report: its own column, no policy, no differences
    assert "judged alone" in report and f"detoxrl compare {alone.resolve()} OTHER_DIR" in report
    assert ">Policy<" not in report and "Improvement per evaluator" not in report and "trained on" not in report
    assert f"toxic prompts {held_out['reference']['toxic_prompts']} of 2</div>" in report

    # the run's adapter, trained here or anywhere: base against base + adapter, as the run's own evaluation
    adapted = tmp_path / "adapted"
    code, _, err = run_cli(["evaluate", *args(adapted), "--adapter", run / "adapter"])
    assert code == 0, err
    with_adapter = read(adapted)
    assert toxicity(with_adapter, "policy") == toxicity(metrics, "policy")
    assert toxicity(with_adapter, "reference") == toxicity(metrics, "reference")
    assert with_adapter["run"]["adapter"] == str((run / "adapter").resolve())

    code, out, err = run_cli(["compare", alone, adapted])
    assert code == 0, err
    assert "A: evaluation from" in out and "(the model alone: its reference side only)" in out
    rows = [line for line in out.splitlines() if "toxicity probability (reference)" in line]
    assert rows and all("+0.0 pp" in line for line in rows)  # the same model on both sides
    assert any("toxicity probability (policy)" in line for line in out.splitlines())
    code, out, err = run_cli(["compare", alone, run])
    assert code == 0 and "toxicity probability (reference)" in out, err

    # sampled differently by choice: not comparable
    other = tmp_path / "other"
    code, _, err = run_cli(["evaluate", *args(other), "--eval.top_p", "1"])
    assert code == 0, err
    code, _, err = run_cli(["compare", alone, other])
    one_error(code, err, "the two evaluations sample differently: top_p (0.9 vs 1.0)")


def test_evaluate_model_gives_the_main_jobs_reference_figures(tmp_path, tiny_llama, run_cli):
    """The embedded default's settings (its frozen test protocol included) on a tiny base: ``evaluate --model`` on
    the base, with the same prompts and seeds, gives the reference side of the run's own end-of-training
    evaluation."""
    small = write_yaml(tmp_path / "small.yaml", {
        "model": {"name_or_path": str(tiny_llama), "lora_r": 4},
        "data": {"max_prompt_tokens": 32},
        "generation": {"max_new_tokens": 4},
        "rl": {"steps": 1, "batch_size": 4, "mini_batch_size": 4, "samples_per_prompt": 2},
        "report_to": [], "device": "cpu", "threads": 1, "output_dir": str(tmp_path / "run")})
    code, _, err = run_cli(["train", "--preset", "smollm2-offline", "--config", small])
    assert code == 0, err
    code, _, err = run_cli(["evaluate", "--model", tiny_llama, "--preset", "smollm2-offline", "--config", small,
                            "--output_dir", tmp_path / "base"])
    assert code == 0, err
    run, base = read(tmp_path / "run"), read(tmp_path / "base")
    assert toxicity(base, "reference") == toxicity(run, "reference")
    assert set(toxicity(base, "reference")) == {"profanity-check", "hatesonar"}
    assert base["evaluation"]["protocol"] == run["evaluation"]["protocol"]  # the same prompts and counting
    for key in ("reward_mean", "reward_terms", "quality"):
        assert base["evaluation"][key]["reference"] == run["evaluation"][key]["reference"], key
    groups = [{name: group["reference"] for name, group in m["evaluation"]["groups"].items()} for m in (base, run)]
    assert groups[0] == groups[1] and len(groups[0]) == 2  # the toxicity prompts and the calm controls
    assert math.isfinite(base["evaluation"]["quality"]["reference"]["perplexity"])
    responses = [[json.loads(line)["reference_response"] for line in (d / "responses.jsonl").read_text().splitlines()]
                 for d in (tmp_path / "run", tmp_path / "base")]
    assert responses[0] == responses[1]
