"""The PPO math as pure functions over padded [batch, T] tensors.

Every function takes a ``mask`` (1 for real response tokens, 0 after EOS) so that padding
never leaks into rewards, KL, advantages or losses. Symbols follow Schulman et al. (2017)
and Ziegler et al. (2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real tokens; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(a_t | s_t) of the taken tokens: [B, T, V], [B, T] -> [B, T].

    logit[a] - logsumexp(logits) never materialises a [B, T, V] log-softmax.
    """
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_mask(tokens: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (generate pads finished rows)."""
    eos_ids = torch.as_tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    is_eos = torch.isin(tokens, eos_ids.to(tokens.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).float()


def kl_penalised_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * (log pi - log pi_ref), plus the score on each response's last real token.

    Returns (rewards [B, T], per-token KL [B, T]).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; V after the last real token is 0.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lambda * A_{t+1}.
    Returns (advantages, returns = advantages + values), both zero on padding.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


@dataclass
class PPOLosses:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clip_fraction: torch.Tensor
    value_clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def ppo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    num_tokens: torch.Tensor | float | None = None,
) -> PPOLosses:
    """Clipped surrogate policy loss + clipped value loss, averaged over real tokens.

    ``num_tokens`` overrides the divisor: data-parallel training passes the mini-batch's token
    count over all processes divided by their number, so that the averaged gradients equal
    those of one process holding the whole mini-batch.
    """
    divisor = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = (torch.max(pg_unclipped, pg_clipped) * mask).sum() / divisor

    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_unclipped = (values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * (torch.max(vf_unclipped, vf_clipped) * mask).sum() / divisor

    return PPOLosses(
        loss=policy_loss + vf_coef * value_loss,
        policy_loss=policy_loss.detach(),
        value_loss=value_loss.detach(),
        clip_fraction=masked_mean((pg_clipped > pg_unclipped).float(), mask).detach(),
        value_clip_fraction=masked_mean((vf_clipped > vf_unclipped).float(), mask).detach(),
        # Schulman's low-variance estimator of KL(old || new): E[(r - 1) - log r].
        approx_kl=masked_mean((ratio - 1) - log_ratio, mask).detach(),
    )


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)


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


def sampling_logits(
    logits: torch.Tensor, temperature: float, min_new_tokens: int, eos_token_ids: list[int]
) -> torch.Tensor:
    """The logits of the distribution that generation actually sampled from.

    Generation divides by the temperature and bans EOS before ``min_new_tokens``; scoring the
    responses under the raw logits instead is what made the old stack report negative KL.
    Applied identically to policy and reference, so their KL stays a true KL. At temperature 1
    without a minimum length the fp32 input is returned as is (no [B, T, V] copy).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if min_new_tokens > 0:
        logits = logits.clone()
        logits[:, :min_new_tokens, eos_token_ids] = float("-inf")
    return logits
