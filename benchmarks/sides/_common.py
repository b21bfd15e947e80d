"""What every side of the benchmark shares: the settings, the random models, the prompts,
the stand-in reward, the peak-RSS reading and the JSON line a side prints.

This file runs inside each side's own virtual environment (different transformers
versions), so it uses only APIs that exist in all of them.

    python _common.py prepare --setting seq2seq [--quick] --out DIR

builds the random model of a setting and saves it (model + tokenizer) to DIR. The runner
does that once per environment, in a process of its own, so that building and saving the
model is not part of any side's timing or peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Sizes of one PPO iteration. Full: the settings the numbers are reported for; quick: a smoke
# run that finishes in seconds.
SIZES = {
    "full": {"batch_size": 16, "prompt_tokens": 160, "response_tokens": 64, "mini_batch_size": 4},
    "quick": {"batch_size": 4, "prompt_tokens": 16, "response_tokens": 8, "mini_batch_size": 2},
}

# flan-t5-base layout (random weights).
T5_FULL = dict(
    vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)
T5_QUICK = dict(
    vocab_size=1024, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)
# SmolLM2-135M layout (random weights).
LLAMA_FULL = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
    rms_norm_eps=1e-5, hidden_act="silu",
)
LLAMA_QUICK = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=512,
    rms_norm_eps=1e-5, hidden_act="silu",
)

LORA = {"r": 32, "lora_alpha": 32, "lora_dropout": 0.05}
LORA_TARGETS = {"seq2seq": ["q", "v"], "causal": ["q_proj", "v_proj"]}
# Special tokens: T5 uses pad=0 (also the decoder start), eos=1, unk=2. The causal layout
# follows SmolLM2: id 0 is <|endoftext|> (bos = eos = pad).
SPECIALS = {"seq2seq": ["<pad>", "</s>", "<unk>"], "causal": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}
FIRST_WORD_ID = 3  # prompts use only ordinary tokens
SEED = 0
LEARNING_RATE = 1.41e-5


@dataclass
class Setting:
    name: str  # seq2seq | causal
    quick: bool
    batch_size: int
    prompt_tokens: int
    response_tokens: int
    mini_batch_size: int
    model: dict

    @property
    def vocab_size(self) -> int:
        return int(self.model["vocab_size"])

    @property
    def is_encoder_decoder(self) -> bool:
        return self.name == "seq2seq"

    @property
    def lora_targets(self) -> list[str]:
        return LORA_TARGETS[self.name]


def setting(name: str, quick: bool) -> Setting:
    if name not in ("seq2seq", "causal"):
        raise SystemExit(f"unknown setting {name!r}")
    sizes = SIZES["quick" if quick else "full"]
    if name == "seq2seq":
        model = T5_QUICK if quick else T5_FULL
    else:
        model = LLAMA_QUICK if quick else LLAMA_FULL
    return Setting(name=name, quick=quick, model=dict(model), **sizes)


def word(i: int) -> str:
    return f"w{i}"


def build_tokenizer(s: Setting):
    """A word-level tokenizer whose vocabulary is exactly the model's: id i <-> "w{i}".

    Prompts are written as words, so each side (ids or text) sees the same token ids, and no
    special token is added around them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[s.name]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({word(i): i for i in range(len(specials), s.vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[2] if s.is_encoder_decoder else specials[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if s.is_encoder_decoder:
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=specials[0], eos_token=specials[0], unk_token=specials[0],
        pad_token=specials[0],
    )


def build_model(s: Setting):
    import torch

    torch.manual_seed(SEED)
    if s.is_encoder_decoder:
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(**s.model, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        return T5ForConditionalGeneration(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**s.model, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def prepare(s: Setting, out: Path) -> Path:
    """Save the random model and its tokenizer to ``out`` (atomically)."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model = build_model(s)
        model.save_pretrained(staging)
        build_tokenizer(s).save_pretrained(staging)
        (staging / "bench-setting.json").write_text(json.dumps(asdict(s), indent=1))
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def prompt_ids(s: Setting, step: int):
    """[batch, prompt_tokens] random ordinary token ids; the same for every side and step index."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(FIRST_WORD_ID, s.vocab_size, (s.batch_size, s.prompt_tokens), generator=g)


def prompt_texts(s: Setting, step: int, n: int | None = None) -> list[str]:
    """The same prompts as text: the tokenizer maps each word back to exactly one id."""
    ids = prompt_ids(s, step)
    rows = ids.tolist() if n is None else ids[:n].tolist()
    return [" ".join(word(i) for i in row) for row in rows]


def stand_in_rewards(n: int, step: int) -> list[float]:
    """The reward stand-in: one deterministic pseudo-random number per response."""
    import random

    rng = random.Random(2000 + step)
    return [rng.gauss(0.0, 1.0) for _ in range(n)]


def setup_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)


def peak_rss_mb() -> float:
    """Peak resident set of this process plus (the largest of) its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0  # Linux reports KiB


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    mid = n // 2
    return values[mid] if n % 2 else 0.5 * (values[mid - 1] + values[mid])


class Clock:
    """perf_counter() stopwatch collecting named phase durations."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def timed(self, name: str):
        clock = self

        class _Timer:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.add(name, time.perf_counter() - self.t)

        return _Timer()


def side_arguments(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--setting", choices=["seq2seq", "causal"], required=True)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--model-dir", required=True, help="a directory written by `_common.py prepare`")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--iterations", type=int, default=1, help="timed iterations (their median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side-name", default=None, help="name to report (default: the script's)")
    if extra:
        extra(parser)
    return parser.parse_args()


def report(side: str, s: Setting, iterations: list[dict[str, float]], extra: dict | None = None) -> dict:
    """Print the one JSON line the runner reads (medians over the timed iterations)."""
    keys = ["generation_s", "reward_s", "reference_s", "optimisation_s", "total_s"]
    result = {"side": side, "setting": s.name, "quick": s.quick}
    for key in keys:
        vals = [it[key] for it in iterations if it.get(key) is not None]
        result[key] = round(median(vals), 4) if vals else None
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["samples_per_s"] = round(s.batch_size / result["total_s"], 4) if result["total_s"] else None
    result["samples_per_iteration"] = s.batch_size
    result["iterations"] = len(iterations)
    details = {}
    for it in iterations:
        for key, value in it.items():
            if key not in keys:
                details.setdefault(key, []).append(value)
    result["extra"] = {k: round(median(v), 4) for k, v in details.items() if all(isinstance(x, (int, float)) for x in v)}
    if extra:
        result["extra"].update(extra)
    result["per_iteration_total_s"] = [round(it["total_s"], 4) for it in iterations]
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return result


def _main() -> None:
    parser = argparse.ArgumentParser(description="prepare a benchmark model directory")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--setting", choices=["seq2seq", "causal"], required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    prepare(setting(args.setting, args.quick), Path(args.out))
    print(json.dumps({"prepared": args.out}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _main()
