"""Log-probabilities and entropy of response tokens straight from the LM head's input, in chunks.

The [rows, T, V] logits are never materialised: each chunk of positions is projected through the
frozen head, reduced to three numbers per position, and dropped; the backward pass recomputes the
chunk's logits the same way. Only positions in the response mask are computed.

Per position, with z = head(h) in the head's dtype, then in float32:
  logprobs        log pi(a) under the sampling transform z / temperature, EOS banned before
                  min_new_tokens (the distribution generation sampled from); differentiable in h.
  entropy         the entropy of that distribution (no gradient).
  model_logprobs  log p(a) of the untransformed z, temperature 1 (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Logits per chunk: 2**21 floats (8 MB), i.e. 42 positions of a 49,152-token vocabulary. A chunk holds ~6
# such tensors at once; 64 MB chunks were no faster and raised a training step's peak by ~0.2 GB.
CHUNK_LOGITS = 2**21


@dataclass(frozen=True)
class LMHead:
    """The frozen output projection: logits = hidden @ weight.T + bias."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]


class TokenScores(NamedTuple):
    logprobs: torch.Tensor  # [B, T], 0 where the mask is 0
    entropy: torch.Tensor  # [B, T]
    model_logprobs: torch.Tensor  # [B, T]


def score_tokens(
    hidden: torch.Tensor,
    head: LMHead,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    eos_token_ids: list[int] | tuple[int, ...] = (),
) -> TokenScores:
    """Score ``tokens`` [B, T] from ``hidden`` [B, T, H], the head's input at each position."""
    B, T = tokens.shape
    keep = mask.bool()
    banned = (torch.arange(T, device=tokens.device) < min_new_tokens).expand(B, T)
    flat = ChunkedHeadScores.apply(hidden[keep], head.weight, head.bias, tokens[keep], banned[keep],
                                   float(temperature), tuple(eos_token_ids))
    scores = []
    for values in flat:
        full = values.new_zeros(B, T)
        full[keep] = values  # index_put keeps the gradient of the differentiable log-probs
        scores.append(full)
    return TokenScores(*scores)


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The head's logits of a chunk, computed in the head's dtype (as the model does), as float32."""
    return F.linear(hidden.to(weight.dtype), weight, bias).float()


def sampling_transform(logits: torch.Tensor, banned: torch.Tensor, temperature: float,
                       eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """The logits of the distribution generation sampled from: divided by the temperature, EOS at -inf
    where ``banned`` (before ``min_new_tokens``). Applied identically to policy and reference, so their
    KL stays a true KL; scoring under the raw logits is what made the recipe report negative KL."""
    z = logits / temperature if temperature != 1.0 else logits.clone()
    if eos_token_ids and banned.any():
        rows = banned.nonzero().squeeze(1)
        z[rows.unsqueeze(1), torch.tensor(eos_token_ids, device=z.device)] = float("-inf")
    return z


def chunks(n: int, vocab: int):
    size = max(1, CHUNK_LOGITS // vocab)
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


class ChunkedHeadScores(torch.autograd.Function):
    """(log-probs, entropy, model log-probs) of [N] positions from hidden [N, H]; gradient to hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, banned, temperature, eos_token_ids):
        n = hidden.shape[0]
        logprobs, entropy, model_logprobs = (hidden.new_empty(n, dtype=torch.float32) for _ in range(3))
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in chunks(n, weight.shape[0]):
                raw = chunk_logits(hidden[rows], weight, bias)
                chosen = tokens[rows].unsqueeze(1)
                model_logprobs[rows] = (raw.gather(1, chosen) - raw.logsumexp(1, keepdim=True)).squeeze(1)
                z = sampling_transform(raw, banned[rows], temperature, eos_token_ids)
                del raw
                logp = z.log_softmax(1)
                logprobs[rows] = logp.gather(1, chosen).squeeze(1)
                # p log p with p = 0 (banned: logp = -inf) contributing 0, not NaN
                entropy[rows] = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(1)
        ctx.save_for_backward(hidden, weight, bias, tokens, banned)
        ctx.temperature, ctx.eos_token_ids = temperature, eos_token_ids
        ctx.mark_non_differentiable(entropy, model_logprobs)
        return logprobs, entropy, model_logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy, _grad_model_logprobs):
        hidden, weight, bias, tokens, banned = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in chunks(hidden.shape[0], weight.shape[0]):
                z = sampling_transform(chunk_logits(hidden[rows], weight, bias), banned[rows], ctx.temperature,
                                       ctx.eos_token_ids)
                # d log pi(a) / dz = onehot(a) - softmax(z), and z = logits / temperature
                grad_z = z.softmax(1).mul_(-grad_logprobs[rows].unsqueeze(1))
                grad_z.scatter_add_(1, tokens[rows].unsqueeze(1), grad_logprobs[rows].unsqueeze(1))
                if ctx.temperature != 1.0:
                    grad_z /= ctx.temperature
                grad_hidden[rows] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)
        return grad_hidden, None, None, None, None, None, None
