"""The Python API: lazy top-level names, and the notebook flow (build, step in a loop, evaluate)."""

import json
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from tiny import ThanksShare, tiny_run_settings

import detoxrl


def test_import_is_light_and_names_the_version():
    probe = "import sys, detoxrl; print(detoxrl.__version__, 'torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [metadata.version("detoxrl"), "False", "False"]


def test_public_names_are_the_functions_even_after_their_modules_load():
    import detoxrl.sft  # noqa: F401  (records the module on the package: the name must stay the function)
    import detoxrl.train  # noqa: F401
    from detoxrl.evaluation.command import evaluate_run
    from detoxrl.sft import sft
    from detoxrl.train import train

    assert detoxrl.train is train and detoxrl.sft is sft and detoxrl.evaluate is evaluate_run
    for name in detoxrl.__all__:
        assert getattr(detoxrl, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        detoxrl.nope


def test_notebook_flow_build_step_evaluate(tiny_t5, tmp_path):
    """As in the recipe's notebook: a trainer, a loop over batches calling step, then an evaluation."""
    run = tmp_path / "notebook"
    config = detoxrl.build_config(overrides=tiny_run_settings(tiny_t5, run, **{
        "rl.batch_size": 2, "rl.mini_batch_size": 2, "eval.max_prompts": 4, "eval.evaluators": ["profanity-check"]}))
    policy = detoxrl.load_policy(config.model)
    train_rows, test_rows = detoxrl.build_splits(config.data)
    prompts = list(train_rows["prompt"])
    trainer = detoxrl.RLTrainer(config, policy, ThanksShare(), prompts)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}

    history = [trainer.step(prompts[i : i + 2]) for i in range(0, 4, 2)]  # the policy samples, the scorer rewards
    assert [h["step"] for h in history] == [1, 2]
    # Responses and rewards computed elsewhere, as the recipe's ppo_trainer.step(query, response, reward).
    stats = trainer.step(prompts[:2], responses=["thanks please", "the car"], rewards=[1.0, 0.25])
    assert stats["env/reward_mean"] == pytest.approx(0.625)
    assert any(not torch.equal(p, before[n]) for n, p in policy.model.named_parameters() if p.requires_grad)

    # Save the way a run does, then evaluate it like `detoxrl evaluate RUN`.
    run.mkdir()
    config.save(run / "config.yaml")
    policy.save_pretrained(run / "adapter")
    report_dir = detoxrl.evaluate(run, max_prompts=3)
    evaluation = json.loads((report_dir / "metrics.json").read_text())["evaluation"]
    assert evaluation["num_prompts"] == 3 and "profanity-check" in evaluation["evaluators"]
