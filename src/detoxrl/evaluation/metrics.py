"""The evaluation's metrics, declared once: what each is called, how it is shown, and what it counts.

The report, the model card and ``detoxrl compare`` all read their rows from here, so a metric has one
label, one format and one counting rule wherever it appears. Keys are those of ``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

TRAINED_ON = "trained on: not a guard"


@dataclass(frozen=True)
class Metric:
    """One metric of ``metrics.json``.

    ``unit`` "%" shows a share as a percentage (differences in points); another unit is named after the
    label. ``level`` says which toxic events are counted beside it: a per-prompt metric's are toxic prompts
    of all prompts, the others' toxic samples of all samples (see stats.side_summary). ``reward_term`` names
    the term of the composite reward (rewards/composite.py) that computes it: a run trained on that term
    optimised the metric, so it no longer guards against what the reward overlooks.
    """

    key: str
    label: str
    unit: str = ""
    better: Literal["lower", "higher", "neither"] = "neither"
    level: Literal["prompt", "sample"] = "sample"
    spec: str = ".3f"
    side_key: str = ""  # its key in a side's summary, where that differs from ``key``
    reward_term: str | None = None
    guard: bool = False  # one of the quality guards that a headline shows

    @property
    def name(self) -> str:
        """The label with its unit, e.g. "mean length (words)"."""
        return self.label if self.unit in ("", "%") else f"{self.label} ({self.unit})"

    def value(self, side: Mapping) -> float | None:
        """The metric in one side's block of ``metrics.json``; None when missing or not a finite number."""
        x = side.get(self.side_key or self.key)
        return float(x) if _finite(x) else None

    def count(self, side: Mapping) -> tuple[int, int] | None:
        """The toxic events behind the metric in one side's block, (toxic, all); None when it has no counts."""
        toxic, total = side.get(f"toxic_{self.level}s"), side.get(f"{self.level}s")
        return (toxic, total) if _int(toxic) and _int(total) else None

    def format(self, x, missing: str = "—") -> str:
        """A value as shown: a percentage for shares, ``spec`` otherwise."""
        if not _finite(x):
            return missing
        return f"{x * 100:{self.spec}}%" if self.unit == "%" else f"{x:{self.spec}}"

    def format_change(self, x, missing: str = "—", unit: bool = True) -> str:
        """A signed difference: percentage points for shares ("-26.8 pp"; ``unit=False`` leaves "pp" out)."""
        if not _finite(x):
            return missing
        if self.unit == "%":
            return f"{x * 100:+{self.spec}}{' pp' if unit else ''}"
        return f"{x:+{self.spec}}"

    def format_interval(self, diff: Mapping, missing: str = "—") -> str:
        """A difference of stats.toxicity_summary with its 95% CI: "-26.8 pp [-34.0, -19.6]"."""
        low, high = (self.format_change(diff.get(k), missing, unit=False) for k in ("ci_low", "ci_high"))
        return f"{self.format_change(diff.get('estimate'), missing)} [{low}, {high}]"


TOXICITY_PROBABILITY = Metric("toxicity_probability", "toxicity probability", "%", "lower", "prompt", ".1f")
EXPECTED_MAX_TOXICITY = Metric("expected_max_toxicity", "expected max toxicity", "", "lower", "prompt", ".3f")
TOXIC_RATE = Metric("toxic_rate", "toxic rate", "%", "lower", "sample", ".1f")
# stats.side_summary stores it as "mean"; the differences, relative changes and learning curves as "mean_toxicity"
MEAN_TOXICITY = Metric("mean_toxicity", "mean toxicity", "", "lower", "sample", ".3f", side_key="mean")
TOXICITY = (TOXICITY_PROBABILITY, EXPECTED_MAX_TOXICITY, TOXIC_RATE, MEAN_TOXICITY)

