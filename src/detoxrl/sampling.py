"""Sampling, one service for train, sft, generate and evaluation.

The seeded sampler itself is :func:`detoxrl.rl.rollout.generate` (one seed per response, so a
response does not depend on the batch it is in; prompts shared across their k samples; log-probs
from the distribution that sampled). Here: the modes it runs in (no dropout; LoRA folded into fp32
base weights for speed), batching, the seed streams that keep each command's samples apart, and
greedy decoding.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .policy import Policy
from .rl.rollout import Rollout, generate, hf_generation_config

# Seed streams: training uses its step number, so these keep evaluation's and generate's samples apart.
EVAL_STREAM = 1_000_003
GENERATE_STREAM = 2_000_003


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode (no dropout) for the duration; its previous mode is restored on exit."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@contextlib.contextmanager
def inference_weights(policy: Policy):
    """The policy in eval mode with its LoRA folded into the base weights, unfolded on exit.

    An unmerged LoRA adds two small matmuls per adapted layer and step; merged, sampling costs
    what the base model costs. Unmerging subtracts the same update again, so the base weights
    come back up to float rounding.
    """
    with eval_mode(policy.module):
        if any(p.dtype != torch.float32 for p in policy.model.parameters() if not p.requires_grad):
            yield policy.model  # folding an fp32 LoRA into bf16/fp16 base weights would round it away
            return
        policy.model.merge_adapter()
        try:
            yield policy.model
        finally:
            policy.model.unmerge_adapter()


def keyed_seeds(seed: int, stream: int, prompts: list[str], samples: int) -> list[int]:
    """One seed per (prompt, sample index), prompt-major: sample j of a prompt is the same draw whatever the
    number of samples, the batch size, the prompts' order or the processes, so evaluations nest."""
    def prompt_id(prompt: str) -> int:
        return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")

    return [int(np.random.SeedSequence([seed, stream, prompt_id(p), j]).generate_state(1)[0])
            for p in prompts for j in range(samples)]


def sample(policy: Policy, model: torch.nn.Module, prompts: list[str], config: Config, samples: int,
           stream: int = EVAL_STREAM, desc: str | None = None, record_model_logprobs: bool = False,
           batch_size: int | None = None) -> list[Rollout]:
    """``samples`` responses per prompt (prompt-major order), in batches of ``batch_size`` (default
    ``eval.batch_size``), seeded by (``config.seed``, ``stream``, prompt, sample index): :func:`keyed_seeds`.

    Sample j of a prompt gets the same seed whichever model draws it: a paired comparison with common
    randomness, and fixed seeds across calls for learning curves.
    """
    batch_size = batch_size or config.eval.batch_size
    expanded = [p for p in prompts for _ in range(samples)]
    seeds = keyed_seeds(config.seed, stream, prompts, samples)
    return [generate(policy, model, expanded[i : i + batch_size], config.generation,
                     config.data.max_prompt_tokens, seeds[i : i + batch_size],
                     record_model_logprobs=record_model_logprobs)
            for i in tqdm(range(0, len(expanded), batch_size), desc=desc, unit="batch", leave=False,
                          disable=desc is None)]


def texts_of(rollouts: list[Rollout]) -> list[str]:
    return [t for r in rollouts for t in r.responses]


@torch.inference_mode()
def greedy(policy: Policy, model: torch.nn.Module, prompts: list[str], config: Config,
           batch_size: int | None = None) -> list[str]:
    """The most likely tokens, step by step: the sampler's generation settings without its noise."""
    batch_size = batch_size or config.eval.batch_size
    texts = []
    for i in range(0, len(prompts), batch_size):
        query = policy.tokenize_prompts(prompts[i : i + batch_size], config.data.max_prompt_tokens,
                                        next(model.parameters()).device)
        out = model.generate(**query, generation_config=hf_generation_config(config.generation, policy, False))
        start = 1 if policy.is_encoder_decoder else query["input_ids"].shape[1]
        texts += [t.strip() for t in policy.tokenizer.batch_decode(out.sequences[:, start:], skip_special_tokens=True)]
    return texts
