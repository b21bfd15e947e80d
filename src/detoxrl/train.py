"""``detoxrl train``: load everything, run PPO, save the adapter, then evaluate before/after.

Output directory layout::

    config.yaml        the resolved configuration (written first)
    checkpoints/       step-N/ (atomic, the last save_total_limit kept)
    logs/              TensorBoard event files
    history.jsonl      per-step statistics
    adapter/           LoRA adapter + value head (safetensors) + tokenizer
    metrics.json       written last: a run without it did not finish
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .config import Config
from .data import build_splits
from .errors import DetoxError
from .policy import load_policy
from .rl import checkpoint
from .rl.trainer import RLTrainer, write_history
from .rewards import build_reward

logger = logging.getLogger(__name__)

FINAL_FILE = "metrics.json"


def make_accelerator(config: Config) -> Accelerator:
    if config.device and config.device.startswith("cuda:"):
        torch.cuda.set_device(int(config.device.split(":")[1]))
    trackers = [t for t in config.report_to if t and t != "none"]
    return Accelerator(
        cpu=config.device == "cpu",
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.rl.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(Path(config.output_dir) / "logs"),
    )


def prepare_output_dir(config: Config, resume: bool) -> tuple[bool, bool]:
    """Refuse to overwrite a finished or foreign run.

    Returns (created, was_empty): whether we created the directory, and whether it existed but was empty.
    """
    out = Path(config.output_dir)
    if (out / FINAL_FILE).exists():
        raise DetoxError(f"{out} already holds a finished run; choose another --output_dir")
    if out.exists() and not out.is_dir():
        raise DetoxError(f"--output_dir {out} is a file, not a directory")
    created = not out.exists()
    try:
        was_empty = not created and not any(out.iterdir())
    except OSError as exc:
        raise DetoxError(f"cannot read output directory {out}: {exc.strerror or exc}") from exc
    if not created and not resume and not was_empty:
        raise DetoxError(f"{out} is not empty; pass --resume to continue its run or choose another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DetoxError(f"cannot write to output directory {out}: {exc.strerror or exc}") from exc
    return created, was_empty


def flat_hparams(config: Config) -> dict[str, float | str | bool]:
    """TensorBoard takes only scalars and strings."""
    flat = {}
    for section, values in config.to_dict().items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(config: Config, resume: bool = False) -> Path:
    """Train, save and evaluate; returns the run directory."""
    config.validate()
    accelerator = make_accelerator(config)
    out = Path(config.output_dir)
    created, was_empty = prepare_output_dir(config, resume) if accelerator.is_main_process else (False, False)
    accelerator.wait_for_everyone()
    try:
        return _train(config, accelerator, resume)
    except BaseException:
        # Nothing the user made is lost: without a checkpoint or a saved adapter, remove only what this run wrote
        # (the directory if we created it, its contents if it was empty), so the same command can be run again.
        keep = checkpoint.list_checkpoints(out / "checkpoints") or (out / "adapter").is_dir()
        if (created or was_empty) and not keep:  # a trained adapter or a checkpoint is never thrown away
            remove_partial_run(out, keep_directory=not created)
        raise


def remove_partial_run(out: Path, keep_directory: bool) -> None:
    """Delete what a failed run wrote: the whole directory, or only its contents (best effort)."""
    if not keep_directory:
        shutil.rmtree(out, ignore_errors=True)
        return
    try:
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    except OSError:
        pass


def _train(config: Config, accelerator: Accelerator, resume: bool) -> Path:
    out = Path(config.output_dir)
    started = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed)
    main = accelerator.is_main_process
    if main:
        config.save(out / "config.yaml")

    train_rows, test_rows = build_splits(config.data, config.seed)
    reward = build_reward(config.reward, str(accelerator.device), config.model.trust_remote_code)
    policy = load_policy(config.model)
    trainer = RLTrainer(config, policy, reward, list(train_rows["prompt"]), accelerator)

    if resume:
        found = checkpoint.latest(out / "checkpoints")
        if found is None:
            logger.warning("no checkpoint in %s; starting from step 0", out / "checkpoints")
        else:
            trainer.load_checkpoint(found)
            logger.info("resumed from %s (step %d)", found, trainer.step_count)

    if accelerator.trackers or config.report_to:
        accelerator.init_trackers("detoxrl", config=flat_hparams(config))
    bar = tqdm(
        total=config.rl.steps, initial=trainer.step_count, desc="PPO", unit="step", disable=not main, dynamic_ncols=True
    )

    def on_step(stats: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(
            reward=f"{stats['env/reward_mean']:.3f}",
            kl=f"{stats['objective/kl']:.3f}",
            len=f"{stats['env/response_length_mean']:.0f}",
            s=f"{stats['time/total']:.1f}",
        )
        if main:
            write_history(trainer.history, out / "history.jsonl")

    try:
        trainer.train(on_step)
    finally:
        bar.close()  # also on errors, so that an error message starts on its own line
    train_seconds = time.time() - started

    if main:
        save_adapter(policy, out / "adapter")
    accelerator.wait_for_everyone()

    metrics = {
        "run": {
            "model": config.model.name_or_path,
            "reward": config.reward.scorer if config.reward.scorer != "classifier" else config.reward.model,
            "steps": trainer.step_count,
            "train_seconds": round(train_seconds, 1),
            "num_processes": accelerator.num_processes,
            "rank_param_max_diff": trainer.rank_divergence(),
        },
        "train": trainer.history[-1] if trainer.history else {},
    }
    if config.eval.enabled and main:
        from .evaluation.evaluate import evaluate_policy

        metrics["evaluation"] = evaluate_policy(
            config, policy, list(test_rows["prompt"]), references(test_rows, config), reward, out, trainer.history
        )
    metrics["run"]["wall_seconds"] = round(time.time() - started, 1)
    if main:
        # Written last, atomically: its presence marks a finished run.
        tmp = out / f".{FINAL_FILE}.tmp"
        try:
            tmp.write_text(json.dumps(metrics, indent=2, default=float))
            os.replace(tmp, out / FINAL_FILE)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DetoxError(f"could not write {out / FINAL_FILE}: {exc.strerror or exc}") from exc
    accelerator.wait_for_everyone()
    accelerator.end_training()  # flushes trackers; also ends the process group, so it comes last
    return out


def save_adapter(policy, target: Path) -> None:
    """Write the adapter next to ``target`` and rename it into place: never a half-written adapter/."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        policy.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DetoxError(f"could not save the adapter to {target}: {exc.strerror or exc}") from exc


def references(rows, config: Config) -> list[str] | None:
    column = config.data.reference_column
    return list(rows[column]) if column and column in rows.column_names else None
