"""One interface for everything that scores texts: rewards for PPO, toxicity for evaluation."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Scorer(ABC):
    """Scores a batch of texts.

    ``rewards`` is what PPO maximises (higher = less toxic). ``toxicity`` is the probability
    of the toxic class, used by evaluation; scorers that have no such probability raise.
    """

    name: str

    @abstractmethod
    def rewards(self, texts: list[str]) -> np.ndarray: ...

    def toxicity(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError(f"scorer {self.name!r} gives rewards, not toxicity probabilities")


def log_odds(p_nontoxic: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 - p)), clipped so a certain classifier gives a large but finite reward."""
    p = np.clip(np.asarray(p_nontoxic, dtype=np.float64), eps, 1 - eps)
    return np.log(p / (1 - p)).astype(np.float32)


def reward_from_probability(p_nontoxic: np.ndarray, transform: str, eps: float = 1e-6) -> np.ndarray:
    """The reward of a scorer that gives only P(non-toxic): its log-odds (also for ``logit``), ``prob``, or
    ``log_prob`` = log P(non-toxic), which is ~0 for every clean text and so stops rewarding clean text for
    getting still cleaner (what pushes summaries towards bland advice) while toxic text keeps its penalty."""
    if transform == "prob":
        return np.asarray(p_nontoxic, dtype=np.float32)
    if transform == "log_prob":
        return np.log(np.clip(np.asarray(p_nontoxic, dtype=np.float64), eps, 1.0)).astype(np.float32)
    return log_odds(p_nontoxic, eps)
