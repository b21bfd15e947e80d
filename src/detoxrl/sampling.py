"""Sampling, one service for train, sft, generate and evaluation.

The seeded sampler itself is :func:`detoxrl.rl.rollout.generate` (one seed per response, so a
response does not depend on the batch it is in; prompts shared across their k samples; log-probs
from the distribution that sampled; the nucleus when ``top_p`` < 1, which only evaluation may ask
for with ``eval.top_p``). Here: the modes it runs in (no dropout; LoRA folded into fp32 base weights
for speed), batching, the seed streams that keep each command's samples apart, and greedy decoding.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm

from .config import Config, GenerationConfig
from .errors import DetoxError
from .heap import release_freed_memory
from .policy import Policy, PromptPass, encode_prompts
from .rl.rollout import Rollout, generate, hf_generation_config
from .shared_prefix import shared_prefixes, supports_shared_prefix

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
    what the base model costs. Subtracting the update again would leave the base weights off by
    float rounding: the adapted layers' weights are copied first and restored to the bit.
    """
    with eval_mode(policy.module):
        if any(p.dtype != torch.float32 for p in policy.model.parameters() if not p.requires_grad):
            yield policy.model  # folding an fp32 LoRA into bf16/fp16 base weights would round it away
            return
        adapted = [m.get_base_layer() for m in policy.model.modules() if isinstance(m, BaseTunerLayer)]
        saved = [(p, p.detach().clone()) for layer in adapted for p in layer.parameters(recurse=False)]
        policy.model.merge_adapter()
        try:
            yield policy.model
        finally:
            policy.model.unmerge_adapter()
            with torch.no_grad():
                for parameter, original in saved:
                    parameter.copy_(original)


# The most responses in an evaluation batch sized by memory: on 2 CPU cores 128 samples ~10% faster than 64 and
# 256 slower than 128 (a GPU gains from more: set eval.batch_size there).
MAX_AUTO_BATCH = 128
DEFAULT_BATCH_MEMORY_GB = 1.0


