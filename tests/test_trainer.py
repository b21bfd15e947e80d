"""The shared training loop: statistics, schedules, external rollouts, resume, and the algorithms' settings."""

import json
import math
import subprocess
import sys

import pytest
import torch
from tiny import ThanksShare, subprocess_env, tiny_run_config, tiny_run_settings, write_yaml

from detoxrl.errors import DetoxError
from detoxrl.policy import load_policy
from detoxrl.rl.trainer import RLTrainer

PROMPTS = ["the person1 said thanks about work", "the meeting is good", "a car and a home", "school talk"]


def make_trainer(model, tmp_path, references=None, **dotted) -> RLTrainer:
    torch.manual_seed(0)  # the fresh LoRA's initialisation, as train() seeds it
    config = tiny_run_config(model, tmp_path, **{"rl.batch_size": 8, "rl.mini_batch_size": 4,
                                                 "generation.max_new_tokens": 5, **dotted})
    return RLTrainer(config, load_policy(config.model), ThanksShare(), PROMPTS, references=references)


def test_entropy_is_finite_with_min_new_tokens(tiny_t5, tmp_path):
    trainer = make_trainer(tiny_t5, tmp_path, **{"generation.min_new_tokens": 2})
    stats = trainer.step(trainer.batch_prompts(0))
    assert math.isfinite(stats["objective/entropy"]) and stats["objective/entropy"] > 0


def test_python_api_trainer_accumulates_gradients_and_follows_the_schedule(tiny_llama, tmp_path):
    # 8 rollouts, optimiser steps of 4 made of 2 accumulated micro-batches of 2: 2 optimiser steps per step.
    trainer = make_trainer(tiny_llama, tmp_path, **{"rl.gradient_accumulation_steps": 2, "rl.steps": 2,
                                                    "rl.lr_scheduler": "linear", "rl.learning_rate": 0.01})
    assert trainer.accelerator.gradient_accumulation_steps == 2
    rates = [s["learning_rate"] for s in trainer.train()]
    # 4 optimiser steps planned in all: the linear schedule is at 1/2 after step 1 and at 0 after step 2.
    assert rates == pytest.approx([0.005, 0.0])


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_resume_from_a_checkpoint_continues_exactly(algorithm, tiny_t5, tmp_path):
    settings = {"rl.algorithm": algorithm, "rl.samples_per_prompt": 1 if algorithm == "ppo" else 2,
                "rl.steps": 4, "rl.learning_rate": 0.01, "save_total_limit": 1}
    straight = make_trainer(tiny_t5, tmp_path / "a", **settings)
    straight.train()

    first = make_trainer(tiny_t5, tmp_path / "b", **settings)
    for _ in range(2):
        first.history.append(first.step(first.batch_prompts(first.step_count)))
    saved = first.save_checkpoint()
    resumed = make_trainer(tiny_t5, tmp_path / "b", **settings)
    resumed.load_checkpoint(saved)
    resumed.train()

    assert resumed.step_count == 4 and [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    expected = dict(straight.policy.module.named_parameters())
    for name, param in resumed.policy.module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, expected[name], atol=0, rtol=0)
    assert json.loads((saved / "state.json").read_text())["algorithm"] == algorithm


def test_step_takes_external_responses_and_rewards(tiny_t5, tmp_path):
    """The recipe's ppo_trainer.step(query, response, reward), with responses and rewards made elsewhere."""
    trainer = make_trainer(tiny_t5, tmp_path, **{"rl.algorithm": "rloo", "rl.samples_per_prompt": 2,
                                                 "rl.batch_size": 4, "rl.mini_batch_size": 4, "rl.learning_rate": 0.05})
    prompts = ["school talk", "school talk", "the meeting is good", "the meeting is good"]
    responses = ["thanks thanks", "the car", "thanks", "a home"]
    stats = trainer.step(prompts, responses, rewards=[1.0, 0.0, 1.0, 0.0])
    assert stats["env/reward_mean"] == pytest.approx(0.5)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts as a no-op
    with pytest.raises(DetoxError, match="rewards must be 4 finite numbers"):
        trainer.step(prompts, responses, rewards=[1.0, 0.0, float("nan"), 0.0])
    with pytest.raises(DetoxError, match="whole groups"):
        trainer.step(prompts[:3], responses[:3], rewards=[1.0, 0.0, 1.0])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rl.algorithm": "a2c"}, "rl.algorithm must be one of ppo, rloo, grpo, got 'a2c'"),
        ({"rl.algorithm": "rloo", "rl.samples_per_prompt": 1}, "rl.samples_per_prompt must be at least 2, got 1"),
        ({"rl.algorithm": "grpo", "rl.samples_per_prompt": 3, "rl.batch_size": 8},
         "rl.batch_size (8) must be divisible by rl.samples_per_prompt (3)"),
        ({"rl.algorithm": "rloo", "rl.samples_per_prompt": 2, "rl.vf_coef": 0.5},
         "rl.vf_coef configures the value head, which rl.algorithm rloo does not have"),
        ({"rl.loss_normalization": "per-word"}, "rl.loss_normalization must be token or sequence"),
        ({"reward.novelty_weight": -1.0}, "reward.novelty_weight must be 0 or more, got -1.0"),
    ],
    ids=["unknown-algorithm", "k-below-2", "batch-not-divisible-by-k", "value-head-setting", "normalization",
         "negative-novelty-weight"],
)
def test_bad_algorithm_settings_are_one_line_errors(settings, message, tiny_t5, tmp_path, run_cli):
    config = write_yaml(tmp_path / "config.yaml", tiny_run_settings(tiny_t5, tmp_path / "run", **settings))
    code, _, err = run_cli(["train", "--config", config])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.slow
