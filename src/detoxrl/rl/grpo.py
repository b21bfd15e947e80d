"""GRPO (Shao et al. 2024): group-normalised advantages, and the KL to the reference as a loss term.

No critic: a response's advantage is its score minus the mean score of its prompt's k
responses (optionally divided by their standard deviation). The KL is not part of the reward
but added to the per-token loss with the k3 estimator, which is unbiased and never negative.
"""

from __future__ import annotations

import torch

from .algorithms import Algorithm, LossBatch, refuse_critic_settings, require_groups
from .core import Reduce, aggregate_loss, clipped_surrogate, k3_kl


def group_normalised_advantages(scores: torch.Tensor, k: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """(s_i - mean of its group) [/ (std of its group + eps)]; rows are k consecutive responses per prompt."""
    if k < 2 or scores.numel() % k:
        raise ValueError(f"{scores.numel()} scores do not form groups of k={k} >= 2")
    groups = scores.reshape(-1, k)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    kl_coef: float,
    normalization: str = "token",
    divisor: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + kl_coef * k3 KL to the reference, both normalised alike; (loss, statistics)."""
    per_token, clip_fraction, approx_kl = clipped_surrogate(logprobs, old_logprobs, advantages, mask, cliprange)
    kl = k3_kl(logprobs, ref_logprobs, mask)
    policy_loss = aggregate_loss(per_token, mask, normalization, divisor)
    kl_loss = aggregate_loss(kl, mask, normalization, divisor)
    stats = {"loss/policy": policy_loss.detach(), "loss/kl": kl_loss.detach(),
             "policy/clipfrac": clip_fraction, "policy/approxkl": approx_kl}
    return policy_loss + kl_coef * kl_loss, stats


class GRPO(Algorithm):
    name = "grpo"
    uses_critic = False

    @classmethod
    def validate(cls, config) -> None:
        require_groups(config)
        refuse_critic_settings(config)

    def advantages(self, batch, kl_coef: float, reduce: Reduce) -> tuple[torch.Tensor, None, dict[str, float]]:
        c = self.config
        advantages = group_normalised_advantages(batch.scores.to(batch.logprobs.dtype), c.samples_per_prompt,
                                                 c.scale_rewards)
        groups = batch.scores.reshape(-1, c.samples_per_prompt)
        flat_groups = reduce(torch.stack([(groups.std(dim=1) < 1e-6).sum(), torch.tensor(len(groups))]).double())
        stats = {"grpo/flat_group_fraction": float(flat_groups[0] / flat_groups[1])}
        return advantages[:, None] * batch.mask, None, stats

    def loss(self, batch: LossBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, statistics) of a micro-batch; the KL to the reference is a term of the loss."""
        c, old = self.config, batch.rollout
        return grpo_losses(batch.logprobs, old.logprobs, old.ref_logprobs, batch.advantages, old.mask, c.cliprange,
                           batch.kl_coef, c.loss_normalization, batch.divisors[c.loss_normalization])
