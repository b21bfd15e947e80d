"""Bad input and faults: every case runs the real command line and ends with one clear line.

Each test checks the same contract (see ``assert_one_error``): a non-zero exit, exactly one line on
stderr that starts with ``detoxrl: error:`` (or the interrupt line), naming the problem, no traceback,
and no output directory left looking finished: no metrics.json; a directory that detoxrl created is
removed when it holds no checkpoint; a directory the user made is never deleted.

docs/reliability.md lists the cases, the message of each and the test that checks it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from detoxrl.config import DataConfig, build_config, load_run_config
from detoxrl.data import build_splits
from detoxrl.errors import DetoxError
from detoxrl.rundir import RunDir, atomic_write_json, read_history, write_history
from detoxrl.train import train
from tiny import subprocess_env, tiny_run_settings, write_yaml

PREFIX = "detoxrl: error: "
INTERRUPTED = "detoxrl: interrupted; continue with --resume"
# The PPO progress bar and logged warnings share stderr with the error; they are not error output.
NOT_ERRORS = re.compile(r"^\s*PPO:|^(INFO|WARNING) [\w.]+: ")


def settings(tmp_path: Path, model: Path, classifier: Path, output_dir: str | None = None, **dotted) -> dict:
    """A run that takes a second on tiny models, in ``tmp_path/run``; ``dotted`` overrides, e.g. ``**{"rl.steps": 0}``."""
    return tiny_run_settings(model, output_dir or tmp_path / "run", classifier, **dotted)


def assert_one_error(code, err: str, *messages: str, prefix: str = PREFIX, exit_code: int | None = None) -> str:
    """Non-zero exit; one line (besides progress and warnings) that starts with ``prefix`` and holds ``messages``."""
    assert code != 0
    if exit_code is not None:
        assert code == exit_code
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not NOT_ERRORS.match(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    for message in messages:
        assert message in lines[0], lines[0]
    return lines[0]


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes, to show that nothing was touched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def train_and_expect(tmp_path, run_cli, config: dict, *messages: str, args=()) -> str:
    """``detoxrl train --config`` must fail with one line; the run directory it created must be gone."""
    path = write_yaml(tmp_path / "config.yaml", config)
    code, _, err = run_cli(["train", "--config", path, *args])
    line = assert_one_error(code, err, *messages)
    assert not Path(config["output_dir"]).exists()  # created by detoxrl, no checkpoint: removed
    return line


def offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1, also for libraries that read it at import time."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Runs set torch's thread count for the whole process; give the next test the old one back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_t5, tiny_classifier) -> Path:
    """A finished 2-step run with a checkpoint at step 1 (shared; tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("finished")
    config = settings(root, tiny_t5, tiny_classifier, **{"rl.steps": 2, "save_steps": 1})
    out = train(build_config(None, write_yaml(root / "config.yaml", config)))
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "step-0000001" / "state.json").is_file()
    return out


# ----------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "text, message",
    [
        ("rl: [unclosed\n", "is not valid YAML (line"),
        ("- rl\n- steps\n", "must hold a mapping of settings"),
        ("outptu_dir: runs/a\n", "unknown config key 'outptu_dir'"),
        ("rl:\n  stepz: 3\n", "unknown config key 'rl.stepz'"),
        ("rl: 3\n", "rl must be a mapping, got 3"),
        ("rl:\n  steps: many\n", "rl.steps must be an integer, got 'many'"),
        ("rl:\n  learning_rate: [0.1, 0.2]\n", "rl.learning_rate must be a number, got [0.1, 0.2]"),
        ("rl:\n  batch_size: true\n", "rl.batch_size must be an integer, got True"),
        ("eval:\n  enabled: maybe\n", "eval.enabled must be true or false, got 'maybe'"),
    ],
    ids=["malformed-yaml", "yaml-list", "unknown-top-key", "unknown-nested-key", "section-not-mapping",
         "string-for-int", "list-for-float", "bool-for-int", "string-for-bool"],
)
def test_bad_config_file(tmp_path, run_cli, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = run_cli(["train", "--config", path, "--output_dir", tmp_path / "run"])
    assert_one_error(code, err, message, exit_code=2)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rl.steps", 0, "rl.steps must be at least 1, got 0"),
        ("rl.batch_size", -1, "rl.batch_size must be at least 1, got -1"),
        ("rl.mini_batch_size", 0, "rl.mini_batch_size must be at least 1, got 0"),
        ("generation.max_new_tokens", 0, "generation.max_new_tokens must be at least 1, got 0"),
        ("data.max_prompt_tokens", 0, "data.max_prompt_tokens must be at least 1, got 0"),
        ("reward.batch_size", 0, "reward.batch_size must be at least 1, got 0"),
        ("save_steps", -5, "save_steps must be 0 or more, got -5"),
        ("rl.learning_rate", float("nan"), "rl.learning_rate must be positive, got nan"),
    ],
    ids=["steps-0", "batch_size-negative", "mini_batch_size-0", "max_new_tokens-0", "max_prompt_tokens-0",
         "reward_batch_size-0", "save_steps-negative", "learning_rate-nan"],
)
def test_sizes_out_of_range(tmp_path, tiny_t5, tiny_classifier, run_cli, key, value, message):
    train_and_expect(tmp_path, run_cli, settings(tmp_path, tiny_t5, tiny_classifier, **{key: value}), message)


