"""Baseline: the current TRL's RLOOTrainer (trl 1.16) with a peft LoRA adapter, causal layout.

RLOO needs at least two completions per prompt, so one iteration is batch_size / 2 prompts x
2 completions = batch_size trained samples (each prompt_tokens + response_tokens long), like
one PPO iteration of the other sides. It is split into batch_size / mini_batch_size
optimiser steps of mini_batch_size samples (steps_per_generation), one pass (num_iterations=1),
fp32, no gradient checkpointing, KL to the adapter-disabled base (beta=0.05).

The run is ``trainer.train()`` for (warmup + iterations) generation rounds; a callback times
each round, and wrappers time the phases inside it:

generation_s     ``_generate`` (sampling and decoding the completions)
reward_s         ``_calculate_rewards`` (calls the stand-in reward function)
reference_s      the reference log-prob pass (adapter disabled)
optimisation_s   the rest of the round: the policy's log-prob pass over the rollout, the
                 leave-one-out advantages and the optimiser steps
total_s          the whole round
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
warnings.filterwarnings("ignore")

import _common as common  # noqa: E402

NUM_GENERATIONS = 2


def main() -> None:
    args = common.side_arguments(__doc__.splitlines()[0])
    common.setup_process(args.threads)
    s = common.setting(args.setting, args.quick)
    if s.is_encoder_decoder:
        raise SystemExit("trl-rloo runs the causal setting only (RLOOTrainer trains causal LMs)")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    rounds = args.warmup + args.iterations
    steps_per_round = s.batch_size // s.mini_batch_size
    prompts_per_round = s.batch_size // NUM_GENERATIONS
    prompts = []
    for r in range(rounds):
        prompts += common.prompt_texts(s, r, prompts_per_round)
    dataset = Dataset.from_dict({"prompt": prompts})

    round_index = {"value": 0}

    def stand_in_reward(completions, **kwargs):
        return common.stand_in_rewards(len(completions), round_index["value"])

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=common.LORA["r"],
        lora_alpha=common.LORA["lora_alpha"],
        lora_dropout=common.LORA["lora_dropout"],
        target_modules=s.lora_targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    out_dir = tempfile.mkdtemp(prefix="bench-rloo-")
    config = RLOOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=s.mini_batch_size,
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_round,
        num_generations=NUM_GENERATIONS,
        num_iterations=1,
        max_completion_length=s.response_tokens,
        generation_kwargs={"min_new_tokens": s.response_tokens},
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        learning_rate=common.LEARNING_RATE,
        max_steps=rounds * steps_per_round,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        logging_steps=10**6,
        save_strategy="no",
        disable_tqdm=True,
        seed=common.SEED,
        dataloader_num_workers=0,
        shuffle_dataset=False,
    )

    phases: list[common.Clock] = []
    round_bounds: list[list[float]] = []
    completions_per_round: list[int] = []

    class RoundTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            if state.global_step % steps_per_round == 0:
                round_index["value"] = state.global_step // steps_per_round
                phases.append(common.Clock())
                round_bounds.append([time.perf_counter(), float("nan")])

        def on_step_end(self, args_, state, control, **kw):
            if state.global_step % steps_per_round == 0:
                round_bounds[-1][1] = time.perf_counter()

    trainer = RLOOTrainer(
        model=model,
        reward_funcs=stand_in_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[RoundTimer()],
    )

    # Phase wrappers (instance attributes shadow the methods).
    original_generate = trainer._generate
    original_rewards = trainer._calculate_rewards
    original_score = trainer._generate_and_score_completions
    original_logps = trainer._get_per_token_logps_and_entropies
    rollout_state = {"inside": False, "logp_calls": 0}

    def generate(prompts_):
        t = time.perf_counter()
        out = original_generate(prompts_)
        phases[-1].add("generation_s", time.perf_counter() - t)
        completions_per_round.append(len(out[1]))
        lengths = {len(c) for c in out[1]}
        if lengths != {s.response_tokens}:
            raise SystemExit(f"completions have lengths {sorted(lengths)}, expected {s.response_tokens}")
        return out

    def calculate_rewards(*a, **kw):
        t = time.perf_counter()
        out = original_rewards(*a, **kw)
        phases[-1].add("reward_s", time.perf_counter() - t)
        return out

    def generate_and_score(*a, **kw):
        rollout_state.update(inside=True, logp_calls=0)
        t = time.perf_counter()
        try:
            return original_score(*a, **kw)
        finally:
            rollout_state["inside"] = False
            phases[-1].add("rollout_s", time.perf_counter() - t)

    def logps(*a, **kw):
        t = time.perf_counter()
        out = original_logps(*a, **kw)
        if rollout_state["inside"]:
            rollout_state["logp_calls"] += 1
            name = "policy_rollout_forward_s" if rollout_state["logp_calls"] == 1 else "reference_s"
            phases[-1].add(name, time.perf_counter() - t)
        return out

    trainer._generate = generate
    trainer._calculate_rewards = calculate_rewards
    trainer._generate_and_score_completions = generate_and_score
    trainer._get_per_token_logps_and_entropies = logps

    trainer.train()

    if len(round_bounds) != rounds:
        raise SystemExit(f"expected {rounds} generation rounds, timed {len(round_bounds)}")
    results = []
    for clock, (begin, end) in list(zip(phases, round_bounds))[args.warmup :]:
        p = clock.phases
        total = end - begin
        row = {
            "generation_s": p.get("generation_s", 0.0),
            "reward_s": p.get("reward_s", 0.0),
            "reference_s": p.get("reference_s", 0.0),
            "total_s": total,
            "policy_rollout_forward_s": p.get("policy_rollout_forward_s", 0.0),
        }
        row["optimisation_s"] = total - row["generation_s"] - row["reward_s"] - row["reference_s"]
        results.append(row)
    name = args.side_name or "trl-rloo"
    common.report(
        name, s, results,
        {"num_generations": NUM_GENERATIONS, "completions_per_round": completions_per_round[-1],
         "optimiser_steps_per_round": steps_per_round},
    )


if __name__ == "__main__":
    main()