def test_two_process_rloo_matches_one_process_and_its_schedule(tiny_t5, tmp_path):
    """k responses of a prompt stay on one process; the learning rate follows the same schedule on 2 processes."""
    settings = tiny_run_settings(
        tiny_t5, tmp_path / "unused", **{"threads": None, "generation.max_new_tokens": 5, "data.max_prompt_tokens": 32,
                                         "rl": {"algorithm": "rloo", "samples_per_prompt": 2, "steps": 3,
                                                "batch_size": 8, "mini_batch_size": 8, "learning_rate": 0.01,
                                                "lr_scheduler": "linear"},
                                         "reward.novelty_weight": 1.0})
    config = write_yaml(tmp_path / "config.yaml", settings)
    histories = {}  # the novelty term compares responses across processes: it must score as on one process
    for name, processes in (("one", 1), ("two", 2)):
        launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
                    if processes > 1 else [sys.executable])
        done = subprocess.run(launcher + ["-m", "detoxrl.cli", "train", "--config", str(config), "--output_dir",
                                          str(tmp_path / name)],
                              cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        histories[name] = [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
    for one, two in zip(histories["one"], histories["two"]):
        assert two["learning_rate"] == pytest.approx(one["learning_rate"], rel=1e-9)
        assert two["env/reward_mean"] == pytest.approx(one["env/reward_mean"], abs=1e-6)
        assert two["objective/kl"] == pytest.approx(one["objective/kl"], abs=1e-4)
        assert two["env/novelty_mean"] == pytest.approx(one["env/novelty_mean"], abs=1e-6)
    assert histories["one"][-1]["learning_rate"] == 0.0


def test_novelty_weight_adds_bigram_novelty_across_prompts(tiny_t5, tmp_path):
    trainer = make_trainer(tiny_t5, tmp_path, **{"reward.novelty_weight": 2.0, "rl.batch_size": 2,
                                                 "rl.mini_batch_size": 2})
    stats = trainer.step(["school talk", "the meeting is good"], ["thanks a lot", "thanks a bunch of cars"])
    # ThanksShare: 1/3 and 1/5; "thanks a" is shared by the two prompts: novelty 1/2 and 3/4.
    assert stats["env/novelty_mean"] == pytest.approx(0.625)
    assert stats["env/reward_mean"] == pytest.approx((1 / 3 + 1 / 5) / 2 + 2.0 * 0.625)


def test_fidelity_weight_adds_rouge_l_against_the_reference(tiny_t5, tmp_path):
    trainer = make_trainer(tiny_t5, tmp_path, references=["thanks"] * len(PROMPTS),
                           **{"reward.fidelity_weight": 2.0, "rl.batch_size": 2, "rl.mini_batch_size": 2})
    prompts, references = ["school talk", "the meeting is good"], ["thanks a lot", "the car"]
    stats = trainer.step(prompts, ["thanks", "the car"], references=references)
    # ThanksShare gives 1 and 0; ROUGE-L F1: "thanks" vs "thanks a lot" = 2*(1*1/3)/(1+1/3) = 0.5; exact match = 1.
    assert stats["env/scorer_reward_mean"] == pytest.approx(0.5)
    assert stats["env/fidelity_mean"] == pytest.approx(0.75)
    assert stats["env/reward_mean"] == pytest.approx(0.5 + 2.0 * 0.75)
    with pytest.raises(DetoxError, match="fidelity_weight needs the reference response of every training prompt"):
        RLTrainer(trainer.config, trainer.policy, ThanksShare(), PROMPTS)


def test_learning_curve_points_are_written_to_the_history(tiny_t5, tmp_path, run_cli):
    settings = tiny_run_settings(tiny_t5, tmp_path / "run", **{"rl.steps": 2, "eval.curve_steps": 1,
                                                                 "eval.curve_prompts": 3, "eval.curve_samples": 2,
                                                                 "eval.evaluators": ["profanity-check"]})
    code, _, err = run_cli(["train", "--config", write_yaml(tmp_path / "config.yaml", settings)])
    assert code == 0, err
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    for row in history:
        assert 0.0 <= row["eval/toxicity_probability"] <= 1.0
        assert 0.0 <= row["eval/expected_max_toxicity"] <= 1.0