def test_batch_not_divisible_by_mini_batch(tmp_path, tiny_t5, tiny_classifier, run_cli):
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"rl.batch_size": 6, "rl.mini_batch_size": 4})
    train_and_expect(tmp_path, run_cli, config, "rl.batch_size (6) must be divisible by rl.mini_batch_size (4)")


@pytest.mark.parametrize("key, value", [("generation.top_k", 50), ("generation.top_p", 0.9)], ids=["top_k", "top_p"])
def test_truncated_sampling_is_refused_with_the_reason(tmp_path, tiny_t5, tiny_classifier, run_cli, key, value):
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{key: value})
    train_and_expect(tmp_path, run_cli, config, "top_k/top_p/repetition_penalty must stay 0/1.0/1.0",
                     "truncating it gives negative KL and wrong ratios")


def test_config_file_missing(tmp_path, run_cli):
    code, _, err = run_cli(["train", "--config", tmp_path / "nope.yaml"])
    assert_one_error(code, err, f"config file not found: {tmp_path / 'nope.yaml'}")


def test_config_file_not_utf8(tmp_path, run_cli):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  prompt_template: 'Résumé: {text}'\n".encode("latin-1"))
    code, _, err = run_cli(["train", "--config", path])
    assert_one_error(code, err, f"config file is not UTF-8 text: {path}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--rl.stepz", "3"], "unrecognized arguments: --rl.stepz 3"),
        (["train", "--rl.batch_size", "many"], "rl.batch_size must be an integer, got 'many'"),
        (["evaluate", "somewhere", "--samples_per_prompt", "2"], "somewhere is not a detoxrl run directory"),
    ],
    ids=["unknown-flag", "flag-wrong-type", "evaluate-not-a-run"],
)
def test_bad_command_line(tmp_path, run_cli, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args)
    assert_one_error(code, err, message, exit_code=2)
    assert not list(tmp_path.iterdir())


def test_evaluate_flag_of_the_wrong_type(tmp_path, run_cli, finished_run):
    code, _, err = run_cli(["evaluate", finished_run, "--samples_per_prompt", "two", "--output_dir", tmp_path / "e"])
    assert_one_error(code, err, "eval.samples_per_prompt must be an integer, got 'two'", exit_code=2)
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------------------------- data


def test_dataset_not_utf8(tmp_path, tiny_t5, tiny_classifier, run_cli):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(('{"dialogue": "' + "Caf\u00e9 talk. " * 30 + '"}\n').encode("latin-1"))
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.dataset": str(data)})
    train_and_expect(tmp_path, run_cli, config, f"dataset file {data} is not UTF-8 text", "line 1")


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.csv", "\n \n")], ids=["jsonl", "csv"])
def test_dataset_empty(tmp_path, tiny_t5, tiny_classifier, run_cli, name, content):
    data = tmp_path / name
    data.write_text(content)
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.dataset": str(data)})
    train_and_expect(tmp_path, run_cli, config, f"dataset file {data} is empty")


def test_dataset_not_parseable(tmp_path, tiny_t5, tiny_classifier, run_cli):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"dialogue": "unterminated\n')
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.dataset": str(data)})
    train_and_expect(tmp_path, run_cli, config, f"cannot read dataset file {data}: JSON parse error")


def test_dataset_without_text_column(tmp_path, tiny_t5, tiny_classifier, run_cli):
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.text_column": "conversation"})
    train_and_expect(tmp_path, run_cli, config, "dataset has no column 'conversation' (data.text_column); "
                     "its columns are: id, dialogue, summary")


def test_nothing_left_after_length_filter(tmp_path, tiny_t5, tiny_classifier, run_cli):
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.min_chars": 5000, "data.max_chars": 6000})
    train_and_expect(tmp_path, run_cli, config, "only 0 rows are left after keeping texts with 5000 < length <= 6000")


def test_dataset_unsupported_extension(tmp_path, tiny_t5, tiny_classifier, run_cli):
    data = tmp_path / "dialogues.txt"
    data.write_text("Person1: hello\n")
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.dataset": str(data)})
    train_and_expect(tmp_path, run_cli, config, f"dataset file {data} has an unsupported format (.txt); "
                     "use .jsonl, .csv or .parquet")


@pytest.mark.parametrize("name", ["missing.jsonl", "missing"], ids=["jsonl", "no-extension"])
def test_dataset_path_does_not_exist(tmp_path, tiny_t5, tiny_classifier, run_cli, name):
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.dataset": str(tmp_path / name)})
    train_and_expect(tmp_path, run_cli, config, f"dataset file not found: {tmp_path / name}")