LENGTH = Metric("length_mean", "mean length", "words", spec=".1f", guard=True)
QUALITY = (
    LENGTH,
    Metric("empty_responses", "empty responses", "count", "lower", spec=".0f"),
    Metric("repeated_token_responses", "repeated-token responses", "count", "lower", spec=".0f"),
    Metric("distinct_1", "distinct-1 (pooled)", better="higher"),
    Metric("distinct_2", "distinct-2 (pooled)", better="higher", reward_term="novelty", guard=True),
    Metric("distinct_3", "distinct-3 (pooled)", better="higher"),
    Metric("distinct_1_per_prompt", "distinct-1 (per prompt)", better="higher", level="prompt"),
    Metric("distinct_2_per_prompt", "distinct-2 (per prompt)", better="higher", level="prompt"),
    Metric("distinct_3_per_prompt", "distinct-3 (per prompt)", better="higher", level="prompt"),
    Metric("rouge1", "ROUGE-1 F1", better="higher"),
    Metric("rouge2", "ROUGE-2 F1", better="higher"),
    Metric("rougeL", "ROUGE-L F1", better="higher", reward_term="fidelity", guard=True),
    Metric("perplexity", "perplexity under the reference model", better="lower", spec=".2f", guard=True),
    Metric("perplexity_fluency_model", "perplexity under the fluency model", better="lower", spec=".2f"),
    Metric("kl_mean", "KL to reference", "nats/response", "lower", guard=True),
    # computed by no reward term (evaluation/guards.py)
    Metric("specificity", "specificity (own dialogue retrieved)", "%", "higher", spec=".1f", guard=True),
    Metric("opening_share", "most common opening's share", "%", "lower", spec=".1f", guard=True),
    Metric("near_duplicate_rate", "near-duplicates across prompts", "%", "lower", spec=".1f", guard=True),
    Metric("copy_rate", "copied from the dialogue", "%", "lower", spec=".1f", guard=True),
)
BY_KEY = {m.key: m for m in TOXICITY + QUALITY}


def metric(key: str) -> Metric:
    """The catalogue's metric of ``key``; a key it does not know is shown as it is, to 4 significant digits."""
    return BY_KEY.get(key) or Metric(key, key, spec=".4g")


def trained_terms(evaluation: Mapping) -> frozenset[str]:
    """The reward terms ("scorer", "fidelity", "novelty") the evaluated run was trained on, as its evaluation
    recorded them; none for an evaluation written before it recorded them."""
    return frozenset((evaluation.get("reward_terms") or {}).get("policy") or ())


def is_reward_term(m: Metric, terms: Collection[str]) -> bool:
    """Whether the reward of a run trained on ``terms`` computes ``m``: the run optimised it, so it is no guard."""
    return m.reward_term is not None and m.reward_term in terms


def verdict(m: Metric, low, high) -> Literal["good", "bad", ""]:
    """Whether an interval of differences (policy − reference) lies wholly on ``m``'s better or worse side of
    zero; "" when it includes zero, is missing, or the metric has no better direction."""
    sign = {"lower": -1, "higher": 1}.get(m.better)
    if sign is None or not (_finite(low) and _finite(high)):
        return ""
    if sign * low > 0 and sign * high > 0:
        return "good"
    if sign * low < 0 and sign * high < 0:
        return "bad"
    return ""


def format_p(diff: Mapping, spec: str = ".3f") -> str | None:
    """The p-value of a difference (stats.toxicity_summary) as shown: ``spec``, small ones in scientific
    notation, and one at its resampling floor (no resample as extreme; ``p_floor``) as that bound, e.g.
    "≤ 2/10001", since its true value is smaller; None when missing."""
    p, floor = diff.get("p_value"), diff.get("p_floor")
    if not _finite(p):
        return None
    if _finite(floor) and p <= floor * (1 + 1e-9):
        return f"≤ 2/{round(2 / floor)}"
    return f"{p:.1e}" if p < 0.001 else f"{p:{spec}}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
