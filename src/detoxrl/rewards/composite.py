"""The reward training optimises: named, weighted terms, each a function with TRL's reward signature.

A term is ``f(prompts, completions, **kwargs) -> list[float]`` (TRL's ``reward_funcs``), so reward
functions written for TRL work as they are. The built-in terms are the toxicity scorer, fidelity
(ROUGE-L against the reference) and novelty (bigrams no other prompt's completion uses); users add
their own with ``reward.terms`` or :meth:`Reward.with_term`. Training, evaluation, the report and the
model card all use this one object, so they state and score the same reward, term by term.

The keyword arguments a term receives: ``references`` (one per completion, or None) and ``batch``
(``{"prompts", "completions", "offset"}``: the whole batch over all processes and where these
completions start in it, for terms that compare a completion with the others).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import Config, RewardConfig, parse_reward_term
from ..errors import DetoxError
from . import BUILTIN
from .base import Scorer
from .custom import import_function
from .novelty import bigram_novelty

RewardFunction = Callable[..., Sequence[float]]


@dataclass(frozen=True)
class RewardTerm:
    name: str
    weight: float
    function: RewardFunction
    description: str  # for the report and the card, e.g. "ROUGE-L against the reference summary"


class Reward:
    """A weighted sum of :class:`RewardTerm`; ``scorer`` is the toxicity scorer among them (its
    ``toxicity`` also feeds the evaluation)."""

    def __init__(self, scorer: Scorer, terms: list[RewardTerm]):
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise DetoxError(f"two reward terms share a name: {', '.join(names)}")
        self.scorer, self.terms = scorer, list(terms)

    @property
    def name(self) -> str:
        return self.scorer.name

    @classmethod
    def from_config(cls, scorer: Scorer, config: RewardConfig, reference_name: str = "reference") -> Reward:
        """The scorer, then the config's fidelity, novelty and user terms (those with a non-zero weight)."""
        functions = {"scorer": scorer_term(scorer, config.score_query, config.score_sentences),
                     "fidelity": fidelity_term(config.fidelity_content_words),
                     "novelty": novelty_term(config.novelty_excludes_prompt)}
        terms = []
        for name, weight, description in planned_terms(config, reference_name):
            function = functions.get(name) or import_function(name, "reward.terms")
            if name not in functions and not takes_trl_arguments(function):
                raise DetoxError(f"reward.terms {name!r} must take (prompts, completions, **kwargs), as TRL's reward "
                                 "functions do")
            terms.append(RewardTerm(name, weight, function, description))
        return cls(scorer, terms)

    def with_term(self, function: RewardFunction, weight: float = 1.0, name: str | None = None) -> Reward:
        """This reward plus ``weight`` x ``function`` (a TRL-style reward function)."""
        name = name or getattr(function, "__name__", "term")
        check_weight(name, weight)
        return Reward(self.scorer, [*self.terms, RewardTerm(name, float(weight), function, f"`{name}`")])

    def describe(self) -> str:
        """The reward as trained, e.g. "profanity-check (log-odds of non-toxic) + 10 x ROUGE-L against ..."."""
        return describe([(t.name, t.weight, t.description) for t in self.terms])

    def weights(self) -> dict[str, float]:
        return {t.name: t.weight for t in self.terms}

    def term_values(self, prompts: list[str], completions: list[str], **context) -> dict[str, np.ndarray]:
        """Each term's value per completion, unweighted; a term that returns the wrong count, non-numbers or
        a NaN is an error naming it."""
        return {t.name: checked(t.name, t.function(list(prompts), list(completions), **context), len(completions),
                                f"scorer {self.scorer.name}" if t.name == "scorer" else f"term {t.name}")
                for t in self.terms}

    def combine(self, values: dict[str, np.ndarray]) -> np.ndarray:
        weights = self.weights()
        return sum(weights[name] * v for name, v in values.items()).astype(np.float32)

    def __call__(self, prompts: list[str], completions: list[str], **context) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(the reward of each completion, each term's values)."""
        values = self.term_values(prompts, completions, **context)
        return self.combine(values), values


def term_log_key(name: str) -> str:
    """The statistic a term's batch mean is logged as: env/scorer_reward_mean, env/fidelity_mean, env/NAME_mean."""
    return "env/scorer_reward_mean" if name == "scorer" else f"env/{name}_mean"


# ----------------------------------------------------------------------------------------------- built-in terms


def scorer_term(scorer: Scorer, score_query: bool, score_sentences: bool = False) -> RewardFunction:
    def toxicity(prompts, completions, **kwargs):
        if score_sentences:
            return least_rewarded_sentence(scorer, completions)
        return scorer.rewards([f"{p} {c}" for p, c in zip(prompts, completions)] if score_query else completions)

    return toxicity


# a sentence ends after . ! or ? (and a closing quote or bracket), or at a line break
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+|\n+")


def sentences(text: str) -> list[str]:
    """The sentences and lines of ``text``, stripped; ``[text]`` when it has none (empty or blank)."""
    return [part for part in map(str.strip, _SENTENCE_BREAK.split(text)) if part] or [text]


def least_rewarded_sentence(scorer: Scorer, texts: list[str]) -> np.ndarray:
    """Each text's reward as its lowest-rewarded sentence's (one scoring call for all sentences).

    A whole-text classifier dilutes an insult in the words around it: profanity-check gives a quoted
    "you fucking idiot" P(toxic) 1.0 alone and 0.93 inside a 50-word summary, ~11 nats apart in log-odds,
    so padding a response with clean text pays almost as much as dropping the insult.
    """
    split = [sentences(text) for text in texts]
    scores = np.asarray(scorer.rewards([s for parts in split for s in parts]), dtype=np.float32).reshape(-1)
    ends = np.cumsum([len(parts) for parts in split])
    return np.array([chunk.min() for chunk in np.split(scores, ends[:-1])], dtype=np.float32) if texts \
        else np.zeros(0, dtype=np.float32)


def fidelity_term(content_words: bool) -> RewardFunction:
    def fidelity(prompts, completions, references=None, **kwargs):
        if references is None:
            raise DetoxError("reward.fidelity_weight needs the reference response of every prompt")
        from .fidelity import rouge_l  # rouge-score and scikit-learn (~0.1 GB) only where the term is used

        return rouge_l(completions, references, content_words)

    return fidelity


def novelty_term(exclude_prompt: bool) -> RewardFunction:
    def novelty(prompts, completions, batch=None, **kwargs):
        """Novelty within the whole batch (all processes' completions) when given, else within these completions."""
        if batch is None:
            return bigram_novelty(completions, prompts, exclude_prompt)
        start = batch["offset"]
        return bigram_novelty(batch["completions"], batch["prompts"], exclude_prompt)[start : start + len(completions)]

    return novelty


# ----------------------------------------------------------------------------------------------- checks and names


def checked(name: str, result, count: int, label: str) -> np.ndarray:
    """``result`` as one finite float32 per completion; ``label`` names the term in the NaN error."""
    try:
        values = np.asarray(result, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise DetoxError(f"reward term {name!r} must return one number per completion, got {str(result)[:80]}") \
            from None
    if len(values) != count:
        raise DetoxError(f"reward term {name!r} returned {len(values)} values for {count} completions")
    bad = ~np.isfinite(values)
    if bad.any():
        raise DetoxError(f"the reward is NaN or infinite for {int(bad.sum())} of {count} texts ({label}); "
                         "fix the function or clip its output")
    return values


def check_weight(name: str, weight) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise DetoxError(f"the weight of reward term {name!r} must be a finite number, got {weight!r}")


def takes_trl_arguments(function: Callable) -> bool:
    """Whether ``function`` can be called as ``f(prompts, completions, **kwargs)``."""
    try:
        inspect.signature(function).bind([], [], references=None, batch=None)
    except TypeError:
        return False
    return True


def planned_terms(config: RewardConfig, reference_name: str = "reference") -> list[tuple[str, float, str]]:
    """(name, weight, description) of each term ``config`` trains, read from the settings alone."""
    unit = "" if config.scorer == "callable" else f" ({reward_unit(config)})"
    scorer = {"classifier": f"classifier `{config.model}`", "callable": f"`{config.function}`"}.get(
        config.scorer, config.scorer)
    scored = " on query + response" if config.score_query else " of the response's least clean sentence" \
        if config.score_sentences else ""
    terms = [("scorer", 1.0, f"{scorer}{unit}{scored}")]
    if config.fidelity_weight:
        words = " over content words" if config.fidelity_content_words else ""
        terms.append(("fidelity", config.fidelity_weight, f"ROUGE-L{words} against the reference {reference_name}"))
    if config.novelty_weight:
        copied = " (bigrams copied from the prompt excluded)" if config.novelty_excludes_prompt else ""
        terms.append(("novelty", config.novelty_weight, f"bigram novelty{copied}"))
    for spec in config.terms:
        function_spec, weight = parse_reward_term(spec)
        terms.append((function_spec, weight, f"`{function_spec}`"))
    return terms


def describe(terms: list[tuple[str, float, str]]) -> str:
    return " + ".join(description if weight == 1 and name == "scorer" else f"{weight:g} x {description}"
                      for name, weight, description in terms)


def reward_description(config: Config) -> str:
    """The reward a run's settings train, term by term with its weights (as :meth:`Reward.describe`)."""
    return describe(planned_terms(config.reward, config.data.reference_column or "reference"))


def reward_unit(reward: RewardConfig) -> str:
    """What one unit of the toxicity scorer's reward is, for labels."""
    if reward.scorer == "callable":
        return f"as returned by {reward.function}"
    label = "non-toxic" if reward.scorer in BUILTIN else f"class {reward.label!r}"
    transform = "log_odds" if reward.scorer in BUILTIN and reward.transform == "logit" else reward.transform
    return {"logit": f"logit of {label}", "log_odds": f"log-odds of {label}", "prob": f"probability of {label}",
            "log_prob": f"log-probability of {label}"}[transform]