LONG_TEXT = "Person1: you never listen to me. Person2: that is not true, I always listen. " * 4


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("number.jsonl", json.dumps({"dialogue": LONG_TEXT}) + "\n" + json.dumps({"dialogue": 42}) + "\n",
         "row 2: data.text_column 'dialogue' holds 42 (int), not text"),
        ("null.jsonl", json.dumps({"dialogue": LONG_TEXT}) + "\n" + json.dumps({"dialogue": None}) + "\n",
         "row 2: data.text_column 'dialogue' is empty (null)"),
        ("numbers.csv", "dialogue\n1\n2\n", "row 1: data.text_column 'dialogue' holds 1 (int), not text"),
        ("empty-cell.csv", f"dialogue,summary\n{LONG_TEXT},fine\n,empty\n",
         "row 2: data.text_column 'dialogue' is empty (null)"),
        ("reference.jsonl", json.dumps({"dialogue": LONG_TEXT, "summary": 3.5}) + "\n",
         "row 1: data.reference_column 'summary' holds 3.5 (float), not text"),
    ],
    ids=["jsonl-number", "jsonl-null", "csv-numbers", "csv-empty-cell", "reference-number"],
)
def test_dataset_value_not_text(tmp_path, tiny_t5, tiny_classifier, run_cli, name, content, message):
    data = tmp_path / name
    data.write_text(content)
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.dataset": str(data)})
    train_and_expect(tmp_path, run_cli, config, f"dataset {data} {message}; every row needs text there")


# ----------------------------------------------------------------------------------------------- models


def test_model_path_does_not_exist(tmp_path, tiny_classifier, run_cli):
    config = settings(tmp_path, tmp_path / "no-model", tiny_classifier)
    train_and_expect(tmp_path, run_cli, config, f"model not found: {tmp_path / 'no-model'} does not exist")


def test_model_directory_without_a_model(tmp_path, tiny_classifier, run_cli):
    (tmp_path / "empty").mkdir()
    config = settings(tmp_path, tmp_path / "empty", tiny_classifier)
    train_and_expect(tmp_path, run_cli, config, f"could not load model from {tmp_path / 'empty'}: "
                     "the directory holds no model (no config.json)")


def test_unknown_hub_model_while_offline(tmp_path, tiny_classifier, run_cli, monkeypatch):
    offline(monkeypatch)
    config = settings(tmp_path, "nobody/no-such-model-xyz", tiny_classifier)
    line = train_and_expect(tmp_path, run_cli, config, "could not load model 'nobody/no-such-model-xyz'",
                            "the model hub is unreachable")
    assert "use a local path" in line and "--preset smollm2-offline" in line


def test_label_not_in_classifier(tmp_path, tiny_t5, tiny_classifier, run_cli):
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"reward.label": "friendly"})
    train_and_expect(tmp_path, run_cli, config, "label 'friendly' is not a class of the reward classifier; "
                     "its labels are: nothate, hate")


@pytest.mark.parametrize(
    "model, message",
    [
        ("tiny_llama", "data.max_prompt_tokens (32) + generation.max_new_tokens (1000000000) = 1000000032 tokens "
                       "do not fit the context of model {model}: 512 positions; lower one of them"),
        ("tiny_t5", "generation.max_new_tokens (1000000000) is more than 65536; model {model} has no fixed "
                    "context length, but responses this long are surely a mistake"),
    ],
    ids=["causal-context", "t5-no-limit"],
)
def test_max_new_tokens_beyond_the_context(tmp_path, tiny_classifier, run_cli, request, model, message):
    path = request.getfixturevalue(model)
    config = settings(tmp_path, path, tiny_classifier, **{"generation.max_new_tokens": 1_000_000_000})
    train_and_expect(tmp_path, run_cli, config, message.format(model=path))


# ----------------------------------------------------------------------------------------------- reward functions


@pytest.mark.parametrize(
    "body, message",
    [
        ("return [float('nan')] * len(texts)", "the reward is NaN or infinite for 2 of 2 texts (scorer rfn:score)"),
        ("return [1.0]", "reward function 'rfn:score' returned 1 values for 2 texts"),
        ("return ['good'] * len(texts)", "reward function 'rfn:score' must return one number per text"),
    ],
    ids=["nan", "wrong-count", "not-numbers"],
)
def test_bad_reward_function(tmp_path, tiny_t5, tiny_classifier, run_cli, monkeypatch, body, message):
    (tmp_path / "rfn.py").write_text(f"def score(texts):\n    {body}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "rfn", raising=False)
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"reward.scorer": "callable", "reward.function": "rfn:score"})
    train_and_expect(tmp_path, run_cli, config, message)


