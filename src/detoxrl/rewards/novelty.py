"""Novelty of each response's wording within its batch, added to the reward to keep wording varied.

A strong push on a toxicity reward converges on one safe stock phrasing for every prompt ("In this
conversation, Person1 highlighted the importance of ..."): clean, but it narrows the wording across
prompts. The share of a response's word bigrams that no response to another prompt uses pays for
wording specific to its own dialogue. Responses to the same prompt are not compared with each other,
so the term does not push the k samples of one prompt apart.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_WORD = re.compile(r"\w+")


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The distinct lower-cased word n-grams of a text."""
    words = _WORD.findall(text.lower())
    return set(zip(*(words[i:] for i in range(n))))


def word_bigrams(text: str) -> set[tuple[str, ...]]:
    return word_ngrams(text, 2)


def bigram_novelty(responses: list[str], prompts: list[str], exclude_prompt: bool = False) -> np.ndarray:
    """Share of each response's distinct word bigrams used by no response to a different prompt, in [0, 1];
    with ``exclude_prompt``, only those not copied from its own prompt count, so copying the dialogue's lines
    (and the insults in them) earns no novelty.

    A response with no bigram (empty or one word) scores 0: it has nothing of its own to say.
    """
    if len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} responses but {len(prompts)} prompts")
    bigrams = [word_bigrams(r) for r in responses]
    by_prompt: dict[str, set[tuple[str, str]]] = {}
    for prompt, own in zip(prompts, bigrams):
        by_prompt.setdefault(prompt, set()).update(own)
    # how many prompts' responses use each bigram: a bigram of prompt P is elsewhere when that count exceeds 1
    prompts_using = Counter(b for own in by_prompt.values() for b in own)
    copied = {prompt: word_bigrams(prompt) for prompt in by_prompt} if exclude_prompt else {}
    return np.array([sum(prompts_using[b] == 1 and b not in copied.get(prompt, ()) for b in own) / len(own)
                     if own else 0.0 for own, prompt in zip(bigrams, prompts)], dtype=np.float32)
