"""PPO really learns: a toy reward (share of the word "thanks") rises, for seq2seq and causal."""

import numpy as np
import pytest
import torch

from detoxrl.config import build_config
from detoxrl.policy import load_policy
from detoxrl.rl.trainer import RLTrainer
from detoxrl.rewards.base import Scorer

PROMPTS = ["the person1 said thanks about work", "the meeting is good", "a car and a home", "school talk"]


class ThanksShare(Scorer):
    name = "thanks-share"

    def rewards(self, texts):
        return np.array([t.split().count("thanks") / max(1, len(t.split())) for t in texts], dtype=np.float32)


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_reward_rises(model, request):
    torch.manual_seed(0)
    config = build_config(
        overrides={
            "model.name_or_path": str(request.getfixturevalue(model)),
            "model.lora_r": 8,
            "rl.steps": 20,
            "rl.learning_rate": 1e-2,
            "rl.init_kl_coef": 0.01,
            "rl.adaptive_kl": False,
            "generation.max_new_tokens": 6,
            "report_to": [],
            "device": "cpu",
        }
    )
    trainer = RLTrainer(config, load_policy(config.model), ThanksShare(), PROMPTS)
    rewards = [s["env/reward_mean"] for s in trainer.train()]
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > 2 * first + 0.05, rewards