@pytest.mark.parametrize(
    "case, message",
    [
        ("reward-wrong-count", "reward function 'short:score' returned 3 values for 2 texts"),
        ("dataset-not-parseable", "cannot read dataset file broken.jsonl: JSON parse error"),
    ],
    ids=["reward-wrong-count", "dataset-not-parseable"],
)
def test_bad_input_in_a_real_process(tmp_path, tiny_t5, tiny_classifier, case, message):
    """The real entry point: library logging (which a test process captures) must not add lines either."""
    (tmp_path / "short.py").write_text("def score(texts):\n    return [0.5] * (len(texts) + 1)\n")
    (tmp_path / "broken.jsonl").write_text('{"dialogue": "unterminated\n')
    extra = ({"reward.scorer": "callable", "reward.function": "short:score"} if case == "reward-wrong-count"
             else {"data.dataset": "broken.jsonl"})
    config = settings(tmp_path, tiny_t5, tiny_classifier, **extra)
    path = write_yaml(tmp_path / "config.yaml", config)
    done = subprocess.run([sys.executable, "-m", "detoxrl.cli", "train", "--config", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert_one_error(done.returncode, done.stderr, message, exit_code=2)
    assert done.stdout == ""
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- output directory


def test_output_dir_under_a_file(tmp_path, tiny_t5, tiny_classifier, run_cli):
    """Not writable: a path below a regular file (chmod does not stop root, this does)."""
    (tmp_path / "afile").write_text("mine\n")
    config = settings(tmp_path, tiny_t5, tiny_classifier, output_dir=str(tmp_path / "afile" / "run"))
    train_and_expect(tmp_path, run_cli, config, f"cannot write to output directory {tmp_path / 'afile' / 'run'}: "
                     "Not a directory")
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_output_dir_read_only(tmp_path, tiny_t5, tiny_classifier, run_cli):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        try:
            (parent / "probe").mkdir()
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: chmod 0o500 does not stop writes (test_output_dir_under_a_file covers it)")
        config = settings(tmp_path, tiny_t5, tiny_classifier, output_dir=str(parent / "run"))
        train_and_expect(tmp_path, run_cli, config, f"cannot write to output directory {parent / 'run'}: "
                         "Permission denied")
    finally:
        parent.chmod(0o700)


def test_output_dir_is_a_file(tmp_path, tiny_t5, tiny_classifier, run_cli):
    target = tmp_path / "run"
    target.write_text("not a directory\n")
    path = write_yaml(tmp_path / "config.yaml", settings(tmp_path, tiny_t5, tiny_classifier))
    code, _, err = run_cli(["train", "--config", path])
    assert_one_error(code, err, f"--output_dir {target} is a file, not a directory")
    assert target.read_text() == "not a directory\n"


def test_output_dir_not_empty_without_resume(tmp_path, tiny_t5, tiny_classifier, run_cli):
    out = tmp_path / "run"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("keep me\n")
    (out / "results.csv").write_text("a,b\n1,2\n")
    before = tree(out)
    path = write_yaml(tmp_path / "config.yaml", settings(tmp_path, tiny_t5, tiny_classifier))
    code, _, err = run_cli(["train", "--config", path])
    assert_one_error(code, err, f"{out} is not empty; pass --resume to continue its run")
    assert tree(out) == before


def test_users_empty_directory_is_kept_after_a_failure(tmp_path, tiny_t5, tiny_classifier, run_cli):
    """A directory the user made survives, emptied of what the failed run wrote, so a rerun is not refused."""
    out = tmp_path / "run"
    out.mkdir()
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"data.text_column": "conversation"})
    path = write_yaml(tmp_path / "config.yaml", config)
    code, _, err = run_cli(["train", "--config", path])
    assert_one_error(code, err, "dataset has no column 'conversation'")
    assert out.is_dir() and not list(out.iterdir())


@pytest.mark.parametrize("resume", [False, True], ids=["plain", "with-resume"])
def test_finished_run_is_never_overwritten(tmp_path, run_cli, finished_run, resume):
    before = tree(finished_run)
    args = ["train", "--config", finished_run / "config.yaml", "--output_dir", finished_run] + (["--resume"] if resume else [])
    code, _, err = run_cli(args)
    assert_one_error(code, err, f"{finished_run} already holds a finished run; choose another --output_dir")
    assert tree(finished_run) == before


