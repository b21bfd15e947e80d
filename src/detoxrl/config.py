"""Configuration: one dataclass per concern, YAML presets, command-line overrides.

A run is fully described by a :class:`Config`; it is saved next to the outputs as
``config.yaml`` so a run can be reproduced or resumed from its directory alone.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import DetoxError
from .rl.algorithms import ALGORITHMS, algorithm_class

RECIPE_PROMPT = "Summarize the following conversation.\n\n{text}\n\nSummary:\n"
# The non-toxic class of the recipe's classifier (facebook/roberta-hate-speech-dynabench-r4-target): the
# rewarded class of the reward classifier and the non-toxic class of classifier evaluators, unless set.
NONTOXIC_LABEL = "nothate"


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (shown by ``detoxrl train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "Policy: hub id, local directory, or .gguf file.")
    gguf_file: str | None = _f(None, "GGUF file name inside name_or_path (hub repo or directory).")
    adapter: str | None = _f(None, "Existing PEFT adapter to start from (made trainable).")
    reference: str | None = _f(
        None, "Separate KL reference model; default: the policy's base with the adapter disabled."
    )
    lora_r: int = _f(32, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout (stored in the adapter; PPO passes run without dropout).")
    target_modules: list[str] | None = _f(None, "LoRA target modules (or all-linear); default: peft's choice per architecture (q,v).")
    chat_template: bool | None = _f(None, "Wrap prompts in the tokenizer's chat template (default: if it has one).")
    system_prompt: str | None = _f(None, "System message for chat templates.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless asked).")
    cache_dir: str | None = _f(None, "Where GGUF models converted to safetensors are cached.")
    dtype: str = _f("float32", "Frozen base weights: float32 | bfloat16 | float16 | auto (bfloat16 where the device "
                               "has fast bf16 matmuls, else float32). LoRA, value head and losses stay float32.")
    gradient_checkpointing: bool = _f(False, "Recompute each layer's activations in the backward pass: less "
                                             "memory in the update, one more forward pass of time.")
    recompute_prompts: bool = _f(False, "Recompute the prompts' layer activations in the update's backward pass, "
                                        "one layer at a time: much less memory where prompts are long and responses "
                                        "short, for one more forward pass over the prompts.")


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Other names of the same dtypes, for the error that names the setting to use instead.
DTYPE_NAMES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def check_model_dtype(value: str) -> None:
    """Refuse a ``model.dtype`` that names no dtype detoxrl loads, naming the one meant where it can tell."""
    if value not in MODEL_DTYPES:
        meant = DTYPE_NAMES.get(str(value).lower().removeprefix("torch."), "")
        raise DetoxError(f"model.dtype must be one of {', '.join(MODEL_DTYPES)}, got {value!r}"
                         + (f"; use {meant}" if meant else ""))


@dataclass
class RewardConfig:
    scorer: str = _f("classifier", "classifier | hatesonar | profanity-check | callable")
    model: str = _f("facebook/roberta-hate-speech-dynabench-r4-target", "Classifier hub id or path.")
    label: str = _f(NONTOXIC_LABEL, "Rewarded (non-toxic) class of the classifier, by label name.")
    transform: str = _f("logit", "Reward from the non-toxic class: logit (the recipe; log-odds for the built-in "
                                 "scorers) | log_odds | prob | log_prob (~0 for any clean text).")
    function: str | None = _f(None, "module:function returning one reward per text (scorer=callable).")
    score_query: bool = _f(False, "Score query + response together, as the recipe did.")
    score_sentences: bool = _f(False, "Score each sentence and line of the response alone and reward its most toxic "
                                      "one: an insult costs the same however much clean text surrounds it.")
    fidelity_weight: float = _f(0.0, "Add this weight x ROUGE-L F1 against the prompt's reference response "
                                     "(data.reference_column) to the reward; 0 turns it off.")
    fidelity_content_words: bool = _f(False, "Fidelity's ROUGE-L over content words only (stop words and speaker "
                                             "tags such as #Person1# dropped): pays for a summary's facts, not its "
                                             "template.")
    novelty_weight: float = _f(0.0, "Add this weight x the share of the response's word bigrams that no response "
                                    "to another prompt of the batch uses (against one stock phrasing); 0 turns it off.")
    novelty_excludes_prompt: bool = _f(False, "Novelty does not count bigrams the response copies from its own "
                                              "prompt: copying the dialogue (and its insults) is not new wording.")
    terms: list[str] = _f([], "More reward terms: module:function[=WEIGHT] (weight 1 by default), each a function "
                              "f(prompts, completions, **kwargs) -> list of floats, as TRL's reward functions.")
    batch_size: int = _f(32, "Texts per scoring batch.")


def parse_reward_term(spec: str) -> tuple[str, float]:
    """``"module:function=0.5"`` -> ``("module:function", 0.5)``; the weight must be a finite number."""
    function, _, weight = spec.partition("=")
    try:
        value = float(weight) if weight else 1.0
    except ValueError:
        value = math.nan
    if not function.strip() or ":" not in function or not math.isfinite(value):
        raise DetoxError(f"reward.terms entries look like module:function or module:function=WEIGHT with a finite "
                         f"weight, got {spec!r}")
    return function.strip(), value


ROW_FILTER = re.compile(r"\s*(?P<column>[\w.-]+)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>\S+)\s*")
COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
               "!=": operator.ne}


def parse_row_filter(spec: str) -> tuple[str, str, float]:
    """``"prompt.toxicity > 0.3"`` -> ``("prompt.toxicity", ">", 0.3)``: one comparison of a column (letters,
    digits, ``_``, ``.``, ``-``) with a finite number, read by a pattern (never evaluated as code)."""
    match = ROW_FILTER.fullmatch(spec)
    try:
        value = float(match["value"]) if match else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DetoxError(f"data.filter must look like COLUMN OP NUMBER with OP one of {' '.join(COMPARISONS)} "
                         f"(e.g. 'prompt.toxicity > 0.3'), got {spec!r}")
    return match["column"], match["op"], value


@dataclass
class DataConfig:
    dataset: str = _f("knkarthick/dialogsum", "Hub dataset id or local .jsonl/.csv/.parquet file.")
    split: str = _f("train", "Split to load from a hub dataset.")
    text_column: str = _f("dialogue", "Column holding the text to put in the prompt; a nested field is named with "
                                      "dots (prompt.text in RealToxicityPrompts).")
    reference_column: str | None = _f("summary", "Column of reference responses (for ROUGE), if any.")
    filter: str | None = _f(None, "Keep only the rows where COLUMN OP NUMBER holds, OP one of >= > <= < == !=, e.g. "
                                  "'prompt.toxicity > 0.3'; rows with no value there are dropped.")
    prompt_template: str = _f(RECIPE_PROMPT, "Prompt template; {text} is replaced by the text column ('{text}' alone: "
                                             "the text as it is, e.g. for continuation).")
    min_chars: int = _f(200, "Keep texts longer than this many characters.")
    max_chars: int = _f(1000, "Keep texts of at most this many characters.")
    test_size: float = _f(0.2, "Held-out fraction for the before/after comparison.")
    split_seed: int = _f(0, "Seed of the train/test split; fixed apart from `seed` so that runs with different "
                            "training seeds are judged on the same test prompts.")
    max_prompt_tokens: int = _f(512, "Prompts are truncated to this many tokens.")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(64, "Longest response.")
    min_new_tokens: int = _f(0, "Shortest response (EOS is masked consistently in generation and PPO).")
    temperature: float = _f(1.0, "Sampling temperature (applied consistently in generation and PPO).")
    top_k: int = _f(0, "Must stay 0: truncated sampling makes the KL and PPO ratio wrong.")
    top_p: float = _f(1.0, "Must stay 1.0: truncated sampling makes the KL and PPO ratio wrong.")
    repetition_penalty: float = _f(1.0, "Must stay 1.0: it changes the sampling distribution.")


@dataclass
class RLConfig:
    algorithm: str = _f("ppo", "Training algorithm, by its registered name (README \"Algorithms\" describes each).")
    steps: int = _f(10, "Training steps (one batch of rollouts each).")
    learning_rate: float = _f(1.41e-5, "Adam learning rate.")
    lr_scheduler: str = _f("constant", "transformers scheduler name: constant, linear, cosine, ...")
    batch_size: int = _f(16, "Rollouts per step over all processes (prompts x samples_per_prompt).")
    samples_per_prompt: int = _f(1, "Responses sampled per prompt (k); rloo and grpo need at least 2.")
    mini_batch_size: int = _f(4, "Rollouts per optimiser step, over all processes.")
    update_epochs: int = _f(1, "Passes over each batch of rollouts.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches of one mini-batch accumulated into one optimiser step (rl.mini_batch_size / this rows each).")
    cliprange: float = _f(0.2, "Policy ratio clip.")
    init_kl_coef: float = _f(0.2, "KL coefficient: per-token reward penalty (ppo), sequence reward penalty (rloo), "
                                  "loss weight (grpo).")
    adaptive_kl: bool = _f(True, "Adapt the KL coefficient towards target_kl.")
    target_kl: float = _f(6.0, "Target KL per response for the adaptive controller.")
    kl_horizon: int = _f(10000, "Horizon of the adaptive KL controller.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    whiten_advantages: bool | None = _f(None, "Normalise advantages per batch (default: yes for ppo, no for rloo).")
    loss_normalization: str = _f("token", "token (mean over all tokens) | sequence (mean per response, then over "
                                          "responses).")
    scale_rewards: bool = _f(True, "grpo: divide advantages by the group's standard deviation.")
    gamma: float = _f(1.0, "ppo: discount.")
    lam: float = _f(0.95, "ppo: GAE lambda.")
    cliprange_value: float = _f(0.2, "ppo: value clip.")
    vf_coef: float = _f(0.1, "ppo: value loss weight.")
    value_head_lr_scale: float = _f(1.0, "ppo: value head learning rate relative to learning_rate.")


LOSS_NORMALIZATIONS = ("token", "sequence")
SCORERS = ("classifier", "hatesonar", "profanity-check", "callable")
TRANSFORMS = ("logit", "log_odds", "prob", "log_prob")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class EvalConfig:
    enabled: bool = _f(True, "Run the before/after evaluation at the end of training.")
    evaluators: list[str] = _f(
        ["hatesonar"], "Held-out scorers: hatesonar, profanity-check, or a classifier id/path."
    )
    nontoxic_label: str = _f(NONTOXIC_LABEL, "Non-toxic label of classifier evaluators.")
    samples_per_prompt: int = _f(1, "Responses per prompt and model.")
    temperature: float | None = _f(None, "Sampling temperature of the evaluation (default: generation.temperature).")
    top_p: float | None = _f(None, "Nucleus sampling in the evaluation only, in (0, 1] (default 1: the full "
                                   "distribution, as training samples). Below 1 no KL to the reference is reported.")
    max_new_tokens: int | None = _f(None, "Longest evaluated response (default: generation.max_new_tokens).")
    max_prompts: int | None = _f(None, "Evaluate at most this many test prompts.")
    threshold: float = _f(0.5, "A text is toxic when its toxicity is at least this (>=, as in the literature).")
    batch_size: int | None = _f(None, "Responses per sampling batch (default: the most whose key/value cache fits "
                                      "eval.batch_memory_gb, up to 128).")
    batch_memory_gb: float | None = _f(None, "Memory one evaluation batch's key/value cache may take, in GB (default 1 "
                                              "when eval.batch_size is unset); refuses an eval.batch_size beyond it.")
    fluency_model: str | None = _f(
        None, "Extra language model (hub id or path) that scores the responses' perplexity; remote code stays off."
    )
    group_column: str | None = _f(
        None, "Dataset column whose values split the quality metrics per group (e.g. heated)."
    )
    toxicity_group: str | None = _f(
        None, "Value of eval.group_column (as text, e.g. True) marking the prompts toxicity is measured on, as the "
              "field measures it on challenging prompts; the other groups' prompts (eval.control_prompts of them) "
              "check only that quality holds."
    )
    control_prompts: int = _f(0, "With eval.toxicity_group: prompts of the other groups evaluated for quality only.")
    protocol: str | None = _f(
        None, "A frozen evaluation protocol (a YAML file, or detoxrl:NAME): its prompts are the test split, and it sets "
              "the responses per prompt, the threshold, the judges and the bars; data.test_size then holds out "
              "validation prompts only. Its hash is recorded in metrics.json.")
    curve_steps: int = _f(0, "Every this many training steps, judge the policy on a fixed subset of the validation "
                             "prompts with the first evaluator: a learning curve in history.jsonl (0: off).")
    curve_prompts: int = _f(16, "Prompts in the learning-curve subset.")
    curve_samples: int = _f(2, "Responses per prompt in the learning-curve subset.")
    calibration_sentence: str = _f(
        "#Person1# complains to #Person2# about the problem and #Person2# agrees to fix it.",
        "A content-free response that fits every prompt: the report scores it like a model (a calibration row), "
        "so a reader sees which quality metrics a stock sentence can pass.")

    def check_prompt_selection(self) -> None:
        """Refuse evaluation settings that cannot select prompts or calibrate the guards (also for ``evaluate``)."""
        if not self.calibration_sentence.strip():
            raise DetoxError("eval.calibration_sentence must not be empty: the guards are calibrated with it")
        if self.control_prompts < 0:
            raise DetoxError(f"eval.control_prompts must be 0 or more, got {self.control_prompts}")
        if self.toxicity_group is None:
            if self.control_prompts:
                raise DetoxError("eval.control_prompts needs eval.toxicity_group: without it every evaluated prompt "
                                 "is judged for toxicity")
        elif self.group_column is None:
            raise DetoxError("eval.toxicity_group needs eval.group_column, the dataset column whose value it names")

    def sampling(self, generation: GenerationConfig) -> GenerationConfig:
        """The settings evaluation samples with: training's ``generation``, with eval.temperature, eval.top_p and
        eval.max_new_tokens where they are set. Training's own sampling stays untruncated, for exact log-probs."""
        chosen = {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}
        return dataclasses.replace(generation, **{k: v for k, v in chosen.items() if v is not None})

    def check_sampling(self, generation: GenerationConfig) -> None:
        """Refuse evaluation sampling settings that cannot sample (also for ``evaluate``)."""
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise DetoxError(f"eval.top_p must be in (0, 1] (1: the full distribution), got {self.top_p}")
        if self.temperature is not None and not self.temperature > 0:
            raise DetoxError(f"eval.temperature must be positive, got {self.temperature}")
        if self.max_new_tokens is not None and self.max_new_tokens < max(1, generation.min_new_tokens):
            raise DetoxError(f"eval.max_new_tokens must be at least 1 and generation.min_new_tokens "
                             f"({generation.min_new_tokens}), got {self.max_new_tokens}")


