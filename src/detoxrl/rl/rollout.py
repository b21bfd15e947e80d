"""Rollouts: batched sampling, scoring, and the reference pass.

The log-probabilities and values of the sampled tokens are taken from generation itself
(the sampler's own record and the hidden states), so the policy needs no second forward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from ..config import GenerationConfig
from ..errors import DetoxError
from ..policy import Policy, PromptPass, ValueHead, encode_prompts, forward_response
from ..shared_prefix import shared_prefixes
from .core import response_mask
from .logprobs import score_tokens


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [B, Lq], padded on the policy's padding side
    query_mask: torch.Tensor  # [B, Lq]
    response_ids: torch.Tensor  # [B, T], pad after EOS
    mask: torch.Tensor  # [B, T], 1 up to and including EOS
    logprobs: torch.Tensor  # [B, T], log pi_old(a_t | s_t) under the sampling distribution
    values: torch.Tensor | None  # [B, T]
    responses: list[str]
    ref_logprobs: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [B]
    model_logprobs: torch.Tensor | None = None  # [B, T], log p of the sampled tokens at temperature 1 (evaluation)
    ref_model_logprobs: torch.Tensor | None = None  # [B, T], the reference's, at temperature 1 (evaluation)

    def select(self, index: torch.Tensor) -> "Rollout":
        """Rows ``index``, with columns that are padding in every selected row dropped."""
        picked = {
            f.name: (getattr(self, f.name)[index] if isinstance(getattr(self, f.name), torch.Tensor) else None)
            for f in fields(self)
        }
        picked["responses"] = [self.responses[i] for i in index.tolist()]
        keep_q = picked["query_mask"].any(dim=0)
        keep_t = int(picked["mask"].sum(dim=1).max().item()) or 1
        for name in ("query_ids", "query_mask"):
            picked[name] = picked[name][:, keep_q]
        for name in ("response_ids", "mask", "logprobs", "values", "ref_logprobs", "model_logprobs",
                     "ref_model_logprobs"):
            if picked[name] is not None:
                picked[name] = picked[name][:, :keep_t]
        return Rollout(**picked)


def sample_seeds(*key: int, count: int) -> list[int]:
    """One independent seed per sample, from (run seed, step, ...) and the sample's global index."""
    return [int(np.random.SeedSequence([*key, index]).generate_state(1)[0]) for index in range(count)]


class SeededSampler(LogitsProcessor):
    """Exact sampling from softmax(scores / T) by the Gumbel-max trick, one RNG per sample.

    Each sample's randomness depends only on its own seed, not on which batch or process it
    lands in, so a run gives the same rollouts on 1 or N processes and after a resume. It also
    records log pi(a_t) of the chosen tokens under the distribution that sampled them (after
    the min_new_tokens ban and the temperature), so no second forward pass is needed.

    ``top_p`` < 1 samples the nucleus instead: the fewest most likely tokens whose probability
    reaches ``top_p`` (transformers' ``TopPLogitsWarper``), renormalised, and the recorded log-probs
    are of that truncated distribution. Only evaluation may ask for it: PPO's ratio and the KL need
    the full distribution, so ``Config.validate`` keeps ``generation.top_p`` at 1.
    """

    def __init__(self, seeds: list[int], temperature: float, device: torch.device, record_model_logprobs: bool = False,
                 top_p: float = 1.0):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.nucleus = TopPLogitsWarper(top_p) if top_p < 1 else None
        self.logprobs: list[torch.Tensor] = []
        # Also log p of the chosen token at temperature 1 and untruncated: the model's own perplexity of
        # what it wrote, for evaluation, without a second pass over the responses.
        self.model_logprobs: list[torch.Tensor] | None = [] if record_model_logprobs else None
        self.buffers: tuple[torch.Tensor, ...] = ()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Every step's [rows, vocabulary] tensors are written into the same three buffers (what it returns
        # included: generate only takes its argmax). Allocated anew, each is mapped and zeroed by the kernel
        # (glibc maps blocks of 16 MB and more: detoxrl.heap); an evaluation batch of 128 rows and a
        # 49,152-token vocabulary made 4 of 25 MB per decoding step.
        scores = scores.float()
        if not self.buffers or self.buffers[0].shape != scores.shape:
            self.buffers = tuple(torch.empty_like(scores) for _ in range(3))
        scaled, logp, noisy = self.buffers
        torch.div(scores, self.temperature, out=scaled)
        torch.log_softmax(scaled if self.nucleus is None else self.nucleus(input_ids, scaled), dim=-1, out=logp)
        # logp - log(-log(u)), computed in one [rows, vocabulary] tensor rather than a row per sample
        for row, generator in zip(noisy, self.generators):
            row.uniform_(generator=generator)
        noisy.clamp_(min=1e-20).log_().neg_().log_().neg_().add_(logp)
        chosen = noisy.argmax(dim=-1, keepdim=True)
        self.logprobs.append(logp.gather(-1, chosen).squeeze(-1))
        if self.model_logprobs is not None:
            self.model_logprobs.append(torch.log_softmax(scores, dim=-1, out=scaled).gather(-1, chosen).squeeze(-1))
        return noisy