def unfinished_copy(finished_run: Path, tmp_path: Path) -> Path:
    """The finished run as it was when interrupted after its step-1 checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("metrics.json", "adapter", "report.html", "samples.csv", "responses.jsonl"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    write_history(read_history(run / "history.jsonl")[:1], run / "history.jsonl")
    return run


def test_resume_with_corrupt_checkpoint(tmp_path, run_cli, finished_run):
    run = unfinished_copy(finished_run, tmp_path)  # as if it died after its checkpoint
    (run / "checkpoints" / "step-0000001" / "trainable.safetensors").write_bytes(b"\x00garbage")
    code, _, err = run_cli(["train", "--output_dir", run, "--resume"])
    assert_one_error(code, err, f"checkpoint {run / 'checkpoints' / 'step-0000001'} is corrupt or incomplete",
                     "delete it to resume from an earlier one")
    assert (run / "checkpoints" / "step-0000001" / "state.json").is_file()  # kept for the user to inspect
    assert not (run / "metrics.json").exists()


def test_build_splits_leaves_the_config_unchanged():
    """A reference column the dataset lacks is absent from the rows; the caller's settings stay as given."""
    config = DataConfig(dataset="detoxrl:heated_dialogsum", reference_column="no_such_column")
    before = dataclasses.asdict(config)
    train_rows, test_rows = build_splits(config)
    assert dataclasses.asdict(config) == before
    assert "no_such_column" not in train_rows.column_names and "prompt" in test_rows.column_names


def test_split_seed_alone_decides_the_test_split(tmp_path):
    """Runs with different training seeds are judged on the same test prompts; runs saved before
    data.split_seed existed keep the split their seed made."""
    def test_prompts(**dotted):
        config = build_config(overrides={"data.dataset": "detoxrl:heated_dialogsum", **dotted})
        return list(build_splits(config.data)[1]["prompt"])

    assert test_prompts(seed=0) == test_prompts(seed=1)
    assert test_prompts(**{"data.split_seed": 1}) != test_prompts()
    saved = build_config(overrides={"seed": 3}).to_dict()
    del saved["data"]["split_seed"]
    assert load_run_config(write_yaml(tmp_path / "old.yaml", saved)).data.split_seed == 3
    saved["data"]["split_seed"] = 0
    assert load_run_config(write_yaml(tmp_path / "new.yaml", saved)).data.split_seed == 0


@pytest.mark.parametrize(
    "dotted, message",
    [
        ({"eval.toxicity_group": "True"},
         "eval.toxicity_group needs eval.group_column, the dataset column whose value it names"),
        ({"eval.control_prompts": 4},
         "eval.control_prompts needs eval.toxicity_group: without it every evaluated prompt is judged for toxicity"),
        ({"eval.group_column": "heated", "eval.toxicity_group": "True", "eval.control_prompts": -1},
         "eval.control_prompts must be 0 or more, got -1"),
        ({"eval.group_column": "heated", "eval.toxicity_group": True},
         "eval.toxicity_group must be a string, got True (YAML reads unquoted true, yes and on as booleans: quote "
         "the value)"),
        ({"eval.group_column": "heated", "eval.toxicity_group": "yes"},
         "eval.toxicity_group 'yes' is not a value of eval.group_column 'heated' in the evaluated prompts; its values "
         "are: False, True"),
        ({"data.split_seed": -1}, "data.split_seed must be 0 or more, got -1"),
    ],
    ids=["group-without-column", "controls-without-group", "controls-negative", "group-unquoted", "group-absent",
         "split-seed-negative"],
)
def test_bad_evaluation_prompt_settings(tmp_path, tiny_t5, tiny_classifier, run_cli, dotted, message):
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"eval.enabled": True, **dotted})
    train_and_expect(tmp_path, run_cli, config, message)


def test_history_writes_non_finite_values_as_null(tmp_path):
    path = write_history([{"step": 1, "loss": float("nan"), "kl": float("inf"), "reward": np.float32(0.5)}],
                         tmp_path / "history.jsonl")
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert read_history(path) == [{"step": 1, "loss": None, "kl": None, "reward": 0.5}]


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.metrics.write_text("old\n")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(DetoxError, match=f"could not write {re.escape(str(run.metrics))}: No space left on device"):
        atomic_write_json(run.metrics, {"new": 1})
    assert run.metrics.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # the temporary file is gone
    monkeypatch.undo()
    assert not RunDir(tmp_path / "fresh").is_finished()
    (tmp_path / "fresh").mkdir()
    atomic_write_json(RunDir(tmp_path / "fresh").metrics, {"train": {"kl": float("nan")}})
    assert RunDir(tmp_path / "fresh").is_finished()
    assert json.loads(RunDir(tmp_path / "fresh").metrics.read_text()) == {"train": {"kl": None}}


# ----------------------------------------------------------------------------------------------- evaluate, compare


def test_evaluate_without_adapter(tmp_path, run_cli, finished_run):
    run = tmp_path / "died-before-saving"
    run.mkdir()
    shutil.copy(finished_run / "config.yaml", run / "config.yaml")
    code, _, err = run_cli(["evaluate", run])
    assert_one_error(code, err, f"{run} has no trained adapter (adapter/adapter_config.json is missing)")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_evaluate_not_a_run_directory(tmp_path, run_cli):
    code, _, err = run_cli(["evaluate", tmp_path])
    assert_one_error(code, err, f"{tmp_path} is not a detoxrl run directory (config.yaml is missing)")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--samples_per_prompt", "0"], "samples_per_prompt must be at least 1, got 0"),
        (["--max_prompts", "-2"], "max_prompts must be at least 1, got -2"),
    ],
    ids=["samples_per_prompt-0", "max_prompts-negative"],
)
def test_evaluate_bad_counts(run_cli, finished_run, flags, message):
    code, _, err = run_cli(["evaluate", finished_run, *flags])
    assert_one_error(code, err, message)
    assert not (finished_run / "eval").exists()


