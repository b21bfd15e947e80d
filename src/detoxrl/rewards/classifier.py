"""Any Hugging Face sequence classifier as a reward, with the rewarded class chosen by name."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..config import NONTOXIC_LABEL
from ..errors import DetoxError
from ..hub import load_pretrained
from .base import Scorer


def label_index(id2label: dict[int, str], label: str, what: str = "reward classifier") -> int:
    """Index of ``label`` (case-insensitive); a clear error lists the labels the model has."""
    for index, name in id2label.items():
        if name.lower() == label.lower():
            return int(index)
    names = ", ".join(str(n) for n in id2label.values())
    raise DetoxError(f"label {label!r} is not a class of the {what}; its labels are: {names}")


def reward_from_logits(logits: torch.Tensor, index: int, transform: str) -> torch.Tensor:
    """The rewarded class's raw logit (the recipe), its log-odds, its probability or its log-probability.

    The recipe took element 0 of a pipeline output sorted by score, i.e. the *winning* class,
    which rewards the hate logit whenever the text is hateful; here the class is fixed by name.
    """
    logits = logits.float()
    if transform == "logit":
        return logits[:, index]
    if transform == "prob":
        return torch.softmax(logits, dim=-1)[:, index]
    if transform == "log_prob":
        return torch.log_softmax(logits, dim=-1)[:, index]
    others = torch.cat([logits[:, :index], logits[:, index + 1 :]], dim=-1)
    return logits[:, index] - torch.logsumexp(others, dim=-1)


class ClassifierScorer(Scorer):
    def __init__(
        self,
        model: str,
        label: str = NONTOXIC_LABEL,
        transform: str = "logit",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        what: str = "reward classifier",
    ):
        self.name = model
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, model, f"{what} tokenizer", trust_remote_code=trust_remote_code
        )
        self.model = load_pretrained(
            AutoModelForSequenceClassification.from_pretrained,
            model,
            what,
            trust_remote_code=trust_remote_code,
        ).to(device).eval()
        self.index = label_index(self.model.config.id2label, label, what)
        self.transform, self.batch_size, self.device = transform, batch_size, device

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            chunks.append(self.model(**batch).logits.float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.num_labels)

    def rewards(self, texts: list[str]) -> np.ndarray:
        return reward_from_logits(self.logits(texts), self.index, self.transform).numpy()

    def toxicity(self, texts: list[str]) -> np.ndarray:
        return 1.0 - torch.softmax(self.logits(texts), dim=-1)[:, self.index].numpy()
