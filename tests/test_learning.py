"""Each algorithm really learns: a toy reward (share of the word "thanks") rises, for seq2seq and causal."""

import numpy as np
import pytest
import torch
from tiny import ThanksShare, tiny_run_config

from detoxrl.policy import load_policy
from detoxrl.rl.trainer import RLTrainer

PROMPTS = ["the person1 said thanks about work", "the meeting is good", "a car and a home", "school talk"]

SETTINGS = {
    "ppo": {"rl.learning_rate": 1e-2},
    "rloo": {"rl.learning_rate": 1e-2, "rl.samples_per_prompt": 4},
    "grpo": {"rl.learning_rate": 1e-2, "rl.samples_per_prompt": 4},
}


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_reward_rises(model, algorithm, request, tmp_path):
    torch.manual_seed(0)
    config = tiny_run_config(
        request.getfixturevalue(model), tmp_path,
        **{"model.lora_r": 8, "rl.algorithm": algorithm, "rl.steps": 20, "rl.batch_size": 16, "rl.mini_batch_size": 4,
           "rl.init_kl_coef": 0.01, "rl.adaptive_kl": False, "generation.max_new_tokens": 6, **SETTINGS[algorithm]},
    )
    policy = load_policy(config.model)
    trainer = RLTrainer(config, policy, ThanksShare(), PROMPTS)
    assert (policy.module.value_head is not None) == (algorithm == "ppo")  # no critic is built for rloo/grpo
    rewards = [s["env/reward_mean"] for s in trainer.train()]
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > 2 * first + 0.05, rewards
