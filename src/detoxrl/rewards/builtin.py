"""Offline scorers that ship with their models on PyPI: hatesonar (ONNX) and profanity-check."""

from __future__ import annotations

import numpy as np

from .base import Scorer, reward_from_probability


class HateSonarScorer(Scorer):
    """Davidson et al.'s hate/offensive/neither classifier; non-toxic = "neither".

    The packaged ONNX graph lower-cases text under the en_US.UTF-8 locale, which minimal systems
    lack; we load the graph ourselves and pin that step to C.UTF-8 (same result for this
    model's ASCII vocabulary), so no system locale has to be installed.
    """

    name = "hatesonar"
    NEITHER = 2

    def __init__(self, transform: str = "log_odds") -> None:
        import onnx
        import onnxruntime as ort
        from hatesonar.api import DEFAULT_MODEL_FILE

        graph = onnx.load(str(DEFAULT_MODEL_FILE))
        for node in graph.graph.node:
            if node.op_type == "StringNormalizer" and not any(a.name == "locale" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.transform = transform

    def p_nontoxic(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        _, probs = self.session.run(None, {"text": np.array(texts, dtype=object)})
        return np.array([p[self.NEITHER] for p in probs], dtype=np.float32)

    def rewards(self, texts: list[str]) -> np.ndarray:
        return reward_from_probability(self.p_nontoxic(texts), self.transform)

    def toxicity(self, texts: list[str]) -> np.ndarray:
        return 1.0 - self.p_nontoxic(texts)


class ProfanityScorer(Scorer):
    """alt-profanity-check: a linear SVM over word n-grams, calibrated to a probability."""

    name = "profanity-check"

    def __init__(self, transform: str = "log_odds") -> None:
        from profanity_check import predict_prob

        self.predict_prob, self.transform = predict_prob, transform

    def toxicity(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(self.predict_prob(texts), dtype=np.float32)

    def rewards(self, texts: list[str]) -> np.ndarray:
        return reward_from_probability(1.0 - self.toxicity(texts), self.transform)