def cache_bytes_per_response(model_config, prompt_tokens: int, new_tokens: int, dtype: torch.dtype) -> int:
    """Bytes one response of a sampling batch holds at its last step: its key/value cache and, for an
    encoder-decoder, its encoder output and cross-attention cache.

    This is the part of a batch's memory that grows with its rows and lengths (one step's logits are
    [rows, vocabulary]); evaluation's reference pass over the same rows holds the same cache.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    c = model_config
    if c.is_encoder_decoder:  # T5's names
        layers, width = c.num_decoder_layers or c.num_layers, c.num_heads * c.d_kv
        return size * (c.d_model * prompt_tokens + layers * 2 * width * (prompt_tokens + new_tokens))
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return size * c.num_hidden_layers * 2 * heads * head_dim * (prompt_tokens + new_tokens)


def evaluation_batch_size(config: Config, model: torch.nn.Module) -> int:
    """Responses per evaluation batch: ``eval.batch_size``, or the most whose cache fits ``eval.batch_memory_gb``
    (:func:`cache_bytes_per_response` at data.max_prompt_tokens + the evaluation's max_new_tokens) up to
    ``MAX_AUTO_BATCH``, and at least one under the default limit. A limit that is given is kept: a batch size
    beyond it, or a limit that holds no response, is refused.

    A model that shares the prompts' cache (:mod:`detoxrl.shared_prefix`) holds it in fp32: counted at 4 bytes
    per value, and as if every row had its own prompt, the most it can hold."""
    model_config = model.config
    dtype = torch.float32 if supports_shared_prefix(model) else model.dtype
    e = config.eval
    if e.batch_memory_gb is None and e.batch_size is not None:
        return e.batch_size
    new_tokens = e.sampling(config.generation).max_new_tokens
    per_response = cache_bytes_per_response(model_config, config.data.max_prompt_tokens, new_tokens, dtype)
    fits = int((e.batch_memory_gb or DEFAULT_BATCH_MEMORY_GB) * 1e9 // per_response)
    if e.batch_memory_gb is None:
        return max(1, min(MAX_AUTO_BATCH, fits))
    where = (f"at {config.data.max_prompt_tokens} prompt + {new_tokens} new tokens in {str(dtype).removeprefix('torch.')}, "
             f"{per_response / 1e6:.2g} MB of cache per response")
    if fits < 1:
        raise DetoxError(f"eval.batch_memory_gb ({e.batch_memory_gb:g}) does not hold one response ({where}); raise it "
                         "or lower data.max_prompt_tokens")
    if e.batch_size is None:
        return min(MAX_AUTO_BATCH, fits)
    if e.batch_size > fits:
        raise DetoxError(f"eval.batch_size ({e.batch_size}) does not fit eval.batch_memory_gb ({e.batch_memory_gb:g}) "
                         f"({where}); use eval.batch_size {fits} or less, or leave it unset to size it by memory")
    return e.batch_size


def keyed_seeds(seed: int, stream: int, prompts: list[str], samples: int) -> list[int]:
    """One seed per (prompt, sample index), prompt-major: sample j of a prompt is the same draw whatever the
    number of samples, the batch size, the prompts' order or the processes, so evaluations nest."""
    def prompt_id(prompt: str) -> int:
        return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")

    return [int(np.random.SeedSequence([seed, stream, prompt_id(p), j]).generate_state(1)[0])
            for p in prompts for j in range(samples)]


def sample(policy: Policy, model: torch.nn.Module, prompts: list[str], config: Config, samples: int,
           stream: int = EVAL_STREAM, desc: str | None = None, record_model_logprobs: bool = False,
           batch_size: int | None = None, generation: GenerationConfig | None = None,
           after_batch: Callable[[int, PromptPass], None] | None = None) -> list[Rollout]:
    """``samples`` responses per prompt (prompt-major order), in batches of ``batch_size`` (default
    ``eval.batch_size``), seeded by (``config.seed``, ``stream``, prompt, sample index): :func:`keyed_seeds`.

    ``generation`` is what to sample with: training's ``config.generation`` unless given (evaluation gives
    :meth:`~detoxrl.config.EvalConfig.sampling`), whose ``top_p`` below 1 samples the nucleus. Sample j of a
    prompt gets the same seed whichever model draws it: a paired comparison with common randomness, and fixed
    seeds across calls for learning curves.

    ``after_batch(index, prompt_pass)`` runs after batch ``index`` with ``model``'s pass over its prompts, for
    another pass over the same prompts (evaluation's reference re-scores the policy's responses there).
    """
    generation = generation or config.generation
    batch_size = batch_size or evaluation_batch_size(config, model)
    expanded = [p for p in prompts for _ in range(samples)]
    seeds = keyed_seeds(config.seed, stream, prompts, samples)
    rollouts = []
    starts = range(0, len(expanded), batch_size)
    for index, i in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None)):
        batch, prompt_pass = expanded[i : i + batch_size], None
        if after_batch is not None:
            query = policy.tokenize_prompts(batch, config.data.max_prompt_tokens, next(model.parameters()).device)
            with torch.no_grad(), shared_prefixes(model):  # as generate computes it
                prompt_pass = PromptPass(model, query["input_ids"], query["attention_mask"])
        rollouts.append(generate(policy, model, batch, generation, config.data.max_prompt_tokens,
                                 seeds[i : i + batch_size], record_model_logprobs=record_model_logprobs,
                                 prompt_pass=prompt_pass))
        release_freed_memory()  # the batch's cache
        if after_batch is not None:
            after_batch(index, prompt_pass)
            del prompt_pass
            release_freed_memory()
    return rollouts


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
    batch_size = batch_size or evaluation_batch_size(config, model)
    texts = []
    for i in range(0, len(prompts), batch_size):
        query = policy.tokenize_prompts(prompts[i : i + batch_size], config.data.max_prompt_tokens,
                                        next(model.parameters()).device)
        prompt = encode_prompts(model, query["input_ids"], query["attention_mask"], config.generation.max_new_tokens)
        with shared_prefixes(model):
            out = model.generate(**query, **prompt,
                                 generation_config=hf_generation_config(config.generation, policy, False))
        start = 1 if policy.is_encoder_decoder else query["input_ids"].shape[1]
        texts += [t.strip() for t in policy.tokenizer.batch_decode(out.sequences[:, start:], skip_special_tokens=True)]
    return texts