@dataclass
class SFTConfig:
    """``detoxrl sft``: supervised LoRA fine-tuning on (prompt, data.reference_column) pairs."""

    epochs: float = _f(1.0, "Passes over the training split.")
    max_steps: int = _f(0, "Stop after this many optimiser steps (0: run all epochs).")
    learning_rate: float = _f(2e-4, "AdamW learning rate.")
    lr_scheduler: str = _f("linear", "transformers scheduler name: linear, cosine, constant, ...")
    batch_size: int = _f(8, "Pairs per optimiser step (per process, before accumulation).")
    gradient_accumulation_steps: int = _f(1, "Batches accumulated per optimiser step.")
    max_target_tokens: int = _f(128, "Targets are truncated to this many tokens (EOS included).")
    evaluate: bool = _f(True, "Compare ROUGE of the adapter and the base model on the test split.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    output_dir: str = _f("outputs/run", "Where the adapter, metrics and report are written.")
    seed: int = _f(0, "Random seed.")
    report_to: list[str] = _f(["tensorboard"], "accelerate trackers (tensorboard, wandb, ...) or none.")
    mixed_precision: str | None = _f(None, "no | fp16 | bf16 (autocast); default: what accelerate launch or its "
                                           "config says, else no.")
    device: str | None = _f(None, "Force a device (cpu, cuda, cuda:1); default: accelerate decides.")
    save_steps: int = _f(0, "Checkpoint every N steps (0: only at the end).")
    save_total_limit: int = _f(2, "Checkpoints kept.")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice).")

    def validate(self) -> None:
        """Refuse settings that cannot work, with the reason, before anything is loaded."""
        p, g = self.rl, self.generation
        if p.algorithm not in ALGORITHMS:
            raise DetoxError(f"rl.algorithm must be one of {', '.join(ALGORITHMS)}, got {p.algorithm!r}")
        for name in ("steps", "batch_size", "samples_per_prompt", "mini_batch_size", "update_epochs",
                     "gradient_accumulation_steps"):
            if getattr(p, name) < 1:
                raise DetoxError(f"rl.{name} must be at least 1, got {getattr(p, name)}")
        if p.batch_size % p.mini_batch_size:
            raise DetoxError(
                f"rl.batch_size ({p.batch_size}) must be divisible by rl.mini_batch_size ({p.mini_batch_size})"
            )
        algorithm_class(p.algorithm).validate(p)
        if p.batch_size % p.samples_per_prompt:
            raise DetoxError(f"rl.batch_size ({p.batch_size}) must be divisible by rl.samples_per_prompt "
                             f"({p.samples_per_prompt}): each step samples batch_size / k prompts k times")
        if p.loss_normalization not in LOSS_NORMALIZATIONS:
            raise DetoxError(f"rl.loss_normalization must be token or sequence, got {p.loss_normalization!r}")
        if not p.learning_rate > 0:  # also refuses NaN
            raise DetoxError(f"rl.learning_rate must be positive, got {p.learning_rate}")
        sizes = {
            "generation.max_new_tokens": g.max_new_tokens,
            "data.max_prompt_tokens": self.data.max_prompt_tokens,
            "reward.batch_size": self.reward.batch_size,
            "model.lora_r": self.model.lora_r,
        }
        for name in ("max_prompts", "batch_size"):
            if getattr(self.eval, name) is not None:
                sizes[f"eval.{name}"] = getattr(self.eval, name)
        if self.eval.batch_memory_gb is not None and not self.eval.batch_memory_gb > 0:
            raise DetoxError(f"eval.batch_memory_gb must be positive, got {self.eval.batch_memory_gb}")
        if self.threads is not None:
            sizes["threads"] = self.threads
        for name, value in sizes.items():
            if value < 1:
                raise DetoxError(f"{name} must be at least 1, got {value}")
        for name in ("save_steps", "save_total_limit"):
            if getattr(self, name) < 0:
                raise DetoxError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if g.min_new_tokens < 0 or g.min_new_tokens > g.max_new_tokens:
            raise DetoxError(
                f"generation.min_new_tokens must be between 0 and max_new_tokens ({g.max_new_tokens}), "
                f"got {g.min_new_tokens}"
            )
        if not g.temperature > 0:
            raise DetoxError(f"generation.temperature must be positive, got {g.temperature}")
        if g.top_k != 0 or g.top_p != 1.0 or g.repetition_penalty != 1.0:
            raise DetoxError(
                "generation.top_k/top_p/repetition_penalty must stay 0/1.0/1.0: PPO needs the log-probs of the "
                "distribution that sampled, and truncating it gives negative KL and wrong ratios"
            )
        if not self.model.name_or_path:
            raise DetoxError("model.name_or_path is required (a hub id, a local directory or a .gguf file)")
        if self.reward.transform not in TRANSFORMS:
            raise DetoxError(
                f"reward.transform must be logit, log_odds, prob or log_prob, got {self.reward.transform!r}"
            )
        if self.reward.scorer not in SCORERS:
            raise DetoxError(
                f"reward.scorer must be classifier, hatesonar, profanity-check or callable, got {self.reward.scorer!r}"
            )
        for name in ("fidelity_weight", "novelty_weight"):
            weight = getattr(self.reward, name)
            if not (math.isfinite(weight) and weight >= 0):
                raise DetoxError(f"reward.{name} must be 0 or more (a finite number), got {weight}")
        for spec in self.reward.terms:
            parse_reward_term(spec)
        if self.reward.score_sentences and self.reward.score_query:
            raise DetoxError("reward.score_sentences scores the response's sentences alone; it cannot be combined "
                             "with reward.score_query (set one of them to false)")
        if self.reward.fidelity_weight and not self.data.reference_column:
            raise DetoxError("reward.fidelity_weight needs data.reference_column (the reference responses); this data "
                             "has none, so leave the weight at 0: the KL to the reference keeps the text fluent")
        if self.data.filter is not None:
            parse_row_filter(self.data.filter)
        if not 0 < self.data.test_size < 1:
            raise DetoxError(f"data.test_size must be between 0 and 1, got {self.data.test_size}")
        if self.data.split_seed < 0:
            raise DetoxError(f"data.split_seed must be 0 or more, got {self.data.split_seed}")
        if "{text}" not in self.data.prompt_template:
            raise DetoxError("data.prompt_template must contain {text}")
        for name in ("curve_prompts", "curve_samples"):
            if getattr(self.eval, name) < 1:
                raise DetoxError(f"eval.{name} must be at least 1, got {getattr(self.eval, name)}")
        if self.eval.curve_steps < 0:
            raise DetoxError(f"eval.curve_steps must be 0 or more, got {self.eval.curve_steps}")
        if self.eval.samples_per_prompt < 1:
            raise DetoxError(f"eval.samples_per_prompt must be at least 1, got {self.eval.samples_per_prompt}")
        self.eval.check_prompt_selection()
        self.eval.check_sampling(g)
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise DetoxError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        check_model_dtype(self.model.dtype)
        t = self.sft
        for name in ("batch_size", "gradient_accumulation_steps", "max_target_tokens"):
            if getattr(t, name) < 1:
                raise DetoxError(f"sft.{name} must be at least 1, got {getattr(t, name)}")
        if t.max_steps < 0 or (t.max_steps == 0 and not t.epochs > 0):
            raise DetoxError(f"sft.epochs must be positive (or sft.max_steps set), got epochs {t.epochs} and "
                             f"max_steps {t.max_steps}")
        if not t.learning_rate > 0:
            raise DetoxError(f"sft.learning_rate must be positive, got {t.learning_rate}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the settings as YAML (atomically), creating the folder if needed."""
        from .rundir import atomic_write_text

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


PRESETS = ("smollm2-offline", "flan-t5-dialogsum", "gpt-neo-rtp")


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Coerce YAML/CLI values to the field's type, or say which key is wrong."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise DetoxError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise DetoxError(f"{where} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise DetoxError(f"{where} must be {'an integer' if annotation is int else 'a number'}, got {value!r}")
        try:
            number = annotation(value) if annotation is float else int(str(value))
        except (TypeError, ValueError):
            raise DetoxError(f"{where} must be {'an integer' if annotation is int else 'a number'}, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, bool):
            raise DetoxError(f"{where} must be a string, got {value!r} (YAML reads unquoted true, yes and on as "
                             "booleans: quote the value)")
        if not isinstance(value, (str, int, float)):
            raise DetoxError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise DetoxError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    types_ = _field_types(type(obj))
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in types_:
            known = ", ".join(types_)
            raise DetoxError(f"unknown config key {where!r} (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{where}.")
        else:
            setattr(obj, key, _check_type(value, types_[key], where))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DetoxError(f"config file not found: {path}")
    except UnicodeDecodeError:
        raise DetoxError(f"config file is not UTF-8 text: {path}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise DetoxError(f"config file {path} is not valid YAML{where}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DetoxError(f"config file {path} must hold a mapping of settings")
    return data


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise DetoxError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    text = resources.files("detoxrl.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Defaults, then a preset, then a YAML file, then dotted overrides (``rl.steps``)."""
    config = Config()
    if preset:
        _apply(config, preset_values(preset))
    if config_file:
        _apply(config, load_yaml(config_file))
    for dotted, value in (overrides or {}).items():
        nested: dict[str, Any] = {}
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        _apply(config, nested)
    return config


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """A run's saved ``config.yaml``, then dotted overrides.

    Runs saved before ``data.split_seed`` existed split their data with their ``seed``; it stays their
    split seed, so evaluating or resuming them never mixes their training prompts into the test split.
    """
    saved = load_yaml(path)
    data = saved.get("data")
    if not (isinstance(data, dict) and "split_seed" in data):
        overrides = {"data.split_seed": saved.get("seed", Config().seed), **(overrides or {})}
    return build_config(config_file=path, overrides=overrides)


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted name, type, help) of every leaf setting, for building the command line."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f.metadata.get("help", "")
