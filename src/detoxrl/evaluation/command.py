"""``detoxrl evaluate``: check the inputs, then run the evaluation protocol (:mod:`.evaluate`) on a saved run
(:func:`evaluate_run`) or on any model, with or without an adapter (:func:`evaluate_model`).

Everything a user can get wrong (the run directory, the settings, the dataset, the output directory) is
checked here before torch and the models are loaded, so a mistake costs a second, not the model loading.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config, load_run_config
from ..data import load_rows, run_splits
from ..errors import DetoxError
from ..rundir import RunDir, atomic_write_json, read_history
from .protocol import resolve_protocol

logger = logging.getLogger(__name__)


def evaluate_run(
    run_dir: str | Path,
    dataset: str | None = None,
    samples_per_prompt: int | None = None,
    evaluators: list[str] | None = None,
    max_prompts: int | None = None,
    threshold: float | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    overrides: dict | None = None,
) -> Path:
    """Evaluate a trained run; returns the directory of the report.

    ``overrides`` are dotted ``eval.*`` and ``generation.*`` settings over the run's own (the named
    arguments are shortcuts for four of them). An evaluation already in the output directory is replaced
    only with ``overwrite``. Every input is checked before a model is loaded.
    """
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise DetoxError(f"{run_dir} is not a detoxrl run directory (config.yaml is missing)")
    if not (run.adapter / "adapter_config.json").is_file():
        raise DetoxError(f"{run_dir} has no trained adapter (adapter/adapter_config.json is missing); did training "
                         "finish? An interrupted run continues with: detoxrl train --output_dir RUN_DIR --resume")
    named = {"eval.samples_per_prompt": samples_per_prompt, "eval.evaluators": evaluators,
             "eval.max_prompts": max_prompts, "eval.threshold": threshold}
    settings = {**(overrides or {}), **{k: v for k, v in named.items() if v is not None}}
    outside = sorted(k for k in settings if not k.startswith(("eval.", "generation.")))
    if outside:
        raise DetoxError(f"evaluate changes only eval.* and generation.* settings, not {', '.join(outside)}")
    config = load_run_config(run.config, settings)
    config.output_dir = str(run.path.resolve())  # where the run is now, also after a move
    config.validate()
    return _evaluate(config, RunDir(output_dir) if output_dir else RunDir(run.eval), dataset, overwrite,
                     adapter=run.adapter, history=read_history(run.history))


def evaluate_model(config: Config, output_dir: str | Path, dataset: str | None = None,
                   overwrite: bool = False) -> Path:
    """Evaluate ``config.model`` without a run (``detoxrl evaluate --model``); returns ``output_dir``.

    Without ``model.adapter`` the model is judged alone: it is the reference side (the model before any
    adapter, as a run's reference is), and the evaluation has no policy side. With one, trained anywhere,
    the base is the reference and base + adapter the policy, as in a run's evaluation. The data, reward,
    judges and sampling are ``config``'s (a preset's, for example), so the same settings and seed give a
    run's reference figures again.
    """
    config.validate()
    adapter = config.model.adapter
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise DetoxError(f"--adapter {adapter} holds no PEFT adapter (adapter_config.json is missing)")
    if adapter is None and config.model.reference:
        raise DetoxError(f"evaluate --model without --adapter judges {config.model.name_or_path} itself; "
                         f"model.reference ({config.model.reference}) would put another model in its place")
    config.output_dir = str(Path(output_dir).resolve())
    run = {"model": config.model.name_or_path, "adapter": adapter and str(Path(adapter).resolve()),
           "evaluated": "base (reference) against base + adapter (policy)" if adapter else
           "the model alone, as the reference side (no policy)", "output_dir": config.output_dir}
    return _evaluate(config, RunDir(output_dir), dataset, overwrite, adapter=adapter, history=[], run=run)


def _evaluate(config: Config, out: RunDir, dataset: str | None, overwrite: bool, adapter: str | Path | None,
              history: list[dict], run: dict | None = None) -> Path:
    """The part of evaluate_run and evaluate_model after their settings: check the output directory and the data,
    load the models, evaluate (the policy side only with an ``adapter``), write metrics.json last."""
    if dataset:  # another dataset is judged as a whole, by the run's judges, outside any protocol
        config.eval.protocol = None
    else:
        resolve_protocol(config)
    if out.metrics.is_file() and not overwrite:
        raise DetoxError(f"{out.path} already holds an evaluation; pass --output_dir DIR to keep both, or --overwrite "
                         "to replace it")
    if out.path.exists() and not out.path.is_dir():
        raise DetoxError(f"--output_dir {out.path} is a file, not a directory")

    if dataset:
        config.data.dataset = dataset
        rows = load_rows(config.data)
        if config.data.text_column not in rows.column_names:
            raise DetoxError(
                f"dataset {dataset} has no column {config.data.text_column!r}; its columns are: {', '.join(rows.column_names)}"
            )
        rows = rows.map(lambda t: {"prompt": config.data.prompt_template.replace("{text}", t)},
                        input_columns=config.data.text_column)
        if config.eval.group_column is not None and config.eval.group_column not in rows.column_names:
            # The run's grouping names a column of its own dataset; another dataset is judged as a whole.
            logger.warning("dataset %s has no column %r: toxicity and quality are measured over all its prompts, "
                           "without groups", dataset, config.eval.group_column)
            config.eval.group_column, config.eval.toxicity_group, config.eval.control_prompts = None, None, 0
    else:
        rows = run_splits(config)[2]
    column = config.data.reference_column
    references = list(rows[column]) if column and column in rows.column_names else None

    # torch, transformers and peft load from here on
    from ..policy import load_policy
    from ..rewards import build_reward
    from ..rl.trainer import build_accelerator
    from ..sampling import describe_sampling, evaluation_batch_size
    from .evaluate import (check_fluency_model, evaluate_policy, held_out_evaluator, place_policy, prompt_groups,
                           run_info)

    groups = prompt_groups(rows, config)
    if config.eval.fluency_model:
        check_fluency_model(config.eval.fluency_model)
    # accelerate picks the device as in training (config.device forces one); every model goes there.
    device = build_accelerator(config).device
    # Loaded before anything is generated, so an evaluator that cannot be loaded fails fast.
    held_out = {spec: held_out_evaluator(spec, config.eval.nontoxic_label, device) for spec in config.eval.evaluators}
    reward = build_reward(config.reward, str(device), config.model.trust_remote_code,
                          config.data.reference_column or "reference")
    policy = place_policy(load_policy(config.model, adapter=adapter, device=config.device), device)
    evaluation_batch_size(config, policy.model)  # one that cannot fit fails here
    run = {**run, "sampling": describe_sampling(config)["summary"]} if run else run_info(config)
    out.path.mkdir(parents=True, exist_ok=True)
    out.metrics.unlink(missing_ok=True)  # an evaluation replaced half-way must not look finished
    evaluation = evaluate_policy(config, policy, list(rows["prompt"]), references, reward, out.path, history,
                                 held_out, groups, dataset and str(Path(dataset).expanduser().resolve()),
                                 list(rows[config.data.text_column]), with_policy=adapter is not None, run=run)
    atomic_write_json(out.metrics, {"run": run, "evaluation": evaluation})
    return out.path
