"""The reward training optimises, term by term: the scorer, plus the weighted fidelity and novelty terms.

Training and evaluation both compute it here, so the evaluation reports the reward that was trained.
"""

from __future__ import annotations

import numpy as np

from ..config import Config, RewardConfig
from ..errors import DetoxError
from . import BUILTIN
from .base import Scorer
from .fidelity import rouge_l
from .novelty import bigram_novelty


def reward_terms(
    scorer: Scorer, queries: list[str], responses: list[str], config: RewardConfig,
    references: list[str] | None = None, novelty: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Each term with a non-zero weight, unweighted, one value per response: ``scorer`` (of the response, or
    of query + response with ``score_query``), ``fidelity`` (ROUGE-L against the reference), ``novelty``."""
    texts = [f"{q} {r}" for q, r in zip(queries, responses)] if config.score_query else responses
    terms = {"scorer": np.asarray(scorer.rewards(texts), dtype=np.float32)}
    if config.fidelity_weight:
        if references is None:
            raise DetoxError("reward.fidelity_weight needs the reference response of every prompt")
        terms["fidelity"] = rouge_l(responses, references)
    if config.novelty_weight:
        if novelty is None or len(novelty) != len(responses):
            raise DetoxError("reward.novelty_weight needs the bigram novelty of every response")
        terms["novelty"] = np.asarray(novelty, dtype=np.float32)
    return terms


def combine(terms: dict[str, np.ndarray], config: RewardConfig, scorer_name: str) -> np.ndarray:
    """The weighted sum of :func:`reward_terms`; a NaN or infinite result is an error naming the scorer."""
    weights = {"scorer": 1.0, "fidelity": config.fidelity_weight, "novelty": config.novelty_weight}
    values = sum(weights[name] * values for name, values in terms.items())
    bad = ~np.isfinite(values)
    if bad.any():
        raise DetoxError(
            f"the reward is NaN or infinite for {int(bad.sum())} of {len(values)} texts (scorer {scorer_name}); "
            "fix the scorer or clip its output"
        )
    return values.astype(np.float32)


def grouped_novelty(responses: list[str], prompts: list[str], prompts_per_group: int) -> np.ndarray:
    """:func:`bigram_novelty` within consecutive groups of ``prompts_per_group`` prompts (all their responses),
    as training computes it within each batch; for evaluating many prompts on the training batch's scale."""
    starts = [i for i, p in enumerate(prompts) if i == 0 or p != prompts[i - 1]]
    bounds = starts[::prompts_per_group] + [len(prompts)]
    return np.concatenate([bigram_novelty(responses[a:b], prompts[a:b]) for a, b in zip(bounds, bounds[1:])]
                          or [np.zeros(0, dtype=np.float32)])


def reward_description(config: Config) -> str:
    """The reward that was trained, term by term with its weights, from the run's config: one wording for
    every place that names the reward, so that none shortens a composite to its scorer."""
    reward = config.reward
    terms = [_scorer_term(reward)]
    if reward.fidelity_weight:
        terms.append(f"{reward.fidelity_weight:g} x ROUGE-L against the reference {config.data.reference_column}")
    if reward.novelty_weight:
        terms.append(f"{reward.novelty_weight:g} x bigram novelty")
    return " + ".join(terms)


def _scorer_term(reward: RewardConfig) -> str:
    """The scorer, its unit, and what it reads: only it sees the query when reward.score_query is set."""
    name = {"classifier": f"classifier `{reward.model}`", "callable": f"`{reward.function}`"}.get(
        reward.scorer, reward.scorer)
    unit = "" if reward.scorer == "callable" else f" ({reward_unit(reward)})"
    return f"{name}{unit}{' on query + response' if reward.score_query else ''}"


def reward_unit(reward: RewardConfig) -> str:
    """What one unit of the training reward is, for labels."""
    if reward.scorer == "callable":
        return f"as returned by {reward.function}"
    label = "non-toxic" if reward.scorer in BUILTIN else f"class {reward.label!r}"
    transform = "log_odds" if reward.scorer in BUILTIN and reward.transform == "logit" else reward.transform
    return {"logit": f"logit of {label}", "log_odds": f"log-odds of {label}", "prob": f"probability of {label}",
            "log_prob": f"log-probability of {label}"}[transform]