def test_evaluate_toxicity_group_absent(tmp_path, run_cli, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = load_run_config(run / "config.yaml", {"eval.group_column": "heated", "eval.toxicity_group": "maybe"})
    config.save(run / "config.yaml")
    code, _, err = run_cli(["evaluate", run])
    assert_one_error(code, err, "eval.toxicity_group 'maybe' is not a value of eval.group_column 'heated'")
    assert not (run / "eval").exists()


def test_evaluate_dataset_without_prompt_column(tmp_path, run_cli, finished_run):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"text": "Person1: you again?"}) + "\n")
    code, _, err = run_cli(["evaluate", finished_run, "--dataset", data])
    assert_one_error(code, err, f"dataset {data} has no column 'dialogue'; its columns are: text")
    assert not (finished_run / "eval").exists()


def test_evaluate_evaluator_cannot_be_loaded(tmp_path, run_cli, monkeypatch, finished_run):
    offline(monkeypatch)
    out = tmp_path / "eval"
    code, _, err = run_cli(["evaluate", finished_run, "--evaluators", "no/such/model", "--output_dir", out])
    line = assert_one_error(code, err, "could not load evaluator tokenizer 'no/such/model'", "hub is unreachable")
    assert "--preset smollm2-offline" in line
    assert not out.exists()


@pytest.mark.parametrize("content", [None, "{not json"], ids=["missing", "corrupt"])
def test_compare_without_metrics(tmp_path, run_cli, finished_run, content):
    other = tmp_path / "unfinished"
    other.mkdir()
    shutil.copy(finished_run / "config.yaml", other / "config.yaml")
    if content is not None:
        (other / "metrics.json").write_text(content)
    code, out, err = run_cli(["compare", finished_run, other])
    message = f"no metrics.json in {other}: the run did not finish; finish it with detoxrl train" if content is None \
        else f"cannot read {other / 'metrics.json'}: Expecting property name"
    assert_one_error(code, err, message)
    assert out == ""


def test_compare_refuses_what_is_not_a_run(tmp_path, run_cli, finished_run):
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = run_cli(["compare", finished_run, tmp_path])
    assert_one_error(code, err, f"{tmp_path} is not a detoxrl run directory")
    assert out == ""


def evaluate_tiny(run_cli, run: Path, classifier: Path, *flags) -> Path:
    code, _, err = run_cli(["evaluate", run, "--evaluators", classifier, "--max_prompts", "2",
                            "--samples_per_prompt", "1", *flags])
    assert code == 0, err
    return run


def test_evaluate_refuses_to_replace_an_evaluation(tmp_path, run_cli, finished_run, tiny_classifier):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    evaluate_tiny(run_cli, run, tiny_classifier)
    before = tree(run / "eval")
    code, _, err = run_cli(["evaluate", run, "--evaluators", tiny_classifier, "--max_prompts", "3"])
    assert_one_error(code, err, f"{run / 'eval'} already holds an evaluation; pass --output_dir DIR to keep both, "
                                "or --overwrite to replace it")
    assert tree(run / "eval") == before
    evaluate_tiny(run_cli, run, tiny_classifier, "--max_prompts", "3", "--output_dir", tmp_path / "three")
    evaluate_tiny(run_cli, run, tiny_classifier, "--max_prompts", "3", "--overwrite")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["evaluation"]["protocol"]["prompts"] == 3 == metrics["evaluation"]["num_prompts"]
    assert metrics["run"]["output_dir"] == str(run.resolve())  # where the run is, not where it was trained


def test_compare_refuses_different_protocols(tmp_path, run_cli, finished_run, tiny_classifier):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        shutil.copytree(finished_run, run)
    evaluate_tiny(run_cli, a, tiny_classifier)
    evaluate_tiny(run_cli, b, tiny_classifier)
    code, out, err = run_cli(["compare", a, b])
    assert code == 0 and "toxicity" in out, err
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"dialogue": f"#Person1#: you fool {i}. #Person2#: calm down."}) + "\n"
                            for i in range(2)))
    evaluate_tiny(run_cli, b, tiny_classifier, "--dataset", data, "--overwrite")
    code, out, err = run_cli(["compare", a, b])
    assert_one_error(code, err, "the two evaluations differ in dataset (detoxrl:heated_dialogsum (test split",
                     f"vs {data.resolve()})", "evaluate both runs the same way")
    assert out == ""


