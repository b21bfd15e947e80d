"""Fidelity to the dataset's reference response, added to the reward to keep summaries summaries.

A toxicity reward alone can be maximised by leaving the task (generic advice instead of a
summary); ROUGE-L F1 against the reference summary of the same prompt pays for staying on it.

Over all words, ROUGE-L also pays for the references' shared template: DialogSum's summaries all read
"#Person1# ... #Person2# ...", so one stock sentence in that style outscores real summaries. Over
content words only (stop words and speaker tags dropped) it pays for the facts a summary keeps.
"""

from __future__ import annotations

import re

import numpy as np
from rouge_score import tokenizers
from rouge_score.rouge_scorer import RougeScorer
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

_SPEAKER_TAG = re.compile(r"^person\d+$")  # "#Person1#" after rouge-score's lower-casing and punctuation removal


class ContentWordTokenizer(tokenizers.Tokenizer):
    """rouge-score's tokens (lower-cased, stemmed) without English stop words and speaker tags."""

    def __init__(self) -> None:
        self.words = tokenizers.DefaultTokenizer(use_stemmer=False)
        self.stemmed = tokenizers.DefaultTokenizer(use_stemmer=True)

    def tokenize(self, text: str) -> list[str]:
        kept = [w for w in self.words.tokenize(text) if w not in ENGLISH_STOP_WORDS and not _SPEAKER_TAG.match(w)]
        return self.stemmed.tokenize(" ".join(kept))


def rouge_l(responses: list[str], references: list[str], content_words: bool = False) -> np.ndarray:
    """ROUGE-L F1 (stemmed) of each response against its reference, in [0, 1]; over content words only
    with ``content_words``."""
    scorer = RougeScorer(["rougeL"], tokenizer=ContentWordTokenizer()) if content_words \
        else RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, resp)["rougeL"].fmeasure for resp, ref in zip(responses, references)],
                    dtype=np.float32)
