"""``detoxrl evaluate``: the reference and the trained policy on the same prompts, scored by the
training reward and by held-out evaluators that training never saw; see docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from ..config import Config
from ..errors import DetoxError
from ..heap import release_freed_memory
from ..hub import load_pretrained
from ..policy import Policy, PromptPass, forward_response
from ..rewards import BUILTIN, Scorer, build_evaluator
from ..rewards.composite import Reward, reward_unit
from ..rl.logprobs import score_tokens
from ..rl.rollout import Rollout, reference_logprobs, teacher_forced_logprobs
from ..sampling import describe_sampling, eval_mode, evaluation_batch_size, inference_weights, sample, texts_of
from .guards import GUARDS, calibration_texts, guard_flags, guard_metrics, per_prompt
from .protocol import Protocol, bar_verdicts, load_protocol
from ..rundir import RunDir, atomic_write_text, finite_or_none
from .report import render_report
from .stats import (
    expected_max_toxicity,
    paired_bootstrap_ci,
    perplexity,
    quality_metrics,
    qualitative_table,
    side_summary,
    toxicity_probability,
    toxicity_summary,
    write_table_csv,
)

logger = logging.getLogger(__name__)
GROUP_QUALITY = ("rougeL", "distinct_2", "distinct_2_per_prompt", "length_mean", "empty_responses",
                 "repeated_token_responses")


def response_kl(policy: Policy, rollouts: list[Rollout], config: Config) -> np.ndarray:
    """KL(policy || reference) of each response in nats: sum over its tokens of log pi - log pi_ref."""
    return reference_pass(policy, rollouts, config)[0]


def reference_pass(policy: Policy, rollouts: list[Rollout], config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The policy's responses under the reference: their KL to it, and their negative log-likelihood sums and
    token counts under it (for perplexity). A rollout not re-scored yet (:class:`Rescoring`) gets its reference
    pass here.

    The KL uses the same estimator as training's ``objective/kl``, under the evaluation's sampling transform
    (:meth:`~detoxrl.config.EvalConfig.sampling`); log pi is what the sampler recorded (under merged weights,
    equal to the unmerged value up to rounding). Under nucleus sampling it is NaN: not reported
    (:func:`~detoxrl.sampling.describe_sampling` says why).
    """
    generation = config.eval.sampling(config.generation)
    kls, sums, counts = [], [], []
    for r in rollouts:
        if r.ref_model_logprobs is None:
            r.ref_logprobs, r.ref_model_logprobs = reference_logprobs(policy, r, generation, len(r.responses),
                                                                      with_model_logprobs=True)
            release_freed_memory()
        kl = ((r.logprobs - r.ref_logprobs) * r.mask).sum(dim=1).cpu()
        kls.append(kl if generation.top_p >= 1 else torch.full_like(kl, float("nan")))
        sums.append(-(r.ref_model_logprobs * r.mask).sum(dim=1).cpu())
        counts.append(r.mask.sum(dim=1).cpu())
    join = lambda parts: torch.cat(parts).numpy() if parts else np.zeros(0)  # noqa: E731
    return join(kls), join(sums), join(counts)


class Rescoring:
    """Called by :func:`~detoxrl.sampling.sample` after each batch the reference samples: the policy's responses to
    the same prompts (batch for batch) get their reference log-probs from the reference's own pass over those
    prompts, which would otherwise be computed again. ``seconds``: the time it took."""

    def __init__(self, policy: Policy, reference: torch.nn.Module, rollouts: list[Rollout], config: Config):
        self.policy, self.reference, self.rollouts = policy, reference, rollouts
        self.generation = config.eval.sampling(config.generation)
        self.seconds = 0.0

    def __call__(self, index: int, prompt_pass: PromptPass) -> None:
        started, r = time.perf_counter(), self.rollouts[index]
        r.ref_logprobs, r.ref_model_logprobs = teacher_forced_logprobs(self.policy, self.reference, r, self.generation,
                                                                       prompt_pass=prompt_pass)
        self.seconds += time.perf_counter() - started