def hf_generation_config(config: GenerationConfig, policy: Policy, with_hidden_states: bool) -> HFGenerationConfig:
    """Greedy over Gumbel-perturbed log-probs (= pure sampling); nothing inherited from the model."""
    return neutral_generation_config(
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        output_hidden_states=with_hidden_states,
        max_new_tokens=config.max_new_tokens,
        # 0 given to transformers still adds a processor that copies every step's [rows, vocabulary] scores
        min_new_tokens=config.min_new_tokens or None,
        pad_token_id=policy.tokenizer.pad_token_id,
        eos_token_id=policy.eos_token_ids,
        decoder_start_token_id=getattr(policy.model.config, "decoder_start_token_id", None),
        bos_token_id=getattr(policy.model.config, "bos_token_id", None),
    )


def neutral_generation_config(**settings) -> HFGenerationConfig:
    """A generation config in which every logits-changing option is explicitly off.

    generate() fills each option left unset from the model's own generation_config.json
    (repetition_penalty, no_repeat_ngram_size, bad_words_ids, suppress_tokens, forced_*_token_id,
    sequence_bias, ...). Those would run before the seeded sampler, so the recorded log-probs
    would come from a penalised distribution while training and the reference use the plain one.
    """
    neutral = dict(
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, length_penalty=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        top_k=None, top_p=None, min_p=None, temperature=None, exponential_decay_length_penalty=None,
        bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
        forced_eos_token_id=None, sequence_bias=None, renormalize_logits=False, remove_invalid_values=False,
    )
    return HFGenerationConfig(**{**neutral, **settings})


@contextlib.contextmanager
def model_generation_defaults(model: nn.Module, generation_config: HFGenerationConfig):
    """Let ``generation_config`` stand in for the model's own while generating, so that options it leaves
    unset (None) are not filled from the model's generation_config.json."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = generation_config
    try:
        yield
    finally:
        base.generation_config = saved


@torch.no_grad()
def generate(
    policy: Policy,
    model: nn.Module,
    prompts: list[str],
    config: GenerationConfig,
    max_prompt_tokens: int,
    seeds: list[int],
    value_head: ValueHead | None = None,
    synced_gpus: bool = False,
    record_model_logprobs: bool = False,
    prompt_pass: PromptPass | None = None,
) -> Rollout:
    """Sample one response per prompt, in one batch, with the log-probs (and values) of each token.

    ``config`` picks the distribution: its temperature, and its top_p for the nucleus
    (:class:`SeededSampler`; below 1 in evaluation only).

    ``synced_gpus`` keeps every process stepping until all are done, which sharded weights
    (DeepSpeed ZeRO-3, FSDP) need because each forward pass gathers them collectively.

    ``prompt_pass``: the prompts' pass of these rows (``policy.tokenize_prompts``) by ``model``, computed by the
    caller to serve another pass too (:func:`teacher_forced_logprobs`); by default computed here.
    """
    device = next(model.parameters()).device
    query = policy.tokenize_prompts(prompts, max_prompt_tokens, device)
    if prompt_pass is not None and not prompt_pass.matches(query["input_ids"], query["attention_mask"]):
        raise ValueError("prompt_pass was computed for other prompts")
    sampler = SeededSampler(seeds, config.temperature, device, record_model_logprobs, config.top_p)
    settings = hf_generation_config(config, policy, value_head is not None)
    with model_generation_defaults(model, settings), shared_prefixes(model):
        prompt = prompt_pass.inputs(config.max_new_tokens) if prompt_pass is not None else \
            encode_prompts(model, query["input_ids"], query["attention_mask"], config.max_new_tokens)
        out = model.generate(
            **query, **prompt,
            generation_config=settings, logits_processor=LogitsProcessorList([sampler]), synced_gpus=synced_gpus
        )
    start = 1 if policy.is_encoder_decoder else query["input_ids"].shape[1]
    response_ids = out.sequences[:, start:]
    logprobs = torch.stack(sampler.logprobs, dim=1)
    values = None
    if value_head is not None:
        steps = out.decoder_hidden_states if policy.is_encoder_decoder else out.hidden_states
        hidden = torch.stack([layers[-1][:, -1] for layers in steps], dim=1)
        values = value_head(hidden).float()
    mask = response_mask(response_ids, policy.eos_token_ids, policy.tokenizer.pad_token_id).to(device)
    texts = policy.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(
        query_ids=query["input_ids"],
        query_mask=query["attention_mask"],
        response_ids=response_ids,
        mask=mask,
        logprobs=logprobs * mask,
        values=values * mask if values is not None else None,
        responses=[t.strip() for t in texts],
        model_logprobs=torch.stack(sampler.model_logprobs, dim=1) * mask if record_model_logprobs else None,
    )


@torch.inference_mode()
def reference_logprobs(
    policy: Policy, rollout: Rollout, config: GenerationConfig, chunk_size: int = 4, with_model_logprobs: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref of the sampled tokens, under the same sampling transform as the policy
    (:func:`teacher_forced_logprobs` of the reference model). ``with_model_logprobs`` also returns log pi_ref at
    temperature 1 from the same pass (evaluation's perplexity of the responses under the reference)."""
    with policy.reference_model() as reference:
        logprobs, model_logprobs = teacher_forced_logprobs(policy, reference, rollout, config, chunk_size)
    return (logprobs, model_logprobs) if with_model_logprobs else logprobs


