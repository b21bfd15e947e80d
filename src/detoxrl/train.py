"""``detoxrl train``: load everything, run PPO, save the adapter, then evaluate before/after.

The output directory's layout is described in :mod:`detoxrl.rundir`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .config import Config
from .data import run_splits
from .errors import DetoxError
from .policy import load_policy
from .rl import checkpoint
from .rl.trainer import RLTrainer, build_accelerator
from .sampling import evaluation_batch_size
from .rewards import build_reward
from .evaluation.protocol import resolve_protocol
from .rewards.composite import Reward
from .rundir import RunDir, atomic_write_dir, finish, flat_settings, read_history, run_lifecycle, write_history

logger = logging.getLogger(__name__)

# A model without a limit on positions (T5's relative positions) could in principle generate forever;
# more new tokens than this is taken for a typo rather than run until memory runs out.
MAX_NEW_TOKENS_WITHOUT_POSITION_LIMIT = 65536


def flat_hparams(config: Config) -> dict[str, float | str | bool]:
    """The settings by dotted name; TensorBoard takes only scalars and strings."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in flat_settings(config.to_dict()).items()}


def train(config: Config, resume: bool = False, resume_with_changes: bool = False, reward: Reward | None = None) -> Path:
    """Train, save and evaluate; returns the run directory.

    ``reward`` replaces the one the config builds (detoxrl.build_reward), e.g. to add a Python function as a
    term with :meth:`~detoxrl.rewards.composite.Reward.with_term`; the run records it term by term.
    ``resume`` continues the run in ``config.output_dir``; settings that decide its result must be the
    saved ones unless ``resume_with_changes`` (then the changes are recorded in the run).
    """
    config.validate()
    resolve_protocol(config)
    accelerator = build_accelerator(config)
    with run_lifecycle(config, resume, resume_with_changes, accelerator.is_main_process,
                       accelerator.wait_for_everyone):
        return _train(config, accelerator, resume, reward)


def _train(config: Config, accelerator: Accelerator, resume: bool, reward: Reward | None) -> Path:
    out = Path(config.output_dir)
    run = RunDir(out)
    started = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed)
    main = accelerator.is_main_process

    train_rows, validation_rows, test_rows = run_splits(config)
    test_prompts, test_groups = list(test_rows["prompt"]), evaluation_groups(test_rows, config)
    reward = reward or build_reward(config.reward, str(accelerator.device), config.model.trust_remote_code,
                                    config.data.reference_column or "reference")
    if config.eval.enabled and config.eval.fluency_model:
        from .evaluation.evaluate import check_fluency_model

        check_fluency_model(config.eval.fluency_model)
    trained = resume and training_finished(run, config)
    policy = load_policy(config.model, adapter=run.adapter if trained else None, device=config.device)
    check_generation_fits(config, policy.model.config)
    if config.eval.enabled or config.eval.curve_steps:
        evaluation_batch_size(config, policy.model)  # one that cannot fit fails here
    trainer = RLTrainer(config, policy, reward, list(train_rows["prompt"]), accelerator,
                        references=references(train_rows, config))

    if trained:
        # Interrupted after the adapter was saved (during the evaluation): only what is missing runs again.
        trainer.history, trainer.step_count = read_history(run.history), config.rl.steps
        logger.info("training had finished (%s); finishing the evaluation", run.adapter)
    elif resume:
        found = checkpoint.latest(run.checkpoints)
        if found is None:
            logger.warning("no checkpoint in %s; starting from step 0", run.checkpoints)
        else:
            trainer.load_checkpoint(found)
            logger.info("resumed from %s (step %d)", found, trainer.step_count)

    if accelerator.trackers or config.report_to:
        accelerator.init_trackers("detoxrl", config=flat_hparams(config))
    bar = tqdm(
        total=config.rl.steps, initial=trainer.step_count, desc=config.rl.algorithm.upper(), unit="step",
        disable=not main, dynamic_ncols=True,
    )
    learning_curve = curve_judge(config, policy, validation_rows)

    def on_step(stats: dict[str, float]) -> None:
        if learning_curve and stats["step"] % config.eval.curve_steps == 0:
            point = learning_curve()  # every rank, so that the merged-weight round trip stays identical across ranks
            stats.update(point)
            accelerator.log(point, step=trainer.step_count)
        bar.update(1)
        bar.set_postfix(
            reward=f"{stats['env/reward_mean']:.3f}",
            kl=f"{stats['objective/kl']:.3f}",
            len=f"{stats['env/response_length_mean']:.0f}",
            s=f"{stats['time/total']:.1f}",
        )
        if main:
            write_history(trainer.history, run.history)

    try:
        trainer.train(on_step)
    finally:
        bar.close()  # also on errors, so that an error message starts on its own line
    # A run resumed only for its evaluation trained before: its training time is the steps' own.
    train_seconds = sum(h.get("time/total", 0) for h in trainer.history) if trained else time.time() - started

    if main and not trained:
        save_adapter(policy, run.adapter)
    accelerator.wait_for_everyone()

    metrics = {
        "run": {
            "model": config.model.name_or_path,
            "reward": reward.describe(),
            "reward_weights": reward.weights(),
            "steps": trainer.step_count,
            "train_seconds": round(train_seconds, 1),
            "num_processes": accelerator.num_processes,
            "resumed_with_changes": [row["changed"] for row in read_history(run.resumes)],
            "rank_param_max_diff": trainer.rank_divergence(),
        },
        "train": trainer.history[-1] if trainer.history else {},
    }
    if config.eval.enabled and main:
        from .evaluation.evaluate import evaluate_policy

        metrics["evaluation"] = evaluate_policy(
            config, policy, test_prompts, references(test_rows, config), reward, out, trainer.history,
            groups=test_groups, sources=list(test_rows[config.data.text_column]),
        )
    metrics["run"]["wall_seconds"] = round(time.time() - started, 1)
    if main:
        from .modelcard import write_model_card

        write_model_card(config, run.adapter, metrics)
        finish(run, metrics)
    trainer.close()  # flushes trackers; also ends the process group, so it comes last
    return out


def training_finished(run: RunDir, config: Config) -> bool:
    """Whether an unfinished run got as far as its saved adapter: the adapter is written only after the last
    step, and the history holds every step."""
    history = read_history(run.history)
    return (run.adapter / "adapter_config.json").is_file() and bool(history) and \
        history[-1].get("step") == config.rl.steps


def evaluation_groups(test_rows, config: Config) -> list | None:
    """The evaluation's group of each test prompt; a bad eval.group_column or eval.toxicity_group fails
    here, before training, rather than at the evaluation after it."""
    if not (config.eval.enabled or config.eval.curve_steps):
        return None
    from .evaluation.evaluate import prompt_groups

    return prompt_groups(test_rows, config)


def curve_judge(config: Config, policy, validation_rows):
    """A function giving one learning-curve point (``eval/*`` keys), or None when eval.curve_steps is 0.

    The subset is the first eval.curve_prompts validation prompts (never the test split's), judged by the
    first held-out evaluator.
    """
    e = config.eval
    if not e.curve_steps or not e.evaluators or len(validation_rows) == 0:
        return None
    from .evaluation.evaluate import held_out_evaluator, judge_subset

    judge = held_out_evaluator(e.evaluators[0], e.nontoxic_label)
    subset = list(validation_rows["prompt"])[: e.curve_prompts]
    return lambda: judge_subset(policy, subset, config, judge, e.curve_samples)


def save_adapter(policy, target: Path) -> None:
    """Never a half-written adapter/: it is written next to ``target`` and renamed into place."""
    atomic_write_dir(target, policy.save_pretrained, what="the adapter")


def context_limit(model_config) -> int | None:
    """The most positions the model can attend to, or None for relative positions (T5) without a limit."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_generation_fits(config: Config, model_config) -> None:
    """Refuse, before any work, prompts plus responses longer than the model's context.

    A decoder-only model reads the prompt and its response in one sequence of at most ``context_limit``
    positions; an encoder-decoder reads the prompt in its encoder and writes the response in its decoder,
    each within the limit. Without a limit, only an absurd ``max_new_tokens`` is refused.
    """
    new, prompt = config.generation.max_new_tokens, config.data.max_prompt_tokens
    limit = context_limit(model_config)
    name = config.model.name_or_path
    if limit is None:
        if new > MAX_NEW_TOKENS_WITHOUT_POSITION_LIMIT:
            raise DetoxError(
                f"generation.max_new_tokens ({new}) is more than {MAX_NEW_TOKENS_WITHOUT_POSITION_LIMIT}; "
                f"model {name} has no fixed context length, but responses this long are surely a mistake"
            )
        return
    if model_config.is_encoder_decoder:
        for setting, value in (("generation.max_new_tokens", new), ("data.max_prompt_tokens", prompt)):
            if value > limit:
                raise DetoxError(f"{setting} ({value}) is more than model {name} can handle: {limit} positions")
        return
    if prompt + new > limit:
        raise DetoxError(
            f"data.max_prompt_tokens ({prompt}) + generation.max_new_tokens ({new}) = {prompt + new} tokens do not "
            f"fit the context of model {name}: {limit} positions; lower one of them"
        )


def references(rows, config: Config) -> list[str] | None:
    column = config.data.reference_column
    return list(rows[column]) if column and column in rows.column_names else None

