"""``detoxrl evaluate``: check the inputs, then run the evaluation protocol (:mod:`.evaluate`) on a saved run.

Everything a user can get wrong (the run directory, the settings, the dataset, the output directory) is
checked here before torch and the models are loaded, so a mistake costs a second, not the model loading.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import load_run_config
from ..data import build_splits, load_rows
from ..errors import DetoxError
from ..rundir import RunDir, atomic_write_json, read_history

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
    out = RunDir(output_dir) if output_dir else RunDir(run.eval)
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
        _, rows = build_splits(config.data)
    column = config.data.reference_column
    references = list(rows[column]) if column and column in rows.column_names else None

    # torch, transformers and peft load from here on
    from ..policy import load_policy
    from ..rewards import build_reward
    from ..rl.trainer import build_accelerator
    from .evaluate import evaluate_policy, held_out_evaluator, place_policy, prompt_groups, run_info

    groups = prompt_groups(rows, config)
    # accelerate picks the device as in training (config.device forces one); every model goes there.
    device = build_accelerator(config).device
    # Loaded before anything is generated, so an evaluator that cannot be loaded fails fast.
    held_out = {spec: held_out_evaluator(spec, config.eval.nontoxic_label, device) for spec in config.eval.evaluators}
    reward = build_reward(config.reward, str(device), config.model.trust_remote_code,
                          config.data.reference_column or "reference")
    policy = place_policy(load_policy(config.model, adapter=run.adapter, device=config.device), device)
    out.path.mkdir(parents=True, exist_ok=True)
    out.metrics.unlink(missing_ok=True)  # an evaluation replaced half-way must not look finished
    evaluation = evaluate_policy(config, policy, list(rows["prompt"]), references, reward, out.path,
                                 read_history(run.history), held_out, groups,
                                 dataset and str(Path(dataset).expanduser().resolve()),
                                 list(rows[config.data.text_column]))
    atomic_write_json(out.metrics, {"run": run_info(config), "evaluation": evaluation})
    return out.path
