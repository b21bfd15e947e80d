"""The plain computation that detoxrl.rl.logprobs.score_tokens replaces, for the tests to compare with:
full [B, T, V] logits, the sampling transform, log-softmax and entropy."""

import torch
import torch.nn.functional as F


def plain_logits(hidden: torch.Tensor, head) -> torch.Tensor:
    """What the model's own head gives (in its dtype), as float32."""
    return F.linear(hidden, head.weight, head.bias).float()


def plain_scores(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                 min_new_tokens: int = 0, eos_token_ids=()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs under the sampling transform, its entropy, log-probs at temperature 1), 0 where mask is 0."""
    logits = logits.float()
    z = logits / temperature
    if min_new_tokens and eos_token_ids:
        z = z.clone()
        z[:, :min_new_tokens, list(eos_token_ids)] = float("-inf")
    logp = z.log_softmax(-1)
    pick = lambda lp: lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask  # noqa: E731
    entropy = -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1) * mask
    return pick(logp), entropy, pick(logits.log_softmax(-1))
