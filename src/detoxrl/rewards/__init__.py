"""Scorers (rewards for RL and toxicity for evaluation, behind one interface) and the composite reward
that training optimises (:mod:`.composite`)."""

from __future__ import annotations

from ..config import NONTOXIC_LABEL, RewardConfig
from .base import Scorer, log_odds, reward_from_probability
from .builtin import HateSonarScorer, ProfanityScorer
from .classifier import ClassifierScorer, label_index, reward_from_logits
from .custom import CallableScorer

BUILTIN = {"hatesonar": HateSonarScorer, "profanity-check": ProfanityScorer}

__all__ = [
    "Scorer", "log_odds", "reward_from_probability", "HateSonarScorer", "ProfanityScorer", "ClassifierScorer", "CallableScorer",
    "label_index", "reward_from_logits", "build_scorer", "build_reward", "build_evaluator",
]


def build_reward(config: RewardConfig, device: str = "cpu", trust_remote_code: bool = False,
                 reference_name: str = "reference"):
    """The reward ``config`` trains (:class:`~.composite.Reward`): the scorer and the weighted terms.

    ``reference_name`` names the references the fidelity term compares with (data.reference_column).
    """
    from .composite import Reward

    return Reward.from_config(build_scorer(config, device, trust_remote_code), config, reference_name)


def build_scorer(config: RewardConfig, device: str = "cpu", trust_remote_code: bool = False) -> Scorer:
    """The toxicity scorer of the reward: reward.scorer and its settings."""
    if config.scorer in BUILTIN:
        return BUILTIN[config.scorer](config.transform)
    if config.scorer == "callable":
        return CallableScorer(config.function or "")
    return ClassifierScorer(
        config.model, config.label, config.transform, config.batch_size, device, trust_remote_code
    )


def build_evaluator(spec: str, nontoxic_label: str = NONTOXIC_LABEL, device: str = "cpu") -> Scorer:
    """A held-out evaluator by name: a built-in scorer, or any classifier id/path."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    return ClassifierScorer(spec, nontoxic_label, "prob", device=device, what="evaluator")
