"""Math shared by every algorithm, as pure functions over padded [batch, T] tensors.

Every function takes a ``mask`` (1 for real response tokens, 0 after EOS) so that padding
never leaks into rewards, KL, advantages or losses. Statistics that must span all processes
take a ``reduce`` callable (sum over processes; the identity on one process), so the function
the tests check is the one that runs in data-parallel training.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None, reduce: Reduce = no_reduce
) -> torch.Tensor:
    """Mean over the real entries; with ``dim`` per row, else over everything (and all processes)."""
    mask = torch.ones_like(x) if mask is None else mask
    if dim is not None:
        return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
    totals = reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())
    return (totals[0] / totals[1].clamp(min=1)).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = no_reduce) -> torch.Tensor:
    """Unbiased variance over the real entries (of all processes)."""
    mean = masked_mean(x, mask, reduce=reduce)
    totals = reduce(torch.stack([(((x - mean) ** 2) * mask).sum(), mask.sum()]).double())
    return (totals[0] / (totals[1] - 1).clamp(min=1)).to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = no_reduce) -> torch.Tensor:
    """(x - mean) / std over the real entries; padding stays 0."""
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def response_mask(tokens: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (generate pads finished rows)."""
    eos_ids = torch.as_tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    is_eos = torch.isin(tokens, eos_ids.to(tokens.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).float()


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) of each sampled response, estimated by sum_t (log pi - log pi_ref): [B]."""
    return ((logprobs - ref_logprobs) * mask).sum(dim=1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's unbiased, always non-negative per-token KL estimator: e^(r) - r - 1, r = log pi_ref - log pi.

    r is 0 on padding before it is exponentiated: there the reference log-prob is 0 but the policy's
    is not, and e^(-log pi) overflows for log pi below about -88.7, so inf * 0 would make the loss NaN.
    """
    log_ratio = torch.where(mask.bool(), ref_logprobs - logprobs, 0.0)
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped policy-gradient loss max(-A r, -A clip(r)), with clip and approx-KL statistics.

    Returns (loss [B, T], fraction of clipped tokens, Schulman's estimate of KL(old || new)).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask).detach()
    return torch.max(unclipped, clipped) * mask, clip_fraction, approx_kl


def loss_divisors(mask: torch.Tensor, shares: int, reduce: Reduce = no_reduce) -> dict[str, torch.Tensor]:
    """The ``divisor`` of aggregate_loss, per normalisation, for one micro-batch of a mini-batch.

    ``mask`` is this process's share of the mini-batch; ``shares`` is how many micro-batch gradients
    are averaged into one update (processes x accumulation steps: DDP averages over processes and
    accelerate divides each loss by the accumulation steps). Dividing every micro-batch's sum by the
    mini-batch's count over all processes / ``shares`` makes that average the gradient of the whole
    mini-batch's loss (all tokens / all responses), however it is split.
    """
    totals = reduce(torch.stack([mask.sum(), mask.new_tensor(len(mask))]).double()).clamp(min=1) / shares
    return {"token": totals[0].to(mask.dtype), "sequence": totals[1].to(mask.dtype)}


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, normalization: str, divisor: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Reduce a [B, T] loss to a scalar.

    ``token``: the sum over all real tokens / their number, so long responses weigh more
    (DAPO, and TRL's PPO); ``sequence``: each response's token mean, then the mean over
    responses (the original GRPO). ``divisor`` overrides the count (tokens or responses): the
    trainer passes loss_divisors' choice, so that the update is that of the whole mini-batch.
    """
    if normalization == "token":
        return (per_token * mask).sum() / (mask.sum().clamp(min=1) if divisor is None else divisor)
    if normalization == "sequence":
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_sequence.sum() / (len(per_sequence) if divisor is None else divisor)
    raise ValueError(f"unknown loss normalization {normalization!r}")


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: beta moves towards the target KL."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class FixedKLController(AdaptiveKLController):
    def __init__(self, kl_coef: float):
        super().__init__(kl_coef, target=math.inf, horizon=1)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass
