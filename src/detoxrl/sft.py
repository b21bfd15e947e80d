"""``detoxrl sft``: supervised LoRA fine-tuning on (prompt, reference) pairs.

The recipe started PPO from a FLAN-T5 adapter already fine-tuned to summarise DialogSum; this
makes such an adapter for any seq2seq or causal model, with the same data settings, prompt
template and chat template as ``detoxrl train``, so ``train --model.adapter RUN/adapter``
continues from it. transformers' Trainer runs the optimisation; the loss is on the target tokens
only. Output directory (``metrics.json`` written last marks it finished)::

    config.yaml  history.jsonl  logs/  adapter/ (LoRA + tokenizer + README.md)  metrics.json
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, ProgressCallback, Trainer, TrainingArguments

from .config import Config
from .data import build_splits, load_rows
from .errors import DetoxError
from .modelcard import write_model_card
from .policy import Policy, load_policy
from .rundir import RunDir, atomic_write_dir, finish, run_lifecycle, write_history

IGNORE_INDEX = -100  # label of the prompt tokens: no loss on them


def check_targets(config: Config) -> None:
    """Refuse data without the target column or with empty targets, before anything is written."""
    column = config.data.reference_column
    if not column:
        raise DetoxError("sft needs targets: set data.reference_column to the column of reference responses")
    rows = load_rows(config.data)
    if column not in rows.column_names:
        raise DetoxError(
            f"dataset {config.data.dataset} has no column {column!r} (data.reference_column, the sft targets); "
            f"its columns are: {', '.join(rows.column_names)}"
        )
    empty = [i for i, target in enumerate(rows[column]) if not isinstance(target, str) or not target.strip()]
    if empty:
        raise DetoxError(
            f"{len(empty)} of {len(rows)} rows of {config.data.dataset} have an empty {column!r} "
            f"(data.reference_column, the sft targets), the first in data row {empty[0] + 1}; fill or remove them"
        )


def encode_pairs(policy: Policy, prompts: list[str], targets: list[str], max_prompt_tokens: int,
                 max_target_tokens: int) -> dict[str, list[list[int]]]:
    """Token ids of (prompt, target) pairs; ``labels`` are the target ids, -100 where no loss is taken.

    Prompts are encoded exactly as for generation (template, chat template, truncation side). For
    seq2seq models the target is the decoder's labels; for causal models it follows the prompt and
    ends with EOS, and the prompt positions are masked.
    """
    tokenizer = policy.tokenizer
    tokenizer.truncation_side = "left" if policy.use_chat_template else "right"
    encoded = tokenizer(policy.format_prompts(prompts), truncation=True, max_length=max_prompt_tokens,
                        add_special_tokens=not policy.use_chat_template)
    eos = policy.eos_token_ids[0]
    tokenizer.truncation_side = "right"
    target_ids = tokenizer(targets, add_special_tokens=False, truncation=True,
                           max_length=max_target_tokens - 1)["input_ids"]
    if policy.is_encoder_decoder:  # the decoder starts from decoder_start_token_id; the labels end in EOS
        labels = [ids + [eos] for ids in target_ids]
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
    input_ids, labels = [], []
    for prompt_ids, ids in zip(encoded["input_ids"], target_ids):
        input_ids.append(prompt_ids + ids + [eos])
        labels.append([IGNORE_INDEX] * len(prompt_ids) + ids + [eos])
    return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}


class QuietProgress(ProgressCallback):
    """Trainer's progress bar without a printed line per logged step: they go to history.jsonl."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def training_arguments(config: Config, logs_dir: Path) -> TrainingArguments:
    s = config.sft
    trackers = [t for t in config.report_to if t and t != "none"]
    # None: what accelerate launch (or its config file) asked for, as in detoxrl train.
    precision = config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return TrainingArguments(
        output_dir=str(logs_dir),
        num_train_epochs=s.epochs,
        max_steps=s.max_steps or -1,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=trackers or "none",
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=config.device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=False,  # a progress bar (QuietProgress) rather than one printed line per step
    )


def rouge_before_after(config: Config, policy: Policy, test_rows: Dataset) -> dict:
    """ROUGE of the base model and of the adapter against the references, on the same sampled seeds."""
    from .evaluation.evaluate import response_kl
    from .sampling import eval_mode, inference_weights, sample, texts_of
    from .evaluation.stats import rouge_scores

    prompts, references = list(test_rows["prompt"]), list(test_rows[config.data.reference_column])
    if config.eval.max_prompts:
        prompts, references = prompts[: config.eval.max_prompts], references[: config.eval.max_prompts]
    with eval_mode(policy.module):
        with policy.reference_model() as reference:
            base = texts_of(sample(policy, reference, prompts, config, 1, desc="eval: base"))
        with inference_weights(policy) as model:
            rollouts = sample(policy, model, prompts, config, 1, desc="eval: sft")
        kl = response_kl(policy, rollouts, config)
    return {
        "num_prompts": len(prompts),
        "rouge": {"base": rouge_scores(base, references), "sft": rouge_scores(texts_of(rollouts), references)},
        "kl_mean": float(kl.mean()),
    }


def sft(config: Config) -> Path:
    """Fine-tune, save the adapter, evaluate; returns the run directory.

    Under ``accelerate launch`` the Trainer trains on every process; the first one writes the files.
    """
    config.validate()
    check_targets(config)
    state = PartialState()
    with run_lifecycle(config, main=state.is_main_process, barrier=state.wait_for_everyone) as out:
        return _sft(config, out, state.is_main_process)


def _sft(config: Config, out: RunDir, main: bool) -> Path:
    started = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed)  # the fresh LoRA's initial weights too, so a run does not depend on what ran before it
    train_rows, test_rows = build_splits(config.data)
    policy = load_policy(config.model, device=config.device)
    column = config.data.reference_column
    pairs = Dataset.from_dict(encode_pairs(policy, list(train_rows["prompt"]), list(train_rows[column]),
                                           config.data.max_prompt_tokens, config.sft.max_target_tokens))
    policy.tokenizer.padding_side = "right"  # training batches; labels are padded with -100
    trainer = Trainer(
        model=policy.model,
        args=training_arguments(config, out.logs),
        train_dataset=pairs,
        data_collator=DataCollatorForSeq2Seq(policy.tokenizer, label_pad_token_id=IGNORE_INDEX),
    )
    trainer.pop_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    result = trainer.train()
    train_seconds = time.time() - started
    if not math.isfinite(result.training_loss):
        raise DetoxError(f"the sft loss is {result.training_loss}; lower sft.learning_rate")
    if not main:
        return out.path
    history = [row for row in trainer.state.log_history if "loss" in row]
    write_history(history, out.history)
    atomic_write_dir(out.adapter, policy.save_pretrained)

    metrics = {
        "run": {"kind": "sft", "model": config.model.name_or_path, "steps": trainer.state.global_step,
                "epochs": trainer.state.epoch, "train_seconds": round(train_seconds, 1)},
        "train": {"loss": result.training_loss, "final_loss": history[-1]["loss"] if history else None},
    }
    if config.sft.evaluate:
        metrics["evaluation"] = rouge_before_after(config, policy, test_rows)
    metrics["run"]["wall_seconds"] = round(time.time() - started, 1)
    write_model_card(config, out.adapter, metrics)
    finish(out, metrics)
    return out.path