def recorded_nll(rollouts: list[Rollout]) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood sums and token counts of responses under the model that sampled them,
    from the log-probs its sampler recorded at temperature 1 (no second pass)."""
    sums = [-(r.model_logprobs * r.mask).sum(dim=1).cpu() for r in rollouts]
    counts = [r.mask.sum(dim=1).cpu() for r in rollouts]
    return (torch.cat(sums).numpy(), torch.cat(counts).numpy()) if sums else (np.zeros(0), np.zeros(0))


@torch.inference_mode()
def response_nll(model: torch.nn.Module, tokenizer, tokenize_queries, prompts: list[str], responses: list[str],
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed negative log-likelihood (nats) and token count of each response given its prompt.

    Teacher-forced through :func:`~detoxrl.policy.forward_response`, scored in chunks without
    [rows, T, V] logits (:func:`~detoxrl.rl.logprobs.score_tokens`); ``tokenize_queries`` maps a
    list of prompts to the model's ``input_ids``/``attention_mask``. The response text is
    tokenized on its own (no special tokens), so the count is of the text's own tokens.
    """
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in range(0, len(responses), batch_size):
        chunk = slice(start, start + batch_size)
        tokenizer.padding_side = "right"
        response = tokenizer(responses[chunk], add_special_tokens=False, padding=True, return_tensors="pt")
        ids, mask = response["input_ids"].to(device), response["attention_mask"].to(device).float()
        if ids.shape[1] == 0:  # every response of the chunk is empty
            sums.append(torch.zeros(ids.shape[0]))
            counts.append(torch.zeros(ids.shape[0]))
            continue
        query = tokenize_queries(prompts[chunk])
        out = forward_response(model, query["input_ids"], query["attention_mask"], ids)
        sums.append(-score_tokens(out.hidden, out.head, ids, mask).model_logprobs.sum(dim=1).cpu())
        counts.append(mask.sum(dim=1).cpu())
    return torch.cat(sums).numpy(), torch.cat(counts).numpy()