@pytest.mark.parametrize("case", ["missing", "empty", "no-column"])
def test_evaluate_checks_its_dataset_before_loading_models(tmp_path, run_cli, finished_run, monkeypatch, case):
    import detoxrl.evaluation.evaluate as evaluate
    import detoxrl.policy

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the dataset was checked")

    monkeypatch.setattr(detoxrl.policy, "load_policy", never)
    monkeypatch.setattr(evaluate, "held_out_evaluator", never)
    data = tmp_path / "mine.csv"
    if case != "missing":
        data.write_text("" if case == "empty" else "text\nhello\n")
    message = {"missing": f"dataset file not found: {data}", "empty": f"dataset file {data} is empty",
               "no-column": f"dataset {data} has no column 'dialogue'"}[case]
    code, _, err = run_cli(["evaluate", finished_run, "--dataset", data, "--output_dir", tmp_path / "eval"])
    assert_one_error(code, err, message)
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_a_bad_dataset_before_the_model_code_is_imported(tmp_path, finished_run):
    """Bad input costs a couple of seconds (datasets), not the seconds of importing peft and the models' code."""
    code = ("import sys\nfrom detoxrl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
            "    print(exc.code, 'peft' in sys.modules or 'detoxrl.policy' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, "evaluate", str(finished_run), "--dataset",
                           str(tmp_path / "missing.csv")], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert_one_error(2, done.stderr, f"dataset file not found: {tmp_path / 'missing.csv'}")


# ----------------------------------------------------------------------------------------------- faults


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_the_adapter(tmp_path, tiny_t5, tiny_classifier, run_cli, monkeypatch):
    from detoxrl.policy import Policy

    monkeypatch.setattr(Policy, "save_pretrained", no_space)
    out = tmp_path / "run"
    config = settings(tmp_path, tiny_t5, tiny_classifier)
    train_and_expect(tmp_path, run_cli, config, f"could not save the adapter to {out / 'adapter'}: "
                     "No space left on device")


def test_disk_full_while_checkpointing(tmp_path, tiny_t5, tiny_classifier, run_cli, monkeypatch):
    """The second checkpoint fails: the first one survives, nothing looks finished, the run can resume."""
    import detoxrl.rl.checkpoint as checkpoint

    real_save_file = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "step-0000002" in str(path):
            no_space()
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "config.yaml", settings(tmp_path, tiny_t5, tiny_classifier,
                                                          **{"rl.steps": 3, "save_steps": 1}))
    code, _, err = run_cli(["train", "--config", path])
    assert_one_error(code, err, f"could not write checkpoint {out / 'checkpoints' / 'step-0000002'}: "
                     "No space left on device (earlier checkpoints are kept)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]  # no half-written copy
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()


@pytest.mark.parametrize("at_step", [0, 1], ids=["before-any-checkpoint", "after-a-checkpoint"])
def test_ctrl_c(tmp_path, tiny_t5, tiny_classifier, run_cli, monkeypatch, at_step):
    from detoxrl.rl.trainer import RLTrainer

    real_step = RLTrainer.step

    def step(self, *args, **kwargs):
        if self.step_count == at_step:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(RLTrainer, "step", step)
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "config.yaml", settings(tmp_path, tiny_t5, tiny_classifier,
                                                          **{"rl.steps": 2, "save_steps": 1}))
    code, _, err = run_cli(["train", "--config", path])
    assert_one_error(code, err, "--resume", prefix=INTERRUPTED, exit_code=130)
    if at_step == 0:
        assert not out.exists()  # nothing worth keeping
        return
    assert (out / "checkpoints" / "step-0000001" / "state.json").is_file()
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    monkeypatch.undo()  # the interruption is over: --resume finishes the run
    code, _, err = run_cli(["train", "--output_dir", out, "--resume"])
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "metrics.json").is_file()


def test_a_half_deleted_checkpoint_is_removed_by_the_next_rotation(tmp_path, run_cli, finished_run):
    """A kill during rotation can leave an old checkpoint without its marker; it is no checkpoint, and the next
    save deletes it instead of keeping it forever."""
    run = unfinished_copy(finished_run, tmp_path)
    leftover = run / "checkpoints" / "step-0000000"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"half deleted")
    code, _, err = run_cli(["train", "--output_dir", run, "--resume", "--rl.steps", "3", "--resume_with_changes"])
    assert code == 0, err
    assert not leftover.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]


def test_resume_refuses_settings_that_change_the_result(tmp_path, run_cli, finished_run):
    run = unfinished_copy(finished_run, tmp_path)
    before = tree(run)
    code, _, err = run_cli(["train", "--output_dir", run, "--resume", "--rl.learning_rate", "0.5", "--seed", "3"])
    assert_one_error(code, err, "--resume would change settings that decide the result: rl.learning_rate (",
                     "-> 0.5), seed (0 -> 3)", "add --resume_with_changes to continue anyway")
    assert tree(run) == before  # nothing written
    code, _, err = run_cli(["train", "--output_dir", run, "--resume", "--resume_with_changes", "--seed", "3",
                            "--save_steps", "0"])
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["run"]["resumed_with_changes"] == [{"seed": [0, 3]}]
    assert [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()] == \
        [{"changed": {"seed": [0, 3]}}]