@torch.inference_mode()
def teacher_forced_logprobs(policy: Policy, model: nn.Module, rollout: Rollout, config: GenerationConfig,
                            chunk_size: int | None = None, prompt_pass: PromptPass | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of the rollout's tokens under ``model``: under the sampling transform of ``config``, and at
    temperature 1.

    Computed in chunks of ``chunk_size`` rows (default: all); the log-probs come from the LM head in chunks of
    positions (:func:`~detoxrl.rl.logprobs.score_tokens`), so no [rows, T, V] logits exist. ``prompt_pass``:
    ``model``'s prompts' pass of all the rollout's rows (so one chunk), computed already (when it sampled the
    same prompts).
    """
    chunk_size = chunk_size or len(rollout.responses) or 1  # a prompt_pass covers all rows: forward_response checks
    chunks, model_chunks = [], []
    for start in range(0, len(rollout.responses), chunk_size):
        rows = slice(start, start + chunk_size)
        out = forward_response(model, rollout.query_ids[rows], rollout.query_mask[rows], rollout.response_ids[rows],
                               prompt_pass=prompt_pass)
        scores = score_tokens(out.hidden, out.head, rollout.response_ids[rows], rollout.mask[rows],
                              config.temperature, config.min_new_tokens, policy.eos_token_ids)
        chunks.append(scores.logprobs)
        model_chunks.append(scores.model_logprobs)
    return torch.cat(chunks), torch.cat(model_chunks)


@torch.no_grad()
def rollout_from_responses(
    policy: Policy, prompts: list[str], responses: list[str], config: GenerationConfig, max_prompt_tokens: int
) -> Rollout:
    """A rollout of responses written elsewhere (the recipe's ``step(query, response, reward)``).

    Their log-probs (and values) come from a teacher-forced pass under the same sampling
    transform as generation; each response is cut to max_new_tokens and ends with EOS.
    """
    if len(prompts) != len(responses):
        raise DetoxError(f"{len(prompts)} prompts but {len(responses)} responses")
    module = policy.module
    device = next(module.parameters()).device
    query = policy.tokenize_prompts(prompts, max_prompt_tokens, device)
    tokenizer, eos = policy.tokenizer, policy.eos_token_ids
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"][: config.max_new_tokens - 1] + [eos[0]] for r in responses]
    short = [i for i, x in enumerate(ids) if len(x) <= config.min_new_tokens]
    if short:
        raise DetoxError(f"response {short[0]} is shorter than generation.min_new_tokens ({config.min_new_tokens} "
                         "tokens), so the sampler could not have produced it")
    response_ids = torch.full((len(ids), max(map(len, ids))), tokenizer.pad_token_id, dtype=torch.long, device=device)
    for row, tokens in enumerate(ids):
        response_ids[row, : len(tokens)] = torch.tensor(tokens, device=device)
    mask = response_mask(response_ids, eos, tokenizer.pad_token_id).to(device)
    out = forward_response(module.model, query["input_ids"], query["attention_mask"], response_ids, module.value_head)
    scores = score_tokens(out.hidden, out.head, response_ids, mask, config.temperature, config.min_new_tokens, eos)
    return Rollout(
        query_ids=query["input_ids"],
        query_mask=query["attention_mask"],
        response_ids=response_ids,
        mask=mask,
        logprobs=scores.logprobs,
        values=out.values.float() * mask if out.values is not None else None,
        responses=[r.strip() for r in responses],
    )
