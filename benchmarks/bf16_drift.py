#!/usr/bin/env python3
"""How far bf16 base weights move the log-probabilities, at the benchmark's full settings.

For one batch of sampled responses it prints, as one JSON line: the largest and mean |difference| between
the log-probs recorded during generation (KV cache) and a teacher-forced pass of the same model, per
model.dtype; and between the float32 and the bfloat16 model's teacher-forced log-probs of the same tokens.

    python benchmarks/bf16_drift.py --setting causal --model-dir DIR --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "sides"))
import _common as common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["seq2seq", "causal"], required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    s = common.setting(args.setting, args.quick)

    import torch
    from detoxrl.config import build_config
    from detoxrl.policy import forward_response, load_policy
    from detoxrl.rl.logprobs import score_tokens
    from detoxrl.rl.rollout import generate, sample_seeds

    prompts = common.prompt_texts(s, 0)
    result, forced = {"setting": s.name, "device": args.device}, {}
    tokens = None
    for dtype in ("float32", "bfloat16"):
        config = build_config(overrides={
            "model.name_or_path": str(Path(args.model_dir).resolve()), "model.dtype": dtype,
            "model.target_modules": s.lora_targets, "generation.min_new_tokens": s.response_tokens,
            "generation.max_new_tokens": s.response_tokens, "data.max_prompt_tokens": max(512, s.prompt_tokens),
        })
        policy = load_policy(config.model, device=args.device)
        policy.module.to(args.device)
        if tokens is None:
            tokens = generate(policy, policy.model, prompts, config.generation, config.data.max_prompt_tokens,
                              sample_seeds(0, 0, count=len(prompts)))
        batch = generate(policy, policy.model, prompts, config.generation, config.data.max_prompt_tokens,
                         sample_seeds(0, 0, count=len(prompts)))
        with torch.no_grad():
            for name, rollout in (("own", batch), ("shared", tokens)):
                out = forward_response(policy.model, rollout.query_ids, rollout.query_mask, rollout.response_ids)
                forced[dtype, name] = score_tokens(out.hidden, out.head, rollout.response_ids, rollout.mask, 1.0,
                                                   s.response_tokens, policy.eos_token_ids).logprobs
        diff = (batch.logprobs - forced[dtype, "own"]).abs()[batch.mask.bool()]
        result[f"{dtype}_generation_vs_forced_max"] = float(diff.max())
        result[f"{dtype}_generation_vs_forced_mean"] = float(diff.mean())
        del policy
    diff = (forced["float32", "shared"] - forced["bfloat16", "shared"]).abs()[tokens.mask.bool()]
    result["float32_vs_bfloat16_max"] = float(diff.max())
    result["float32_vs_bfloat16_mean"] = float(diff.mean())
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()