def test_resume_may_change_how_a_run_reports(tmp_path, run_cli, finished_run):
    run = unfinished_copy(finished_run, tmp_path)
    code, _, err = run_cli(["train", "--output_dir", run, "--resume", "--save_steps", "0", "--threads", "2"])
    assert code == 0, err
    assert not (run / "resumes.jsonl").exists()
    assert json.loads((run / "metrics.json").read_text())["run"]["resumed_with_changes"] == []


def test_interrupted_evaluation_resumes_without_retraining(tmp_path, tiny_t5, tiny_classifier, run_cli, monkeypatch):
    """Ctrl-C during the end-of-training evaluation keeps the adapter; --resume then runs only the evaluation."""
    import detoxrl.evaluation.evaluate as evaluate
    from detoxrl.rl.trainer import RLTrainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_policy", interrupted)
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "config.yaml", settings(tmp_path, tiny_t5, tiny_classifier, **{
        "rl.steps": 2, "eval.enabled": True, "eval.evaluators": [str(tiny_classifier)], "eval.max_prompts": 2}))
    code, _, err = run_cli(["train", "--config", path])
    assert_one_error(code, err, "--resume", prefix=INTERRUPTED, exit_code=130)
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "metrics.json").exists()
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    monkeypatch.undo()

    def no_training(self, *args, **kwargs):
        raise AssertionError("a resumed run whose training had finished trained again")

    monkeypatch.setattr(RLTrainer, "step", no_training)
    code, stdout, err = run_cli(["train", "--output_dir", out, "--resume"])
    assert code == 0, err
    assert "adapter, metrics and report" in stdout and (out / "report.html").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["steps"] == 2 and metrics["train"]["step"] == 2 and "evaluation" in metrics
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def train_process(config: Path, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "detoxrl.cli", "train", "--config", str(config)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), **popen)


def signal_once_written(process: subprocess.Popen, marker: Path, signum: int) -> tuple[str, str]:
    """Send ``signum`` once ``marker`` exists (the run got that far); return the process's stdout and stderr."""
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        process.send_signal(signum)
        return process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()


def test_ctrl_c_in_a_real_process(tmp_path, tiny_t5, tiny_classifier):
    """A real SIGINT, as from Ctrl-C in a terminal, once the first checkpoint is on disk."""
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"rl.steps": 100000, "save_steps": 1})
    path = write_yaml(tmp_path / "config.yaml", config)
    out = tmp_path / "run"
    # a shell without job control starts background jobs with SIGINT ignored
    process = train_process(path, tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stdout, stderr = signal_once_written(process, out / "checkpoints" / "step-0000001" / "state.json", signal.SIGINT)
    assert_one_error(process.returncode, stderr, "--resume", prefix=INTERRUPTED, exit_code=130)
    assert stdout == ""
    assert (out / "checkpoints" / "step-0000001" / "state.json").is_file()
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()


def test_sigterm_in_a_real_process(tmp_path, tiny_t5, tiny_classifier):
    """SIGTERM, as from a scheduler or ``timeout``, during training and before any checkpoint: handled like
    Ctrl-C, so the directory is removed and the same command runs again (and is stopped the same way)."""
    config = settings(tmp_path, tiny_t5, tiny_classifier, **{"rl.steps": 100000})
    path = write_yaml(tmp_path / "config.yaml", config)
    out = tmp_path / "run"
    for _ in range(2):
        process = train_process(path, tmp_path)
        stdout, stderr = signal_once_written(process, out / "history.jsonl", signal.SIGTERM)  # after step 1
        assert_one_error(process.returncode, stderr, "--resume", prefix=INTERRUPTED, exit_code=143)
        assert stdout == ""
        assert not out.exists()


def test_evaluate_other_dataset_without_the_group_column(tmp_path, run_cli, finished_run, caplog):
    """A run grouped by a column of its own data is judged as a whole on a dataset that lacks it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = load_run_config(run / "config.yaml", {"eval.group_column": "heated", "eval.toxicity_group": "True",
                                                    "eval.control_prompts": 1, "eval.max_prompts": 2})
    config.save(run / "config.yaml")
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps({"dialogue": f"#Person1#: thanks for the help with item {i}, I owe you one."})
                            + "\n" for i in range(3)))
    code, _, err = run_cli(["evaluate", run, "--dataset", data])
    assert code == 0, err
    assert "has no column 'heated'" in caplog.text and "without groups" in caplog.text
    evaluation = json.loads((run / "eval" / "metrics.json").read_text())["evaluation"]
    assert evaluation["num_prompts"] == 2 and "toxicity_group" not in evaluation and "groups" not in evaluation
