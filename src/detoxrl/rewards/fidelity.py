"""Fidelity to the dataset's reference response, added to the reward to keep summaries summaries.

A toxicity reward alone can be maximised by leaving the task (generic advice instead of a
summary); ROUGE-L F1 against the reference summary of the same prompt pays for staying on it.
"""

from __future__ import annotations

import numpy as np
from rouge_score.rouge_scorer import RougeScorer


def rouge_l(responses: list[str], references: list[str]) -> np.ndarray:
    """ROUGE-L F1 (stemmed) of each response against its reference, in [0, 1]."""
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, resp)["rougeL"].fmeasure for resp, ref in zip(responses, references)],
                    dtype=np.float32)
