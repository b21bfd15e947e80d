"""Sampling, one service for train, sft, generate and evaluation.

The seeded sampler itself is :func:`detoxrl.rl.rollout.generate` (one seed per response, so a
response does not depend on the batch it is in; prompts shared across their k samples; log-probs
from the distribution that sampled). Here: the modes it runs in (no dropout; LoRA folded into fp32
base weights for speed), batching, the seed streams that keep each command's samples apart, greedy
decoding, and the nucleus sampling that only evaluation may use (``eval.top_p``): training samples
the full distribution, whose log-probs PPO's ratio and the KL need.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from .config import Config, GenerationConfig
from .policy import Policy, encode_prompts
from .rl.core import response_mask
from .rl.rollout import Rollout, SeededSampler, generate, hf_generation_config, model_generation_defaults

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
           batch_size: int | None = None, generation: GenerationConfig | None = None) -> list[Rollout]:
    """``samples`` responses per prompt (prompt-major order), in batches of ``batch_size`` (default
    ``eval.batch_size``), seeded by (``config.seed``, ``stream``, prompt, sample index): :func:`keyed_seeds`.

    ``generation`` is what to sample with: training's ``config.generation`` unless given (evaluation gives
    :meth:`~detoxrl.config.EvalConfig.sampling`); below ``top_p`` 1 the nucleus is sampled
    (:func:`nucleus_generate`). Sample j of a prompt gets the same seed whichever model draws it: a paired
    comparison with common randomness, and fixed seeds across calls for learning curves.
    """
    batch_size = batch_size or config.eval.batch_size
    generation = generation or config.generation
    draw = generate if generation.top_p >= 1 else nucleus_generate
    expanded = [p for p in prompts for _ in range(samples)]
    seeds = keyed_seeds(config.seed, stream, prompts, samples)
    return [draw(policy, model, expanded[i : i + batch_size], generation, config.data.max_prompt_tokens,
                 seeds[i : i + batch_size], record_model_logprobs=record_model_logprobs)
            for i in tqdm(range(0, len(expanded), batch_size), desc=desc, unit="batch", leave=False,
                          disable=desc is None)]


class NucleusSampler(LogitsProcessor):
    """The seeded sampler over the nucleus: the fewest most likely tokens whose probability at the sampling
    temperature reaches ``top_p`` (transformers' ``TopPLogitsWarper``), renormalised, then drawn with
    :class:`~detoxrl.rl.rollout.SeededSampler`'s per-sample generators.

    ``logprobs`` are of that truncated distribution; ``model_logprobs`` (log p at temperature 1 of the
    untruncated model) are taken before the cut, so perplexity under the model stays what it is.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device,
                 record_model_logprobs: bool = False):
        self.temperature, self.nucleus = temperature, TopPLogitsWarper(top_p)
        self.draw = SeededSampler(seeds, 1.0, device)
        self.logprobs = self.draw.logprobs
        self.model_logprobs: list[torch.Tensor] | None = [] if record_model_logprobs else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noisy = self.draw(input_ids, self.nucleus(input_ids, scores.float() / self.temperature))
        if self.model_logprobs is not None:
            chosen = noisy.argmax(dim=-1, keepdim=True)
            self.model_logprobs.append(torch.log_softmax(scores.float(), dim=-1).gather(-1, chosen).squeeze(-1))
        return noisy


@torch.no_grad()
def nucleus_generate(policy: Policy, model: torch.nn.Module, prompts: list[str], generation: GenerationConfig,
                     max_prompt_tokens: int, seeds: list[int], record_model_logprobs: bool = False) -> Rollout:
    """:func:`~detoxrl.rl.rollout.generate` with :class:`NucleusSampler` in place of the full-distribution
    sampler: one response per prompt, in one batch, for evaluation only (no values)."""
    device = next(model.parameters()).device
    query = policy.tokenize_prompts(prompts, max_prompt_tokens, device)
    sampler = NucleusSampler(seeds, generation.temperature, generation.top_p, device, record_model_logprobs)
    settings = hf_generation_config(generation, policy, False)
    with model_generation_defaults(model, settings):
        out = model.generate(**query, **encode_prompts(model, query["input_ids"], query["attention_mask"]),
                             generation_config=settings, logits_processor=LogitsProcessorList([sampler]))
    start = 1 if policy.is_encoder_decoder else query["input_ids"].shape[1]
    response_ids = out.sequences[:, start:]
    mask = response_mask(response_ids, policy.eos_token_ids, policy.tokenizer.pad_token_id).to(device)
    texts = policy.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(query_ids=query["input_ids"], query_mask=query["attention_mask"], response_ids=response_ids,
                   mask=mask, logprobs=torch.stack(sampler.logprobs, dim=1) * mask, values=None,
                   responses=[t.strip() for t in texts],
                   model_logprobs=torch.stack(sampler.model_logprobs, dim=1) * mask if record_model_logprobs else None)


def describe_sampling(config: Config) -> dict:
    """What evaluation sampled with (:meth:`~detoxrl.config.EvalConfig.sampling`), the eval.* settings that chose
    it, and which distribution the KL to the reference is under, for metrics.json and the report."""
    s, e = config.eval.sampling(config.generation), config.eval
    chosen = {name: getattr(e, name) for name in ("temperature", "top_p", "max_new_tokens")
              if getattr(e, name) is not None}
    kl = (f"not reported: under nucleus sampling (top_p {s.top_p:g}) the policy can sample a token outside the "
          "reference's nucleus, which makes the KL infinite, and the full distribution's KL would describe other "
          "samples than these" if s.top_p < 1 else
          f"under the evaluation's sampling distribution (temperature {s.temperature:g})")
    g = config.generation
    summary = (f"evaluation: temperature {s.temperature:g}, "
               f"{'full distribution' if s.top_p >= 1 else f'top-p {s.top_p:g}'}, up to {s.max_new_tokens} new tokens"
               + ("" if s == g else f"; training: temperature {g.temperature:g}, full distribution, up to "
                                    f"{g.max_new_tokens} new tokens")
               + ("; no KL to the reference (nucleus sampling)" if s.top_p < 1 else ""))
    return {"temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens,
            "min_new_tokens": s.min_new_tokens, "set_by_eval": chosen, "kl": kl, "summary": summary}


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
