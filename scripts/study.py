"""The algorithm study behind the offline preset (docs/results.md).

Model selection never looks at the test split: ``run`` holds validation prompts out of the
*training* split (the first N heated and 8 neutral dialogues), trains on the rest, and judges the
policy on them with hatesonar (never trained on) every ``--every`` steps. ``plot`` draws the
judge's toxicity probability and ROUGE-L against the number of training rollouts (wall-clock
figures of runs that shared the CPU with others are not comparable; per-step times measured
alone are in docs/results.md).

    python scripts/study.py run --name rloo --set '{"rl.algorithm": "rloo", "rl.samples_per_prompt": 4}'
    python scripts/study.py run --name reference --reference_only
    python scripts/study.py plot --out docs/img
    python scripts/study.py table
    python scripts/study.py paired reference:0 rloo:16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed

from detoxrl.config import build_config
from detoxrl.data import build_splits
from detoxrl.sampling import EVAL_STREAM, keyed_seeds
from detoxrl.evaluation.guards import guard_flags, guard_metrics
from detoxrl.evaluation.stats import mcnemar_exact, per_prompt_statistics, quality_metrics, side_summary
from detoxrl.policy import load_policy
from detoxrl.rewards import HateSonarScorer, ProfanityScorer, build_reward
from detoxrl.rewards.fidelity import rouge_l
from detoxrl.rl.rollout import generate
from detoxrl.rl.trainer import RLTrainer

RESULTS = Path("outputs/study")


def validation_split(train_rows, n_heated: int, n_neutral: int = 8):
    heated = [i for i, r in enumerate(train_rows) if r["heated"]][:n_heated]
    neutral = [i for i, r in enumerate(train_rows) if not r["heated"]][:n_neutral]
    held = set(heated + neutral)
    rest = train_rows.select([i for i in range(len(train_rows)) if i not in held])
    return rest, [train_rows[i] for i in heated], [train_rows[i] for i in neutral]


def judge(policy, rows, config, k: int, batch_size: int, use_adapter: bool, scorers) -> tuple[dict, list[str]]:
    hatesonar, profanity = scorers
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    references = [r["summary"] for r in rows for _ in range(k)]
    seeds = keyed_seeds(config.seed, EVAL_STREAM, [r["prompt"] for r in rows], k)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        if use_adapter:
            rollout = generate(policy, policy.model, prompts[chunk], config.generation, config.data.max_prompt_tokens,
                               seeds[chunk])
        else:
            with policy.reference_model() as reference:
                rollout = generate(policy, reference, prompts[chunk], config.generation,
                                   config.data.max_prompt_tokens, seeds[chunk])
        texts += rollout.responses
    tox = hatesonar.toxicity(texts).reshape(len(rows), k)
    prof = profanity.toxicity(texts).reshape(len(rows), k)
    quality = quality_metrics(texts, samples_per_prompt=k)
    guards = guard_metrics(texts, guard_flags(texts, [r["dialogue"] for r in rows], k))
    side = side_summary(tox)
    return {
        "judge_toxicity_probability": side["toxicity_probability"],
        "judge_toxic_prompts": side["toxic_prompts"], "prompts": side["prompts"],
        "judge_expected_max": side["expected_max_toxicity"],
        "judge_toxic_rate": side["toxic_rate"], "judge_mean": side["mean"],
        "reward_scorer_toxic_rate": side_summary(prof)["toxic_rate"],
        "rougeL": float(rouge_l(texts, references).mean()),
        "length_words": quality["length_mean"], "distinct_2": quality["distinct_2"],
        "empty": quality["empty_responses"], "repeated_token": quality["repeated_token_responses"],
        **{name: guards[name] for name in ("specificity", "opening_share", "most_common_opening",
                                           "near_duplicate_rate", "copy_rate")},
        # per prompt, for a paired test between runs judged on the same prompts and sampling seeds (`paired`)
        "prompt_max_toxicity": [round(float(x), 4) for x in per_prompt_statistics(tox)["expected_max_toxicity"]],
    }, texts


def run(args) -> None:
    torch.set_num_threads(args.threads)
    config = build_config("smollm2-offline", overrides={"report_to": [], "eval.enabled": False, **json.loads(args.set)})
    set_seed(config.seed)
    train_rows, held_out = build_splits(config.data)
    if args.held_out:  # the held-out split is validation when the preset's test split is a protocol's own data
        heated = [r for r in held_out if r["heated"]][: args.n_validation]
        neutral = [r for r in held_out if not r["heated"]][:8]
    else:  # the held-out split is the test split, never used here
        train_rows, heated, neutral = validation_split(train_rows, args.n_validation)
    if args.heated_only:
        train_rows = train_rows.filter(lambda row: row["heated"])
    scorers = (HateSonarScorer(), ProfanityScorer())
    policy = load_policy(config.model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = (RESULTS / f"{args.name}.jsonl").open("a")

    def point(step: int, elapsed: float, use_adapter: bool = True) -> None:
        tick = time.time()
        row = {"name": args.name, "step": step, "train_seconds": elapsed, "settings": json.loads(args.set)}
        row["heated"], texts = judge(policy, heated, config, args.k, args.batch_size, use_adapter, scorers)
        row["neutral"], _ = judge(policy, neutral, config, 2, args.batch_size, use_adapter, scorers)
        row["examples"] = texts[:: args.k][:6]
        row["eval_seconds"] = time.time() - tick
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)

    if args.reference_only:
        point(0, 0.0, use_adapter=False)
        return
    trainer = RLTrainer(config, policy, build_reward(config.reward, reference_name=config.data.reference_column),
                        list(train_rows["prompt"]),
                        references=list(train_rows[config.data.reference_column]))
    elapsed = 0.0
    while trainer.step_count < config.rl.steps:
        tick = time.time()
        stats = trainer.step(trainer.batch_prompts(trainer.step_count),
                             references=trainer.batch_references(trainer.step_count))
        elapsed += time.time() - tick
        log.write(json.dumps({"name": args.name, "train": stats, "train_seconds": elapsed}) + "\n")
        print(json.dumps({k: round(v, 4) for k, v in stats.items() if k.startswith(("env/", "objective/kl", "time/total"))}),
              flush=True)
        if trainer.step_count % args.every == 0 or trainer.step_count == config.rl.steps:
            point(trainer.step_count, elapsed)


def saved_rows() -> list[dict]:
    """Every row that ``run`` logged, over all runs."""
    return [json.loads(line) for f in sorted(RESULTS.glob("*.jsonl")) for line in f.read_text().splitlines()]


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = saved_rows()
    points = [r for r in rows if "heated" in r]
    reference = [r for r in points if r["step"] == 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 6))
    names = sorted({r["name"] for r in points} - {r["name"] for r in reference})
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(names), 1)))
    for name, color in zip(names, colors):
        mine = sorted((r for r in points if r["name"] == name), key=lambda r: r["step"])
        # the untrained model judged on the same validation prompts (--n_validation) starts the curve,
        # preferably the one with the same seed and dtype (they set the sampling)
        candidates = [r for r in reference if r["heated"]["prompts"] == mine[0]["heated"]["prompts"]]
        start = max(candidates, default=None, key=lambda r: sum(
            r["settings"].get(k) == mine[0]["settings"].get(k) for k in ("seed", "model.dtype")))
        xs = ([0] if start else []) + [r["step"] * r["settings"].get("rl.batch_size", 16) for r in mine]
        for ax, key in zip(axes, ("judge_toxicity_probability", "rougeL")):
            ys = ([start["heated"][key]] if start else []) + [r["heated"][key] for r in mine]
            ax.plot(xs, ys, marker="o", label=name, color=color)
    for ax, title in zip(axes, ("hatesonar toxicity probability (validation)", "ROUGE-L vs reference summary")):
        ax.set_xlabel("training rollouts")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)  # below the axes: it hid the curves
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.3, 1, 1))
    fig.savefig(out / "study.png", dpi=110)
    print(f"wrote {out / 'study.png'}")


def table(args) -> None:
    """The last validation point of every run, as a Markdown table."""
    rows = saved_rows()
    last = {}
    for row in rows:
        if "heated" in row and row["step"] >= last.get(row["name"], {}).get("step", -1):
            last[row["name"]] = row
    print("| run | steps | train min | tox. prob. (prompts) | exp. max | toxic rate | ROUGE-L heated / calm "
          "| distinct-2 | words | specificity | opening share | copy rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in sorted(last.items(), key=lambda item: item[1]["step"]):
        h, n = r["heated"], r["neutral"]
        guards = " | ".join(f"{h[key]:.3f}" if key in h else "—"
                            for key in ("specificity", "opening_share", "copy_rate"))
        print(f"| {name} | {r['step']} | {r['train_seconds'] / 60:.1f} | {h['judge_toxicity_probability']:.3f} "
              f"({h['judge_toxic_prompts']}/{h['prompts']}) | {h['judge_expected_max']:.3f} | {h['judge_toxic_rate']:.3f} "
              f"| {h['rougeL']:.3f} / {n['rougeL']:.3f} | {h['distinct_2']:.3f} | {h['length_words']:.1f} | {guards} |")


def paired(args) -> None:
    """Exact McNemar test between two validation points (``name:step``) on the same prompts and seeds."""
    rows = saved_rows()
    points = {f"{r['name']}:{r['step']}": r["heated"] for r in rows if "heated" in r}
    # a prompt is toxic when its highest-scored response is: the evaluation's per-prompt outcome, same threshold
    a, b = (per_prompt_statistics(points[key]["prompt_max_toxicity"])["toxicity_probability"].astype(bool)
            for key in (args.a, args.b))
    result = mcnemar_exact(a, b)
    print(f"{args.a}: {a.sum()}/{len(a)} toxic prompts, {args.b}: {b.sum()}/{len(b)}; "
          f"only {args.a}: {result['reference_only']}, only {args.b}: {result['policy_only']}, "
          f"exact McNemar p = {result['p_value']:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--set", default="{}", help="JSON object of dotted settings over the smollm2-offline preset")
    r.add_argument("--every", type=int, default=6, help="judge every this many steps")
    r.add_argument("--n_validation", type=int, default=24, help="heated validation dialogues")
    r.add_argument("--held_out", action="store_true",
                   help="validate on data.dataset's held-out split (when eval.protocol holds the test prompts)")
    r.add_argument("--heated_only", action="store_true", help="train on the heated dialogues only")
    r.add_argument("--k", type=int, default=4, help="responses per validation prompt")
    r.add_argument("--batch_size", type=int, default=48)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--reference_only", action="store_true")
    p = sub.add_parser("plot")
    p.add_argument("--out", default="docs/img")
    sub.add_parser("table")
    c = sub.add_parser("paired")
    c.add_argument("a", help="name:step of a run's validation point, e.g. val90_reference:0")
    c.add_argument("b")
    args = parser.parse_args()
    {"run": run, "plot": plot, "table": table, "paired": paired}[args.command](args)


if __name__ == "__main__":
    main()
