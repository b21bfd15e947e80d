"""Statistics for comparing a trained policy with its reference model.

Everything here is a pure function of its inputs (randomness comes from an
explicit seed), so an evaluation can be recomputed and checked exactly.
Results are plain Python values; undefined quantities (a zero denominator)
are ``None`` so that they survive a round trip through JSON.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TABLE_FIELDS = ("query", "response_before", "response_after", "reward_before", "reward_after", "difference")
_MAX_CHUNK_CELLS = 2_000_000  # bounds the memory of one resampling batch


def _num(x: float) -> float | None:
    """A JSON-safe float: ``None`` where the value is undefined."""
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or ``None`` when the denominator is zero."""
    return None if den == 0 else _num(num / den)


def _chunks(n_resamples: int, n: int):
    """Batch sizes that keep each [batch, n] resampling matrix small."""
    size = max(1, _MAX_CHUNK_CELLS // max(n, 1))
    for start in range(0, n_resamples, size):
        yield min(size, n_resamples - start)


def paired_bootstrap_ci(diffs: np.ndarray, n_resamples: int = 10000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-prompt differences.

    Prompts (not samples) are resampled because the k samples of one prompt are
    correlated; resampling them independently would make the interval too narrow.
    """
    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, d.size, size=(b, d.size))].mean(axis=1)
                            for b in _chunks(n_resamples, d.size)])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def sign_flip_p_value(diffs: np.ndarray, n_resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided paired permutation test of "mean difference is zero".

    Under the null the reference and policy labels of each prompt are
    exchangeable, so each per-prompt difference keeps its size but may flip sign.
    The test is exact (all 2^n flips) when that is no more work than sampling;
    otherwise it uses ``n_resamples`` random flips with the +1 correction, which
    keeps the p-value valid (never zero).
    """
    d = np.asarray(diffs, dtype=float)
    n = d.size
    observed = abs(d.mean()) - 1e-12  # tolerance: ties must count as "as extreme"
    if 2 ** n <= n_resamples:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed))
    rng = np.random.default_rng(seed)
    hits = sum(int(np.sum(np.abs((rng.choice((-1.0, 1.0), size=(b, n)) * d).mean(axis=1)) >= observed))
               for b in _chunks(n_resamples, n))
    return (1 + hits) / (1 + n_resamples)


def _paired_difference(diffs: np.ndarray, n_resamples: int, seed: int) -> dict:
    """Estimate, 95% CI and p-value of the mean of per-prompt differences."""
    low, high = paired_bootstrap_ci(diffs, n_resamples, seed)
    return {"estimate": _num(diffs.mean()), "ci_low": _num(low), "ci_high": _num(high),
            "p_value": _num(sign_flip_p_value(diffs, n_resamples, seed + 1))}


def _as_matrix(x) -> np.ndarray:
    """Scores as [n_prompts, k]; a flat array means one sample per prompt."""
    a = np.asarray(x, dtype=float)
    return a[:, None] if a.ndim == 1 else a


def toxicity_summary(before, after, threshold: float = 0.5, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Compare toxicity of reference (``before``) and policy (``after``) samples.

    Both are [n_prompts, k] toxicity probabilities for the same prompts. A sample
    is toxic when its probability is >= ``threshold``. Differences are
    policy - reference (negative = less toxic), tested per prompt: 95% paired
    bootstrap CI over prompts and a paired sign-flip permutation p-value.

    ``recipe_improvement`` is (before - after) / |before| * 100 of the mean and
    of the standard deviation over all samples; it has no uncertainty attached and
    is reported only for comparison with the published recipe.
    """
    b, a = _as_matrix(before), _as_matrix(after)
    if b.shape != a.shape or b.ndim != 2 or b.size == 0:
        raise ValueError(f"before and after must be equal, non-empty [n_prompts, k] arrays; "
                         f"got {b.shape} and {a.shape}")
    sides = {}
    for name, x in (("reference", b), ("policy", a)):
        sides[name] = {"mean": _num(x.mean()), "std": _num(x.std()), "toxic_rate": _num(np.mean(x > threshold))}
    ref, pol = sides["reference"], sides["policy"]
    mean_diffs = a.mean(axis=1) - b.mean(axis=1)
    rate_diffs = (a > threshold).mean(axis=1) - (b > threshold).mean(axis=1)
    return {
        **sides,
        "difference": {"mean_toxicity": _paired_difference(mean_diffs, n_resamples, seed),
                       "toxic_rate": _paired_difference(rate_diffs, n_resamples, seed + 2)},
        "relative_change": {"mean_toxicity": _ratio(pol["mean"] - ref["mean"], ref["mean"]),
                            "toxic_rate": _ratio(pol["toxic_rate"] - ref["toxic_rate"], ref["toxic_rate"])},
        "recipe_improvement": {"mean_pct": _ratio((ref["mean"] - pol["mean"]) * 100, abs(ref["mean"])),
                               "std_pct": _ratio((ref["std"] - pol["std"]) * 100, abs(ref["std"]))},
    }


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    tokens = text.split()
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique / total n-grams (whitespace tokens) over all texts; 0.0 if none.

    Pooled over the set so that a policy collapsing onto one safe phrase scores
    low even when each single response looks varied.
    """
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 of paired texts (stemmed); 0.0 for no pairs."""
    from rouge_score.rouge_scorer import RougeScorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(keys), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0 for k in keys}


def length_stats(texts: Sequence[str]) -> dict[str, float | None]:
    """Mean, std, min and max length in whitespace tokens (``None`` if no texts)."""
    lengths = np.array([len(t.split()) for t in texts], dtype=float)
    if lengths.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(lengths.mean()), "std": float(lengths.std()),
            "min": float(lengths.min()), "max": float(lengths.max())}


def quality_metrics(texts: Sequence[str], references: Sequence[str] | None = None) -> dict[str, float | None]:
    """The report's quality block for one side: length, diversity and, given references, ROUGE."""
    out = {"length_mean": length_stats(texts)["mean"],
           "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
    if references is not None:
        out.update(rouge_scores(texts, references))
    return out


def qualitative_table(queries: Sequence[str], before: Sequence[str], after: Sequence[str],
                      reward_before: Sequence[float], reward_after: Sequence[float]) -> list[dict]:
    """One row per query, most improved (largest reward_after - reward_before) first."""
    columns = (queries, before, after, reward_before, reward_after)
    if len({len(c) for c in columns}) > 1:
        raise ValueError(f"columns differ in length: {[len(c) for c in columns]}")
    rows = [{"query": q, "response_before": rb, "response_after": ra,
             "reward_before": float(wb), "reward_after": float(wa), "difference": float(wa) - float(wb)}
            for q, rb, ra, wb, wa in zip(*columns)]
    return sorted(rows, key=lambda r: r["difference"], reverse=True)


def write_table_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write a qualitative table as CSV (header always present) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path