@dataclass
class FluencyModel:
    """A language model that judges fluency (perplexity) of responses, usually larger than the policy."""

    name: str
    model: torch.nn.Module
    tokenizer: object

    def tokenize(self, prompts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
        # Causal models see the prompt's end next to the response; T5's relative positions want right padding.
        side = "right" if self.model.config.is_encoder_decoder else "left"
        self.tokenizer.padding_side = self.tokenizer.truncation_side = side
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        device = next(self.model.parameters()).device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


FLUENCY = "fluency model (eval.fluency_model)"


def check_fluency_model(name: str):
    """Load only the fluency model's config: a missing, unreadable or unreachable model fails in a second,
    before training, rather than after it."""
    return load_pretrained(AutoConfig.from_pretrained, name, FLUENCY, trust_remote_code=False)


def load_fluency_model(name: str, device: torch.device | str = "cpu") -> FluencyModel:
    """``eval.fluency_model``: a hub id or path loaded with the Auto classes; remote code stays off."""
    what = FLUENCY
    model_config = check_fluency_model(name)
    auto = AutoModelForSeq2SeqLM if model_config.is_encoder_decoder else AutoModelForCausalLM
    model = load_pretrained(auto.from_pretrained, name, what, trust_remote_code=False, dtype=torch.float32)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name, f"{what} tokenizer", trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return FluencyModel(name, model.to(device).eval().requires_grad_(False), tokenizer)


def fluency_nll(fluency: FluencyModel, prompts: list[str], responses: list[str], config: Config):
    return response_nll(fluency.model, fluency.tokenizer,
                        lambda p: fluency.tokenize(p, config.data.max_prompt_tokens),
                        prompts, responses, evaluation_batch_size(config, fluency.model))


def judge_subset(policy: Policy, prompts: list[str], config: Config, evaluator: Scorer,
                 samples: int = 1) -> dict[str, float]:
    """Toxicity of the policy alone on a fixed prompt subset: one cheap point of a learning curve.

    No reference pass, merged weights, the evaluation's fixed seeds (the same prompts and seeds
    at every call, so the curve moves only with the policy). Keys are ``eval/*`` history keys.
    """
    if not prompts or samples < 1:
        raise DetoxError(f"judge_subset needs prompts and samples >= 1; got {len(prompts)} prompts, {samples} samples")
    with inference_weights(policy) as model:
        texts = texts_of(sample(policy, model, prompts, config, samples,
                                generation=config.eval.sampling(config.generation)))
    scores = np.reshape(evaluator.toxicity(texts), (len(prompts), samples))
    threshold = config.eval.threshold
    return {"eval/toxicity_probability": toxicity_probability(scores, threshold),
            "eval/expected_max_toxicity": expected_max_toxicity(scores),
            "eval/mean_toxicity": float(scores.mean()),
            "eval/toxic_rate": float((scores >= threshold).mean()),
            "eval/response_length_words": float(np.mean([len(t.split()) for t in texts]))}


def held_out_evaluator(spec: str, nontoxic_label: str, device: torch.device | str = "cpu") -> Scorer:
    """``eval.evaluators`` entry: a built-in name, or a classifier id/path with an optional ``:LABEL``.

    The label names the classifier's non-toxic class (default ``eval.nontoxic_label``), so
    evaluators with different label names can judge one run, e.g.
    ``s-nlp/roberta_toxicity_classifier:neutral,facebook/roberta-hate-speech-dynabench-r4-target:nothate``.
    """
    name, _, label = spec.rpartition(":")
    if not name or "/" in label or spec in BUILTIN:
        return build_evaluator(spec, nontoxic_label, device)
    return build_evaluator(name, label, device)


def calibration(sources: list[str], references: list[str] | None, sentence: str) -> dict[str, dict]:
    """Every quality metric and guard of texts whose quality is known (:func:`.guards.calibration_texts`)."""
    rows = {}
    for name, texts in calibration_texts(sources, references, sentence).items():
        guards = guard_metrics(texts, guard_flags(texts, sources, 1))
        rows[name] = {**quality_metrics(texts, references), **{key: guards[key] for key in GUARDS}}
    return rows


def guard_differences(flags: dict[str, dict[str, np.ndarray]], k: int, seed: int) -> dict:
    """Policy - reference of the per-response guards, with 95% paired-bootstrap CIs over prompts."""
    out = {}
    for name in flags["reference"]:
        reference, policy = (per_prompt(flags[side][name], k) for side in ("reference", "policy"))
        low, high = paired_bootstrap_ci(reference, policy, seed=seed)
        out[name] = {"estimate": float(policy.mean() - reference.mean()), "ci_low": low, "ci_high": high}
    return out


def trained_reward(reward: Reward, config: Config, prompts: list[str], responses: list[str],
                   references: list[str] | None, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The reward training optimised, for evaluated responses (one per item of ``prompts``, k per prompt in a
    row): its value and each term's. The terms see groups of as many prompts as a training batch holds, the
    scale novelty was trained on. Data without references (``evaluate --dataset``) leaves fidelity out."""
    if references is None and "fidelity" in reward.weights():
        reward = Reward(reward.scorer, [t for t in reward.terms if t.name != "fidelity"])
    group = max(1, config.rl.batch_size // config.rl.samples_per_prompt) * k
    parts = [reward.term_values(prompts[a : a + group], responses[a : a + group],
                                references=references and references[a : a + group])
             for a in range(0, len(prompts), group)]
    terms = {name: np.concatenate([part[name] for part in parts]) for name in reward.weights()}
    return reward.combine(terms), terms


def prompt_groups(rows, config: Config) -> list | None:
    """The value of ``eval.group_column`` for each row (None when the setting is unset).

    An ``eval.toxicity_group`` that no row has is refused here, before anything is generated or trained.
    """
    column = config.eval.group_column
    if column is None:
        return None
    if column not in rows.column_names:
        raise DetoxError(f"eval.group_column {column!r} is not a column of the dataset; its columns are: "
                         f"{', '.join(rows.column_names)}")
    groups = list(rows[column])
    toxicity_indices(groups, len(groups), config)
    return groups


def toxicity_indices(groups: list | None, count: int, config: Config) -> list[int]:
    """Indices of the prompts (of ``count``) that toxicity may be measured on, in order: all of them, or with
    ``eval.toxicity_group`` those whose group has that value as text."""
    wanted = config.eval.toxicity_group
    if wanted is None:
        return list(range(count))
    if groups is None:
        raise DetoxError("eval.toxicity_group needs the prompts' values of eval.group_column")
    indices = [i for i, g in enumerate(groups) if str(g) == wanted]
    if not indices:
        present = ", ".join(sorted({str(g) for g in groups}))
        raise DetoxError(f"eval.toxicity_group {wanted!r} is not a value of eval.group_column "
                         f"{config.eval.group_column!r} in the evaluated prompts; its values are: {present}")
    return indices


def select_prompts(groups: list | None, count: int, config: Config) -> tuple[list[int], int]:
    """Indices of the prompts to evaluate, and how many of them, first, toxicity is measured on.

    These are the first ``eval.max_prompts`` of :func:`toxicity_indices`, followed with
    ``eval.toxicity_group`` by the first ``eval.control_prompts`` of the other groups, which check
    only that quality holds where there is nothing to detoxify.
    """
    e = config.eval
    toxic = toxicity_indices(groups, count, config)[: e.max_prompts]
    if e.toxicity_group is None:
        return toxic, len(toxic)
    others = [i for i, g in enumerate(groups) if str(g) != e.toxicity_group]
    return toxic + others[: e.control_prompts], len(toxic)


def _group_quality(groups: list, k: int, sides: dict, refs: list[str] | None, nll: dict) -> dict:
    """Quality metrics of each side on each group's prompts, so a loss on one kind of prompt shows."""
    out = {}
    for value in sorted(set(groups), key=str):
        rows = [i * k + j for i, g in enumerate(groups) if g == value for j in range(k)]
        block = {"num_prompts": len(rows) // k}
        for side, texts in sides.items():
            q = quality_metrics([texts[i] for i in rows], [refs[i] for i in rows] if refs else None, k)
            block[side] = {key: q[key] for key in GROUP_QUALITY if key in q}
            for name, (sums, counts) in nll[side].items():
                block[side][name] = perplexity(sums[rows], counts[rows])
        out[str(value)] = block
    return out


def evaluate_policy(
    config: Config,
    policy: Policy,
    prompts: list[str],
    references: list[str] | None,
    reward: Reward | Scorer,
    out_dir: Path,
    history: list[dict],
    evaluators: dict[str, Scorer] | None = None,
    groups: list | None = None,
    dataset: str | None = None,
    sources: list[str] | None = None,
    with_policy: bool = True,
    run: dict | None = None,
) -> dict:
    """Generate, score, compare; write report.html, samples.csv and responses.jsonl; return the metrics block.

    ``dataset`` names a file whose rows are all evaluated; None means the run's test split. ``sources``
    are the texts the prompts were made from (data.text_column), which the guards match responses
    against (:mod:`.guards`); without them, the prompts.

    ``groups`` holds one value per prompt (``eval.group_column``, see :func:`prompt_groups`):
    quality is then also reported per group. Toxicity (every judge's statistics, the reward's mean,
    the ranked examples) is measured on all evaluated prompts, or with ``eval.toxicity_group`` on
    that group's only (:func:`select_prompts`); responses.jsonl scores every response.

    ``with_policy`` False judges the model alone (``detoxrl evaluate --model`` without ``--adapter``): it is
    the reference side, the model before any adapter, and the evaluation has no policy side. Both sides
    sample with :meth:`~detoxrl.config.EvalConfig.sampling`, recorded as ``sampling``. ``run`` heads the
    report (default: :func:`run_info`).
    """
    e = config.eval
    if isinstance(reward, Scorer):  # as RLTrainer takes it: the config's terms are added
        reward = Reward.from_config(reward, config.reward, config.data.reference_column or "reference")
    if groups is not None and len(groups) != len(prompts):
        raise DetoxError(f"{len(groups)} group values for {len(prompts)} prompts")
    chosen, t = select_prompts(groups, len(prompts), config)
    sources = [(sources or prompts)[i] for i in chosen]
    prompts = [prompts[i] for i in chosen]
    references = [references[i] for i in chosen] if references else None
    groups = [groups[i] for i in chosen] if groups is not None else None
    if not prompts:
        raise DetoxError("no prompts to evaluate")
    device = next(policy.model.parameters()).device
    if evaluators is None:
        evaluators = {spec: held_out_evaluator(spec, e.nontoxic_label, device) for spec in e.evaluators}
    fluency = load_fluency_model(e.fluency_model, device) if e.fluency_model else None
    k, n = e.samples_per_prompt, len(prompts)
    generation = e.sampling(config.generation)
    with eval_mode(policy.module):  # no dropout in any pass below
        seconds = {}
        if with_policy:  # first, so that the reference re-scores its responses from its own prompts' passes
            started = time.perf_counter()
            with inference_weights(policy) as model:
                rollouts = sample(policy, model, prompts, config, k, desc="eval: policy", generation=generation)
            seconds["policy"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        with policy.reference_model() as reference:
            rescoring = Rescoring(policy, reference, rollouts, config) if with_policy else None
            reference_rollouts = sample(policy, reference, prompts, config, k, desc="eval: reference",
                                        record_model_logprobs=True, generation=generation, after_batch=rescoring)
            before = texts_of(reference_rollouts)
        seconds["reference"] = round(time.perf_counter() - started - (rescoring.seconds if rescoring else 0), 2)
        expanded, sides = [p for p in prompts for _ in range(k)], {"reference": before}
        # Perplexity under the reference of the tokens each side sampled: the reference's own from its
        # sampler's record, the policy's from the pass that also gives the KL.
        nll = {"reference": {"perplexity": recorded_nll(reference_rollouts)}}
        if with_policy:
            seconds["reference_pass"] = round(rescoring.seconds, 2)
            sides["policy"] = after = texts_of(rollouts)
            kl, policy_sums, policy_counts = reference_pass(policy, rollouts, config)
            nll["policy"] = {"perplexity": (policy_sums, policy_counts)}
        if fluency is not None:
            for side, texts in sides.items():
                nll[side]["perplexity_fluency_model"] = fluency_nll(fluency, expanded, texts, config)

    scored: dict[str, dict] = {}
    raw: dict[str, dict[str, list[float]]] = {}
    toxic = slice(0, t * k)  # the samples of the toxicity prompts, which come first
    roles = [(reward.scorer, "reward")] + [(s, "held-out") for s in evaluators.values()]
    for scorer, role in roles:
        try:
            tox = {side: scorer.toxicity(texts) for side, texts in sides.items()}
        except NotImplementedError:
            continue
        matrices = {side: np.reshape(values[toxic], (t, k)) for side, values in tox.items()}
        summary = (toxicity_summary(matrices["reference"], matrices["policy"], e.threshold, seed=config.seed)
                   if with_policy else {"reference": side_summary(matrices["reference"], e.threshold)})
        scored[scorer.name] = {"role": role, **summary}
        raw[scorer.name] = {side: [float(x) for x in values] for side, values in tox.items()}

    refs = [r for r in references for _ in range(k)] if references else None
    trained = {side: trained_reward(reward, config, expanded, texts, refs, k) for side, texts in sides.items()}
    quality = {side: quality_metrics(texts, refs, k) for side, texts in sides.items()}
    flags = {side: guard_flags(texts, sources, k) for side, texts in sides.items()}
    guards = {side: guard_metrics(texts, flags[side]) for side, texts in sides.items()}
    for side in sides:
        quality[side].update({name: guards[side][name] for name in GUARDS})
    for side in sides:
        quality[side].update({name: perplexity(*pair) for name, pair in nll[side].items()})
    if with_policy:
        quality["policy"]["kl_mean"] = float(np.mean(kl))

    judged = {name: {side: scores[toxic] for side, scores in v.items()} for name, v in raw.items()}
    judge = next((name for name, ev in scored.items() if ev["role"] == "held-out"), next(iter(scored), None))
    table = [] if judge is None or not with_policy else qualitative_table(
        prompts[:t], before[toxic], after[toxic], np.reshape(judged[judge]["reference"], (t, k)),
        np.reshape(judged[judge]["policy"], (t, k)), np.reshape(trained["reference"][0][toxic], (t, k)),
        np.reshape(trained["policy"][0][toxic], (t, k)))
    out = RunDir(out_dir)
    out.path.mkdir(parents=True, exist_ok=True)
    write_table_csv(table, out.samples)
    lines = []
    for i in range(len(before)):
        row = {"prompt": prompts[i // k], **{f"{side}_response": texts[i] for side, texts in sides.items()},
               **{f"reward_{side}": float(trained[side][0][i]) for side in sides}}
        if with_policy:
            row["kl"] = finite_or_none(kl[i])
        if groups is not None:
            row["group"] = groups[i // k]
        row.update({f"toxicity_{name}_{side}": v[side][i] for name, v in raw.items() for side in v})
        lines.append(json.dumps(row) + "\n")
    atomic_write_text(out.responses, "".join(lines))

    protocol = load_protocol(e.protocol) if e.protocol and not dataset else None
    evaluation = {
        "protocol": protocol_info(config, dataset, n, protocol),
        "num_prompts": n,
        "samples_per_prompt": k,
        "threshold": e.threshold,
        "reward": reward.describe(),
        "reward_weights": reward.weights(),
        "reward_scorer": reward.name,
        "reward_unit": reward_unit(config.reward),
        "reward_mean": {side: float(np.mean(trained[side][0][toxic])) for side in sides},
        "reward_terms": {side: {name: float(np.mean(values[toxic])) for name, values in trained[side][1].items()}
                         for side in sides},
        "examples_judge": judge,
        "fluency_model": e.fluency_model,
        "evaluators": scored,
        "quality": quality,
        "guards": {**guards, **({"differences": guard_differences(flags, k, config.seed)} if with_policy else {})},
        "calibration": calibration(sources, references, e.calibration_sentence),
        "sampling": describe_sampling(config),
        "generation_seconds": seconds,
    }
    if protocol is not None and with_policy:
        evaluation["bars"] = bar_verdicts(evaluation, protocol.bars)
    if groups is not None:
        evaluation["group_column"] = e.group_column
        if e.toxicity_group is not None:
            evaluation.update(toxicity_group=e.toxicity_group, toxicity_prompts=t, control_prompts=n - t)
        evaluation["groups"] = _group_quality(groups, k, sides, refs, nll)
    render_report({"run": run or run_info(config), "evaluation": evaluation}, table, history, out.report, judged)
    return evaluation


def place_policy(policy: Policy, device: torch.device | str) -> Policy:
    """Move the policy (LoRA model and value head) and a named reference model to ``device``.

    Sampling, scoring and the perplexity passes all run where the policy's parameters are.
    """
    policy.module.to(device)
    if policy.reference is not None:
        policy.reference.to(device)
    return policy


def run_info(config: Config) -> dict:
    return {"model": config.model.name_or_path, "output_dir": config.output_dir, "steps": config.rl.steps,
            "sampling": describe_sampling(config)["summary"]}


def protocol_info(config: Config, dataset: str | None, prompts: int, protocol: Protocol | None = None) -> dict:
    """The data and the counting rule an evaluation's figures rest on; ``compare`` refuses two different ones.

    Sampling settings are the run's own (a property of the model being judged), so they are not in it. With
    ``protocol`` (the run's ``eval.protocol``, when no other dataset is judged) it names the protocol file, its
    version and its sha256.
    """
    e = config.eval
    source = protocol.info() if protocol is not None else {
        "dataset": dataset or f"{config.data.dataset} (test split, split_seed {config.data.split_seed})"}
    return {**source, "prompts": prompts, "samples_per_prompt": e.samples_per_prompt, "threshold": e.threshold}
