"""PPO (Schulman et al. 2017) as Ziegler et al. (2019) applied it to language: a per-token KL
penalty in the reward, a learned value head, GAE, and clipped policy and value losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .algorithms import Algorithm, LossBatch
from .core import Reduce, aggregate_loss, clipped_surrogate, masked_mean, masked_var, masked_whiten, no_reduce


def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
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
    divisor: torch.Tensor | float | None = None,
    normalization: str = "token",
    value_divisor: torch.Tensor | float | None = None,
) -> PPOLosses:
    """Clipped surrogate policy loss + vf_coef * clipped value loss.

    The policy loss is normalised as ``normalization`` says (detoxrl.rl.core.aggregate_loss);
    the value loss is always a mean over tokens. ``divisor`` overrides the policy loss's count and
    ``value_divisor`` the value loss's token count (detoxrl.rl.core.loss_divisors).
    """
    per_token, clip_fraction, approx_kl = clipped_surrogate(logprobs, old_logprobs, advantages, mask, cliprange)
    policy_loss = aggregate_loss(per_token, mask, normalization, divisor)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    value_loss = 0.5 * aggregate_loss(torch.max(unclipped, clipped), mask, "token", value_divisor)
    return PPOLosses(
        loss=policy_loss + vf_coef * value_loss,
        policy_loss=policy_loss.detach(),
        value_loss=value_loss.detach(),
        clip_fraction=clip_fraction,
        value_clip_fraction=masked_mean((clipped > unclipped).float(), mask).detach(),
        approx_kl=approx_kl,
    )


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce = no_reduce
) -> float:
    """1 - Var[R - V] / Var[R]: how much of the returns the critic predicts (1 is perfect, <= 0 is none)."""
    var_returns = masked_var(returns, mask, reduce)
    if var_returns <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, reduce) / var_returns)


class PPO(Algorithm):
    """Per-token advantages from a learned critic."""

    name = "ppo"
    uses_critic = True

    def advantages(self, batch, kl_coef: float, reduce: Reduce) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(advantages [B, T], returns [B, T], statistics)."""
        c = self.config
        rewards, _ = kl_penalised_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, batch.mask, kl_coef)
        advantages, returns = gae_advantages(rewards, batch.values, batch.mask, c.gamma, c.lam)
        if c.whiten_advantages is not False:
            advantages = masked_whiten(advantages, batch.mask, reduce)
        stats = {
            "ppo/returns/mean": float(masked_mean(returns, batch.mask, reduce=reduce)),
            "ppo/val/mean": float(masked_mean(batch.values, batch.mask, reduce=reduce)),
            "ppo/val/explained_variance": explained_variance(batch.values, returns, batch.mask, reduce),
        }
        return advantages, returns, stats

    def loss(self, batch: LossBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, statistics) of a micro-batch; the KL is already in the rewards."""
        c, old = self.config, batch.rollout
        out = ppo_losses(batch.logprobs, old.logprobs, batch.values, old.values, batch.advantages, batch.returns,
                         old.mask, c.cliprange, c.cliprange_value, c.vf_coef, batch.divisors[c.loss_normalization],
                         c.loss_normalization, batch.divisors["token"])
        return out.loss, {"loss/policy": out.policy_loss, "loss/value": out.value_loss,
                          "policy/clipfrac": out.clip_fraction, "policy/approxkl": out.approx_kl,
                          "ppo/val/clipfrac": out.value_clip_fraction}
