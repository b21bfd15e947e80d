"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline over k responses per prompt.

No critic: each response's advantage is its KL-penalised sequence reward minus the mean reward
of the other k - 1 responses to the same prompt, applied to every token of the response
through the clipped surrogate (as TRL's RLOOTrainer does).
"""

from __future__ import annotations

import torch

from .algorithms import Algorithm, LossBatch, refuse_critic_settings, require_groups
from .core import Reduce, aggregate_loss, clipped_surrogate, masked_mean, masked_whiten, sequence_kl


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """r_i - mean of the other k - 1 rewards of the group; rows are k consecutive responses per prompt: [B] -> [B]."""
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of k={k} >= 2")
    groups = rewards.reshape(-1, k)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


class RLOO(Algorithm):
    name = "rloo"
    uses_critic = False

    @classmethod
    def validate(cls, config) -> None:
        require_groups(config)
        refuse_critic_settings(config)

    def advantages(self, batch, kl_coef: float, reduce: Reduce) -> tuple[torch.Tensor, None, dict[str, float]]:
        c = self.config
        rewards = batch.scores.to(batch.logprobs.dtype) - kl_coef * sequence_kl(batch.logprobs, batch.ref_logprobs,
                                                                               batch.mask)
        advantages = leave_one_out_advantages(rewards, c.samples_per_prompt)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, torch.ones_like(advantages), reduce)
        stats = {"rloo/reward_with_kl_mean": float(masked_mean(rewards, reduce=reduce))}
        return advantages[:, None] * batch.mask, None, stats

    def loss(self, batch: LossBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, statistics) of a micro-batch; the KL is already in the sequence rewards."""
        c, old = self.config, batch.rollout
        per_token, clip_fraction, approx_kl = clipped_surrogate(batch.logprobs, old.logprobs, batch.advantages,
                                                                old.mask, c.cliprange)
        loss = aggregate_loss(per_token, old.mask, c.loss_normalization, batch.divisors[c.loss_normalization])
        return loss, {"loss/policy": loss.detach(), "policy/clipfrac": clip_fraction, "policy/approxkl": approx_kl}
