"""Tiny random models in real architectures, saved with save_pretrained and loaded by path."""

from __future__ import annotations

from pathlib import Path

import torch
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
