"""Guards the reward cannot buy: does each response still point back to its own dialogue, and do the
responses still differ from one prompt to the next?

ROUGE-L and distinct-2 are computed by the reward's own fidelity and novelty terms, so a run trained on
them optimised them. These measures are computed by no reward term:

* **specificity**: the share of responses whose most similar source dialogue (TF-IDF cosine among all
  evaluated dialogues) is their own. A stock sentence scores about 1/N; a real summary or a quote high.
* **opening share**: the share of responses that open with the most common opening (first four words).
  Template collapse ("In this conversation, Person1 ...") raises it.
* **near-duplicate rate**: the share of responses with a near copy (TF-IDF cosine >= 0.8) among the
  responses to *other* prompts; the k samples of one prompt may agree with each other.
* **copy rate**: the share of responses that mostly copy their own dialogue (at least half of their word
  4-grams appear in it verbatim). Specificity cannot tell a copy of the dialogue from a summary of it, and
  novelty pays for a copy's dialogue-specific wording; a few quoted words do not make a copy.

Calibration rows score texts whose quality is known: a constant content-free sentence, each dialogue's
first line, and the reference summary itself, so a reader sees which metrics carry information here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from ..rewards.novelty import word_ngrams

OPENING_WORDS = 4
NEAR_DUPLICATE_COSINE = 0.8
COPY_NGRAM_WORDS = 4
COPIED_SHARE = 0.5


def opening(text: str, words: int = OPENING_WORDS) -> str:
    return " ".join(text.lower().split()[:words])


def specific_to_source(responses: Sequence[str], sources: Sequence[str], samples_per_prompt: int) -> np.ndarray:
    """Per response (prompt-major, k per source): whether its most similar source is its own."""
    vectorizer = TfidfVectorizer(sublinear_tf=True).fit(list(sources) + list(responses))
    similarity = (vectorizer.transform(responses) @ vectorizer.transform(sources).T).toarray()
    own = np.repeat(np.arange(len(sources)), samples_per_prompt)
    # a response with no known word matches nothing: it is not specific, whatever argmax says
    return (similarity.argmax(axis=1) == own) & (similarity.max(axis=1) > 0)


def near_duplicates(responses: Sequence[str], samples_per_prompt: int,
                    threshold: float = NEAR_DUPLICATE_COSINE) -> np.ndarray:
    """Per response: whether a response to another prompt is a near copy of it."""
    if not any(r.strip() for r in responses):
        return np.zeros(len(responses), dtype=bool)
    vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(responses)
    similarity = (vectors @ vectors.T).toarray()
    prompt = np.arange(len(responses)) // samples_per_prompt
    similarity[prompt[:, None] == prompt[None, :]] = 0.0  # a prompt's own samples do not count
    return similarity.max(axis=1) >= threshold


def copied_from_source(responses: Sequence[str], sources: Sequence[str], samples_per_prompt: int,
                       share: float = COPIED_SHARE) -> np.ndarray:
    """Per response (prompt-major, k per source): whether at least ``share`` of its distinct word 4-grams
    appear verbatim in its own source; a response of fewer than four words copies nothing."""
    own = [word_ngrams(source, COPY_NGRAM_WORDS) for source in sources for _ in range(samples_per_prompt)]
    copied = []
    for response, source in zip(responses, own):
        ngrams = word_ngrams(response, COPY_NGRAM_WORDS)
        copied.append(bool(ngrams) and len(ngrams & source) >= share * len(ngrams))
    return np.array(copied, dtype=bool)


def guard_flags(responses: Sequence[str], sources: Sequence[str], samples_per_prompt: int) -> dict[str, np.ndarray]:
    """The per-response guards: specific to its own source, near-duplicated by another prompt's response, and
    copied from its own source."""
    return {"specificity": specific_to_source(responses, sources, samples_per_prompt),
            "near_duplicate_rate": near_duplicates(responses, samples_per_prompt),
            "copy_rate": copied_from_source(responses, sources, samples_per_prompt)}


GUARDS = ("specificity", "opening_share", "near_duplicate_rate", "copy_rate")


def guard_metrics(responses: Sequence[str], flags: dict[str, np.ndarray]) -> dict:
    """The guards (:data:`GUARDS`) of one side's responses, with the counts behind them and the most common
    opening itself."""
    openings = Counter(opening(r) for r in responses if r.strip())
    common, count = openings.most_common(1)[0] if openings else ("", 0)
    specific, duplicates, copied = flags["specificity"], flags["near_duplicate_rate"], flags["copy_rate"]
    return {"specificity": float(specific.mean()), "specific_responses": int(specific.sum()),
            "opening_share": count / len(responses), "most_common_opening": common, "opening_responses": count,
            "near_duplicate_rate": float(duplicates.mean()), "near_duplicate_responses": int(duplicates.sum()),
            "copy_rate": float(copied.mean()), "copied_responses": int(copied.sum()),
            "responses": len(responses)}


def per_prompt(values: np.ndarray, samples_per_prompt: int) -> np.ndarray:
    """Per-response flags as each prompt's mean: the unit a paired bootstrap resamples."""
    return np.asarray(values, dtype=float).reshape(-1, samples_per_prompt).mean(axis=1)


def calibration_texts(sources: Sequence[str], references: Sequence[str] | None, sentence: str) -> dict[str, list[str]]:
    """Pseudo-responses of known quality, one per source: ``sentence`` (eval.calibration_sentence, content-free),
    the dialogue's first line, and (with references) the reference summary."""
    rows = {"constant sentence": [sentence] * len(sources),
            "first line of the dialogue": [next((line for line in s.splitlines() if line.strip()), s).strip()
                                           for s in sources]}
    if references is not None:
        rows["reference summary"] = list(references)
    return rows
