"""Algorithms are declared once: one registry that validation, the command line and the trainer read, and a
protocol whose extra-rollout hook lets an algorithm sample more than the batch (here ReMax's greedy baseline)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import ThanksShare, subprocess_env, thanks_share, tiny_run_config

from detoxrl.config import build_config
from detoxrl.errors import DetoxError
from detoxrl.policy import load_policy
from detoxrl.rl.algorithms import ALGORITHMS, Algorithm, LossBatch, algorithm_class, refuse_critic_settings, register
from detoxrl.rl.core import aggregate_loss, clipped_surrogate, masked_mean, sequence_kl
from detoxrl.rl.trainer import RLTrainer
from detoxrl.sampling import greedy

PROMPTS = ["the person1 said thanks about work", "the meeting is good", "a car and a home", "school talk"]


class ReMax(Algorithm):
    """ReMax (Li et al. 2024): REINFORCE whose baseline is the reward of the greedy response to the same prompt,
    sampled by the extra-rollout hook; the KL to the reference is in the sequence reward, as in rloo."""

    name = "remax"
    uses_critic = False

    def __init__(self, config):
        super().__init__(config)
        self.greedy: list[tuple[list[str], list[str], torch.Tensor]] = []  # (prompts, responses, rewards) per step

    @classmethod
    def validate(cls, config) -> None:
        refuse_critic_settings(config)

    def extra_rollout(self, trainer, prompts, references, batch) -> None:
        responses = greedy(trainer.policy, trainer.policy.model, prompts, trainer.config)
        rewards, _ = trainer.score(prompts, responses, references)
        self.greedy.append((prompts, responses, rewards))

    def advantages(self, batch, kl_coef, reduce):
        baseline = self.greedy[-1][2].to(batch.mask.device).repeat_interleave(self.config.samples_per_prompt)
        rewards = batch.scores - kl_coef * sequence_kl(batch.logprobs, batch.ref_logprobs, batch.mask)
        stats = {"remax/greedy_reward_mean": float(masked_mean(baseline, reduce=reduce))}
        return (rewards - baseline)[:, None] * batch.mask, None, stats

    def loss(self, batch: LossBatch):
        c, old = self.config, batch.rollout
        per_token, clip_fraction, approx_kl = clipped_surrogate(batch.logprobs, old.logprobs, batch.advantages,
                                                                old.mask, c.cliprange)
        loss = aggregate_loss(per_token, old.mask, c.loss_normalization, batch.divisors[c.loss_normalization])
        return loss, {"loss/policy": loss.detach(), "policy/clipfrac": clip_fraction, "policy/approxkl": approx_kl}


@pytest.fixture
def remax():
    """ReMax in the registry for one test only."""
    register("remax", ReMax)
    yield ReMax
    del ALGORITHMS["remax"]


def test_the_hook_samples_a_greedy_baseline_and_remax_learns(remax, tiny_t5, tmp_path):
    torch.manual_seed(0)
    config = tiny_run_config(
        tiny_t5, tmp_path,
        **{"model.lora_r": 8, "rl.algorithm": "remax", "rl.samples_per_prompt": 4, "rl.steps": 20,
           "rl.batch_size": 16, "rl.mini_batch_size": 4, "rl.learning_rate": 1e-2, "rl.init_kl_coef": 0.01,
           "rl.adaptive_kl": False, "generation.max_new_tokens": 6},
    )
    policy = load_policy(config.model)
    trainer = RLTrainer(config, policy, ThanksShare(), PROMPTS)
    assert isinstance(trainer.algorithm, remax) and policy.module.value_head is None
    history = trainer.train()

    greedy = trainer.algorithm.greedy
    assert len(greedy) == 20  # the hook ran once per step, on the step's 4 prompts, each once
    for step, (prompts, responses, rewards) in enumerate(greedy):
        assert prompts == trainer.batch_prompts(step) and len(responses) == 4
        np.testing.assert_allclose(rewards.numpy(), thanks_share(responses), rtol=1e-6)
        assert history[step]["remax/greedy_reward_mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    rewards = [s["env/reward_mean"] for s in history]
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > 2 * first + 0.05, rewards


def test_validation_the_command_line_and_the_trainer_read_one_registry(remax, run_cli):
    build_config(overrides={"model.name_or_path": "m", "rl.algorithm": "remax"}).validate()  # k = 1 is enough
    bad = build_config(overrides={"model.name_or_path": "m", "rl.algorithm": "remax", "rl.vf_coef": 0.5})
    with pytest.raises(DetoxError, match=r"^rl.vf_coef configures the value head, which rl.algorithm remax does "):
        bad.validate()
    unknown = build_config(overrides={"model.name_or_path": "m", "rl.algorithm": "a2c"})
    with pytest.raises(DetoxError, match=r"^rl.algorithm must be one of ppo, rloo, grpo, remax, got 'a2c'$"):
        unknown.validate()
    code, out, _ = run_cli(["train", "--help"])
    assert code == 0 and "choices: ppo, rloo, grpo, remax" in " ".join(out.split())
    assert algorithm_class("remax") is remax


def test_registering_a_name_twice_is_a_one_line_error():
    before = dict(ALGORITHMS)
    with pytest.raises(DetoxError, match=r"^algorithm 'ppo' is registered twice$"):
        register("ppo", ReMax)
    assert ALGORITHMS == before


def test_a_class_registered_under_another_name_is_refused():
    register("other", ReMax)
    try:
        with pytest.raises(DetoxError, match=r"^algorithm 'other' is registered as a class named 'remax'$"):
            algorithm_class("other")
    finally:
        del ALGORITHMS["other"]


def test_the_built_in_algorithms_load_on_first_use_so_config_and_help_need_no_torch():
    code = ("import sys, detoxrl.cli, detoxrl.config; from detoxrl.rl.algorithms import ALGORITHMS; "
            "assert 'torch' not in sys.modules; print(*ALGORITHMS)")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["ppo", "rloo", "grpo"], done.stderr[-2000:]
    assert all(algorithm_class(name).name == name for name in ("ppo", "rloo", "grpo"))
