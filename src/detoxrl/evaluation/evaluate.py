"""``detoxrl evaluate``: the reference and the trained policy on the same prompts, scored by the
training reward and by held-out evaluators that training never saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config, build_config
from ..data import build_splits, load_rows
from ..errors import DetoxError
from ..policy import Policy, load_policy
from ..rl.rollout import generate, reference_logprobs, sample_seeds
from ..rewards import Scorer, build_evaluator, build_reward
from .report import render_report
from .stats import qualitative_table, quality_metrics, toxicity_summary, write_table_csv

EVAL_STREAM = 1_000_003  # keeps evaluation samples apart from the training steps' seeds


def sample_responses(
    policy: Policy, prompts: list[str], config: Config, samples: int, use_adapter: bool, desc: str
) -> tuple[list[str], np.ndarray]:
    """``samples`` responses per prompt (prompt-major order) and their KL to the reference, summed per response."""
    g, batch_size = config.generation, config.eval.batch_size
    expanded = [p for p in prompts for _ in range(samples)]
    # The same seed for the i-th sample of both models: a paired comparison with common randomness.
    seeds = sample_seeds(config.seed, EVAL_STREAM, count=len(expanded))
    texts, kls = [], []
    for start in tqdm(range(0, len(expanded), batch_size), desc=desc, unit="batch", leave=False):
        chunk = expanded[start : start + batch_size]
        if use_adapter:
            rollout = generate(policy, policy.model, chunk, g, config.data.max_prompt_tokens, seeds[start : start + batch_size])
            ref = reference_logprobs(policy, rollout, g)
            kls.append(((rollout.logprobs - ref) * rollout.mask).sum(dim=1).cpu())
        else:
            with policy.reference_model() as reference:
                rollout = generate(policy, reference, chunk, g, config.data.max_prompt_tokens, seeds[start : start + batch_size])
            kls.append(torch.zeros(len(chunk)))
        texts.extend(rollout.responses)
    return texts, torch.cat(kls).numpy()


def evaluate_policy(
    config: Config,
    policy: Policy,
    prompts: list[str],
    references: list[str] | None,
    reward: Scorer,
    out_dir: Path,
    history: list[dict],
    evaluators: dict[str, Scorer] | None = None,
) -> dict:
    """Generate, score, compare; write report.html and samples.csv; return the metrics block."""
    e = config.eval
    if e.max_prompts:
        prompts = prompts[: e.max_prompts]
        references = references[: e.max_prompts] if references else None
    if not prompts:
        raise DetoxError("no prompts to evaluate")
    if evaluators is None:
        evaluators = {name: build_evaluator(name, e.nontoxic_label) for name in e.evaluators}
    k = e.samples_per_prompt
    before, _ = sample_responses(policy, prompts, config, k, use_adapter=False, desc="eval: reference")
    after, kl = sample_responses(policy, prompts, config, k, use_adapter=True, desc="eval: policy")

    scored: dict[str, dict] = {}
    raw: dict[str, dict[str, list[float]]] = {}
    roles = [(reward, "reward")] + [(s, "held-out") for s in evaluators.values()]
    for scorer, role in roles:
        try:
            tox_before, tox_after = scorer.toxicity(before), scorer.toxicity(after)
        except NotImplementedError:
            continue
        summary = toxicity_summary(
            np.reshape(tox_before, (len(prompts), k)), np.reshape(tox_after, (len(prompts), k)), e.threshold,
            seed=config.seed,
        )
        scored[scorer.name] = {"role": role, **summary}
        raw[scorer.name] = {"reference": [float(x) for x in tox_before], "policy": [float(x) for x in tox_after]}

    reward_before, reward_after = reward.rewards(before), reward.rewards(after)
    refs = [r for r in references for _ in range(k)] if references else None
    quality = {"reference": quality_metrics(before, refs), "policy": quality_metrics(after, refs)}
    quality["policy"]["kl_mean"] = float(np.mean(kl))

    first = slice(None, None, k)  # one response per prompt in the qualitative table
    table = qualitative_table(prompts, before[first], after[first], reward_before[first], reward_after[first])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table_csv(table, out_dir / "samples.csv")
    with (out_dir / "responses.jsonl").open("w", encoding="utf-8") as f:
        for i, (b, a) in enumerate(zip(before, after)):
            row = {"prompt": prompts[i // k], "reference_response": b, "policy_response": a,
                   "reward_reference": float(reward_before[i]), "reward_policy": float(reward_after[i]),
                   "kl": float(kl[i])}
            row.update({f"toxicity_{n}_{side}": v[side][i] for n, v in raw.items() for side in v})
            f.write(json.dumps(row) + "\n")

    evaluation = {
        "num_prompts": len(prompts),
        "samples_per_prompt": k,
        "threshold": e.threshold,
        "reward_mean": {"reference": float(np.mean(reward_before)), "policy": float(np.mean(reward_after))},
        "evaluators": scored,
        "quality": quality,
    }
    render_report({"run": run_info(config), "evaluation": evaluation}, table, history, out_dir / "report.html", raw)
    return evaluation


def run_info(config: Config) -> dict:
    return {"model": config.model.name_or_path, "output_dir": config.output_dir, "steps": config.rl.steps}


def evaluate_run(
    run_dir: str | Path,
    dataset: str | None = None,
    samples_per_prompt: int | None = None,
    evaluators: list[str] | None = None,
    max_prompts: int | None = None,
    threshold: float | None = None,
    output_dir: str | Path | None = None,
) -> Path:
    """Evaluate a finished (or checkpointed-and-saved) run; returns the directory of the report."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DetoxError(f"{run_dir} is not a detoxrl run directory (config.yaml is missing)")
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise DetoxError(f"{run_dir} has no trained adapter (adapter/adapter_config.json is missing); did training finish?")
    overrides = {
        "eval.samples_per_prompt": samples_per_prompt,
        "eval.evaluators": evaluators,
        "eval.max_prompts": max_prompts,
        "eval.threshold": threshold,
    }
    config = build_config(config_file=run_dir / "config.yaml", overrides={k: v for k, v in overrides.items() if v is not None})
    if config.eval.samples_per_prompt < 1:
        raise DetoxError(f"samples_per_prompt must be at least 1, got {config.eval.samples_per_prompt}")
    if config.eval.max_prompts is not None and config.eval.max_prompts < 1:
        raise DetoxError(f"max_prompts must be at least 1, got {config.eval.max_prompts}")

    if dataset:
        config.data.dataset = dataset
        rows = load_rows(config.data)
        if config.data.text_column not in rows.column_names:
            raise DetoxError(
                f"dataset {dataset} has no column {config.data.text_column!r}; its columns are: {', '.join(rows.column_names)}"
            )
        rows = rows.map(lambda t: {"prompt": config.data.prompt_template.replace("{text}", t)},
                        input_columns=config.data.text_column)
    else:
        _, rows = build_splits(config.data, config.seed)
    column = config.data.reference_column
    references = list(rows[column]) if column and column in rows.column_names else None

    # Loaded before anything is generated, so an evaluator that cannot be loaded fails fast.
    held_out = {name: build_evaluator(name, config.eval.nontoxic_label) for name in config.eval.evaluators}
    reward = build_reward(config.reward, "cpu", config.model.trust_remote_code)
    policy = load_policy(config.model, adapter=run_dir / "adapter")
    history_file = run_dir / "history.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.is_file() else []
    out = Path(output_dir) if output_dir else run_dir / "eval"
    evaluation = evaluate_policy(config, policy, list(rows["prompt"]), references, reward, out, history, held_out)
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps({"run": run_info(config), "evaluation": evaluation}, indent=2))
    os.replace(tmp, out / "metrics.json")
    return out
