"""detoxrl: ``detoxrl.policy.load_policy`` + ``detoxrl.rl.trainer.RLTrainer.step(prompts)``.

The model directory is loaded by path through detoxrl's own loading code; LoRA (r, alpha,
dropout, targets), generation (min = max = response tokens, pure sampling), batch and
mini-batch sizes and the learning rate are set through detoxrl's configuration. The reward
is the shared stand-in, given to the trainer as a ``Scorer``. Phases are the trainer's own
``time/*`` statistics.

``--device``, ``--dtype`` (model.dtype), ``--recompute-prompts`` (model.recompute_prompts) and
``--algorithm`` (rloo samples 2 responses per prompt, so an iteration has half as many distinct
prompts) are for runs of detoxrl alone, e.g. on a GPU; the comparison with TRL uses the defaults
(cpu, float32, ppo, no recompute).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import _common as common  # noqa: E402


def options(parser) -> None:
    parser.add_argument("--device", default="cpu", help="the device setting (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", help="model.dtype")
    parser.add_argument("--algorithm", default="ppo", choices=["ppo", "rloo"])
    parser.add_argument("--recompute-prompts", action="store_true",
                        help="model.recompute_prompts: the update recomputes the prompts' layer activations")
    parser.add_argument("--count-flops", action="store_true",
                        help="count the floating-point operations of the first (untimed) warm-up iteration: "
                             "torch's FlopCounterMode, matrix products forward and backward (CPU fused "
                             "attention is not counted)")


def main() -> None:
    args = common.side_arguments(__doc__.splitlines()[0], options)
    if args.count_flops and args.warmup < 1:
        raise SystemExit("--count-flops counts the first warm-up iteration: give --warmup 1 or more")
    common.setup_process(args.threads)
    s = common.setting(args.setting, args.quick)

    import numpy as np
    from detoxrl.config import build_config
    from detoxrl.policy import load_policy
    from detoxrl.rl.trainer import RLTrainer
    from detoxrl.rewards import Scorer

    steps = args.warmup + args.iterations
    k = 2 if args.algorithm == "rloo" else 1
    config = build_config(
        overrides={
            "model.name_or_path": os.path.abspath(args.model_dir),
            "model.lora_r": common.LORA["r"],
            "model.lora_alpha": common.LORA["lora_alpha"],
            "model.lora_dropout": common.LORA["lora_dropout"],
            "model.target_modules": s.lora_targets,
            "model.dtype": args.dtype,
            "model.recompute_prompts": args.recompute_prompts,
            "generation.min_new_tokens": s.response_tokens,
            "generation.max_new_tokens": s.response_tokens,
            "generation.top_k": 0,
            "generation.top_p": 1.0,
            "generation.temperature": 1.0,
            "data.max_prompt_tokens": max(512, s.prompt_tokens),
            "rl.algorithm": args.algorithm,
            "rl.samples_per_prompt": k,
            "rl.steps": steps,
            "rl.batch_size": s.batch_size,
            "rl.mini_batch_size": s.mini_batch_size,
            "rl.update_epochs": 1,
            "rl.gradient_accumulation_steps": 1,
            "rl.learning_rate": common.LEARNING_RATE,
            "device": args.device,
            "mixed_precision": "no",
            "report_to": ["none"],
            "seed": common.SEED,
            "threads": args.threads,
        }
    )

    step_index = {"value": 0}

    class StandInScorer(Scorer):
        name = "stand-in"

        def rewards(self, texts: list[str]) -> np.ndarray:
            return np.asarray(common.stand_in_rewards(len(texts), step_index["value"]), dtype=np.float32)

    policy = load_policy(config.model, device=args.device)
    peak_after_load = common.peak_rss_mb()
    all_prompts = [p for i in range(-args.warmup, args.iterations) for p in common.prompt_texts(s, i)]
    trainer = RLTrainer(config, policy, StandInScorer(), all_prompts)

    def iteration(step: int) -> dict[str, float]:
        step_index["value"] = step
        prompts = common.prompt_texts(s, step, s.batch_size // k)  # each once: step() samples k responses to each
        t0 = time.perf_counter()
        stats = trainer.step(prompts)
        wall = time.perf_counter() - t0
        lengths = stats.get("env/response_length_mean")
        if lengths is not None and abs(lengths - s.response_tokens) > 0.5:
            raise SystemExit(f"mean response length {lengths}, expected {s.response_tokens}")
        return {
            "generation_s": stats.get("time/generation"),
            "reward_s": stats.get("time/reward"),
            "reference_s": stats.get("time/reference"),
            "optimisation_s": stats.get("time/optimisation"),
            "total_s": stats.get("time/total", wall),
            "step_wall_s": wall,
        }

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False) if args.count_flops else None
    for w in range(args.warmup):
        with counter if counter and w == 0 else contextlib.nullcontext():
            iteration(-1 - w)
    peak_after_warmup = common.peak_rss_mb()
    results = [iteration(i) for i in range(args.iterations)]
    # Where the peak lies: loading, then the first (warm-up) iteration, then the timed ones.
    extra = {"device": args.device, "dtype": args.dtype, "algorithm": args.algorithm,
             "recompute_prompts": args.recompute_prompts,
             "peak_rss_after_load_mb": round(peak_after_load, 1),
             "peak_rss_after_warmup_mb": round(peak_after_warmup, 1)}
    if counter:
        extra["warmup_iteration_flops"] = counter.get_total_flops()
    if args.device.startswith("cuda"):
        import torch

        extra["gpu"] = torch.cuda.get_device_name()
        extra["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    common.report(args.side_name or "detoxrl", s, results, extra)


if __name__ == "__main__":
    main()
