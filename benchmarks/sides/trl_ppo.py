"""Baseline: TRL 0.11.4 PPOTrainer + a peft LoRA adapter (the classic PPO recipe).

--generation loop     one ``ppo_trainer.generate(query)`` call per prompt in a Python loop,
                      as the recipe does (``for prompt_tensor in prompt_tensors: ...``)
--generation batched  one ``ppo_trainer.generate(list_of_queries, batch_size=B)`` call

then ``ppo_trainer.step(queries, responses, scores)``. Phases:

generation_s     the generate call(s)
reward_s         the stand-in reward (the same for every side)
reference_s      the reference forward pass inside step() (adapter disabled)
optimisation_s   the rest of step(): the policy's rollout forward pass (log-probs and values),
                 KL-penalised rewards, advantages, the PPO epoch(s) and the statistics
total_s          all of the above
"""

from __future__ import annotations

import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import _common as common  # noqa: E402


def extra_args(parser) -> None:
    parser.add_argument("--generation", choices=["loop", "batched"], required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype the model is loaded in")


def main() -> None:
    args = common.side_arguments(__doc__.splitlines()[0], extra_args)
    common.setup_process(args.threads)
    s = common.setting(args.setting, args.quick)

    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import (
        AutoModelForCausalLMWithValueHead,
        AutoModelForSeq2SeqLMWithValueHead,
        PPOConfig,
        PPOTrainer,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    lora = LoraConfig(
        r=common.LORA["r"],
        lora_alpha=common.LORA["lora_alpha"],
        lora_dropout=common.LORA["lora_dropout"],
        target_modules=s.lora_targets,
        bias="none",
        task_type="SEQ_2_SEQ_LM" if s.is_encoder_decoder else "CAUSAL_LM",
    )
    auto = AutoModelForSeq2SeqLMWithValueHead if s.is_encoder_decoder else AutoModelForCausalLMWithValueHead
    model = auto.from_pretrained(args.model_dir, peft_config=lora, torch_dtype=getattr(torch, args.dtype))
    config = PPOConfig(
        model_name=args.model_dir,
        learning_rate=common.LEARNING_RATE,
        batch_size=s.batch_size,
        mini_batch_size=s.mini_batch_size,
        gradient_accumulation_steps=1,
        ppo_epochs=1,
        seed=common.SEED,
        log_with=None,
    )
    # ref_model=None with a peft model: the reference is the base with the adapter disabled.
    trainer = PPOTrainer(config=config, model=model, ref_model=None, tokenizer=tokenizer)
    generation_kwargs = {
        "min_new_tokens": s.response_tokens,
        "max_new_tokens": s.response_tokens,
        "do_sample": True,
        "top_k": 0,
        "top_p": 1.0,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }

    # Time the reference pass (the second batched_forward_pass of step(), run under
    # optional_peft_ctx) and the policy's rollout forward (the first one).
    forward_times: list[float] = []
    original_forward = trainer.batched_forward_pass

    def timed_forward(*a, **kw):
        t = time.perf_counter()
        out = original_forward(*a, **kw)
        forward_times.append(time.perf_counter() - t)
        return out

    trainer.batched_forward_pass = timed_forward

    def iteration(step: int) -> dict[str, float]:
        queries = list(common.prompt_ids(s, step))
        t0 = time.perf_counter()
        if args.generation == "loop":
            responses = []
            for query in queries:
                response = trainer.generate(query, return_prompt=False, **generation_kwargs)
                responses.append(response.squeeze())
        else:
            responses = trainer.generate(queries, batch_size=s.batch_size, return_prompt=False, **generation_kwargs)
        t1 = time.perf_counter()
        scores = [torch.tensor(r) for r in common.stand_in_rewards(len(responses), step)]
        t2 = time.perf_counter()
        forward_times.clear()
        stats = trainer.step(queries, responses, scores)
        t3 = time.perf_counter()
        expected = s.response_tokens + (1 if s.is_encoder_decoder else 0)  # T5 keeps the decoder start token
        lengths = {int(r.shape[-1]) for r in responses}
        if lengths != {expected}:
            raise SystemExit(f"responses have lengths {sorted(lengths)}, expected {expected}")
        reference = forward_times[1] if len(forward_times) > 1 else float("nan")
        step_s = t3 - t2
        return {
            "generation_s": t1 - t0,
            "reward_s": t2 - t1,
            "reference_s": reference,
            "optimisation_s": step_s - reference,
            "total_s": t3 - t0,
            "step_s": step_s,
            "policy_rollout_forward_s": forward_times[0],
            "ppo_update_s": float(stats["time/ppo/optimize_step"]),
        }

    for w in range(args.warmup):
        iteration(-1 - w)
    results = [iteration(i) for i in range(args.iterations)]
    name = args.side_name or f"trl-ppo-{args.generation}"
    common.report(name, s, results, {"generation_mode": args.generation})


if __name__ == "__main__":
    main()
