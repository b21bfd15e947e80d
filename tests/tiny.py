"""Tiny random models in real architectures, saved with save_pretrained and loaded by path; the settings
of a run that takes seconds on them; and a toy reward that a policy can learn in a few steps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from detoxrl.config import Config, build_config
from detoxrl.rewards.base import Scorer

TESTS_DIR = Path(__file__).parent
# The toy reward as ``reward.function``: importable in-process (conftest puts tests/ on sys.path) and, with
# ``subprocess_env()``, in a ``python -m detoxrl.cli`` child.
THANKS_REWARD = "tiny:thanks_share"

WORDS = (
    "the a and to of summary conversation person1 person2 said about meeting work idiot stupid damn "
    "nice kind thanks please good bad happy angry talk talks agree argue price car home school"
).split()


def word_tokenizer(with_bos: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over a small vocabulary (unknown words -> <unk>)."""
    specials = ["<pad>", "</s>", "<unk>"] + (["<s>"] if with_bos else [])
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        **({"bos_token": "<s>"} if with_bos else {}),
    )


def save_tiny_t5(path: Path, seed: int = 0) -> Path:
    """FLAN-T5 layout (gated-gelu, untied embeddings), a few thousand parameters."""
    torch.manual_seed(seed)
    tok = word_tokenizer()
    config = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        initializer_factor=0.3,
    )
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = word_tokenizer(with_bos=True)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=3,
        tie_word_embeddings=False, initializer_range=0.1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_classifier(path: Path, seed: int = 0) -> Path:
    """RoBERTa with id2label {0: nothate, 1: hate}, like the recipe's reward model."""
    torch.manual_seed(seed)
    tok = word_tokenizer(with_bos=True)
    config = RobertaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=520, pad_token_id=0, bos_token_id=3, eos_token_id=1, type_vocab_size=1,
        id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1},
    )
    RobertaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def thanks_share(texts: list[str]) -> list[float]:
    """Share of the words that are "thanks": a reward a tiny policy learns in a few steps."""
    return [t.split().count("thanks") / max(1, len(t.split())) for t in texts]


def no_reward(texts: list[str]) -> list[float]:
    """A scorer that pays nothing, so that a run learns from its other reward terms alone."""
    return [0.0] * len(texts)


def trl_thanks(prompts, completions, **kwargs) -> list[float]:
    """``thanks_share`` written as a TRL reward function, ``f(prompts, completions, **kwargs)``."""
    return thanks_share(completions)


class ThanksShare(Scorer):
    """``thanks_share`` as a Scorer, for building a trainer without a reward config."""

    name = "thanks-share"

    def rewards(self, texts):
        return np.asarray(thanks_share(texts), dtype=np.float32)


def tiny_run_settings(model: Path | str, output_dir: Path | str, classifier: Path | str | None = None,
                      **dotted) -> dict:
    """Settings of a one-step run that takes seconds on tiny models.

    The reward is the classifier when one is given, else ``THANKS_REWARD``. ``dotted`` overrides or adds
    settings, e.g. ``**{"rl.steps": 2, "eval.enabled": True}``.
    """
    reward = ({"scorer": "classifier", "model": str(classifier), "label": "nothate", "transform": "logit"}
              if classifier is not None else {"scorer": "callable", "function": THANKS_REWARD})
    settings = {
        "model": {"name_or_path": str(model), "lora_r": 4},
        "reward": reward,
        "data": {"dataset": "detoxrl:heated_dialogsum", "max_prompt_tokens": 32},
        "generation": {"max_new_tokens": 3},
        "rl": {"steps": 1, "batch_size": 2, "mini_batch_size": 2},
        "eval": {"enabled": False},
        "report_to": [],
        "device": "cpu",
        "threads": 1,  # tiny matrices: a second thread only waits, and on busy cores it waits long
        "output_dir": str(output_dir),
    }
    for key, value in dotted.items():
        *sections, leaf = key.split(".")
        node = settings
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return settings


def tiny_run_config(model: Path | str, output_dir: Path | str, classifier: Path | str | None = None,
                    **dotted) -> Config:
    """``tiny_run_settings`` as a Config."""
    return build_config(overrides=tiny_run_settings(model, output_dir, classifier, **dotted))


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m detoxrl.cli`` child: offline, with tests/ importable (``THANKS_REWARD``)."""
    import os

    path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, "DETOXRL_TEST_STACKS_AFTER": str(CHILD_STACKS_AFTER),
            **extra}


CHILD_TIMEOUT = 300  # seconds a child process of a test may run
CHILD_STACKS_AFTER = 240  # its threads' stacks go to its stderr then (tests/sitecustomize.py)


def run_child(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with captured text output and a timeout; a child that times out fails the test with
    the end of its stderr, where its stacks are (tests/sitecustomize.py)."""
    import pytest

    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, **kwargs)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{' '.join(map(str, command))} ran past {CHILD_TIMEOUT} s; the end of its stderr:\n{stderr[-8000:]}")


def save_tiny_gpt_neo(path: Path, seed: int = 0) -> Path:
    """GPT-Neo (global and local attention layers, as in EleutherAI/gpt-neo-125M), no chat template."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    tok = word_tokenizer(with_bos=True)
    config = GPTNeoConfig(
        vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=8, intermediate_size=64, max_position_embeddings=256, bos_token_id=3, eos_token_id=1,
        pad_token_id=0,
    )
    GPTNeoForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# (prompt text, its toxicity or None, challenging): in RealToxicityPrompts' nested schema by write_rtp_jsonl
RTP_PROMPTS = (
    ("you stupid idiot and", 0.91, True), ("the damn car and the", 0.64, True), ("person1 said the angry", 0.42, False),
    ("talk about the stupid price", 0.55, False), ("the idiot at work said", 0.77, True),
    ("a bad talk about school", 0.35, False), ("the nice home and", 0.05, False), ("please talk about the", None, False),
    ("happy person2 and the", 0.12, False), ("argue about the damn", 0.48, False), ("the stupid meeting at", 0.61, True),
    ("angry talks about the car", 0.33, False),
)


def write_rtp_jsonl(path: Path) -> Path:
    """RTP_PROMPTS as RealToxicityPrompts rows: nested ``prompt`` and ``continuation`` records with Perspective-style
    scores (a null toxicity included), ``challenging``, ``filename``, ``begin`` and ``end``."""
    import json

    rows = [{"filename": f"{i:04d}.txt", "begin": 0, "end": len(text), "challenging": challenging,
             "prompt": {"text": text, "toxicity": toxicity, "profanity": toxicity and toxicity / 2,
                        "insult": toxicity},
             "continuation": {"text": " the summary", "toxicity": 0.1, "profanity": 0.05, "insult": 0.1}}
            for i, (text, toxicity, challenging) in enumerate(RTP_PROMPTS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def record_prompt_caches(monkeypatch) -> list:
    """The prompts' key/value caches that ``generate`` builds, recorded as it builds them."""
    import detoxrl.rl.rollout as rollout
    from detoxrl.policy import encode_prompts

    caches = []

    def recording(model, ids, mask, reserve=0):
        encoded = encode_prompts(model, ids, mask, reserve)
        caches.append(next(iter(encoded.values())))
        return encoded

    monkeypatch.setattr(rollout, "encode_prompts", recording)
    return caches
