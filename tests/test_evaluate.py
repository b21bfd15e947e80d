"""Evaluation on tiny models: merged-weight sampling, perplexity, the learning-curve judge, groups, the
toxicity group and its control prompts."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detoxrl.config import ModelConfig, build_config
from detoxrl.data import build_splits, run_splits
from detoxrl.errors import DetoxError
from detoxrl.evaluation import command, evaluate
from detoxrl.evaluation.evaluate import (
    Rescoring,
    evaluate_policy,
    held_out_evaluator,
    inference_weights,
    judge_subset,
    load_fluency_model,
    prompt_groups,
    recorded_nll,
    reference_pass,
    response_kl,
    sample,
    select_prompts,
    texts_of,
)
from detoxrl.policy import PromptPass, load_policy
from detoxrl.rewards.base import Scorer
from detoxrl.rl import trainer
from detoxrl.rl.rollout import reference_logprobs, teacher_forced_logprobs
from detoxrl.rl.trainer import build_accelerator
from detoxrl.rundir import RunDir
from tiny import tiny_run_config

PROMPTS = ["person1 said the price of the car is bad", "thanks for the nice meeting", "the school talk"]


class WordCount(Scorer):
    """Toxicity = share of the words "idiot", "stupid" and "damn"; deterministic, so values can be recomputed."""

    name = "word-count"
    BAD = {"idiot", "stupid", "damn"}

    def toxicity(self, texts):
        return np.array([sum(w in self.BAD for w in t.split()) / max(1, len(t.split())) for t in texts])

    def rewards(self, texts):
        return 1.0 - self.toxicity(texts)


class FlagsAll(Scorer):
    """Every text is toxic: the counts then show how many prompts and samples were judged."""

    name = "flags-all"

    def toxicity(self, texts):
        return np.ones(len(texts))

    def rewards(self, texts):
        return np.zeros(len(texts))


def perturbed_policy(path):
    policy = load_policy(ModelConfig(name_or_path=str(path), lora_r=4))
    torch.manual_seed(1)
    for name, param in policy.model.named_parameters():
        if "lora_B" in name:  # a fresh LoRA is a no-op (B = 0); move it so merging changes the weights
            torch.nn.init.normal_(param, std=0.5)
    return policy


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_merged_sampling_gives_the_same_tokens(model, request, tmp_path):
    path = request.getfixturevalue(model)
    policy = perturbed_policy(path)
    config = tiny_run_config(path, tmp_path, **{"generation.max_new_tokens": 6, "eval.batch_size": 2})
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "base_layer" in n}
    unmerged = sample(policy, policy.model, PROMPTS, config, samples=2)
    policy.module.train()
    with inference_weights(policy) as merged_model:
        assert not merged_model.training
        merged = sample(policy, merged_model, PROMPTS, config, samples=2)
    assert policy.module.training  # the mode is restored
    assert texts_of(merged) == texts_of(unmerged)
    for m, u in zip(merged, unmerged):
        assert torch.equal(m.response_ids, u.response_ids)
        torch.testing.assert_close(m.logprobs, u.logprobs, atol=1e-5, rtol=0)  # float rounding only
    # the base weights come back to the bit, not up to the rounding of subtracting the update again
    assert all(torch.equal(p, base[n]) for n, p in policy.model.named_parameters() if n in base)
    kl = response_kl(policy, merged, config)
    assert kl.shape == (6,) and np.all(np.isfinite(kl))


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_reference_rescores_the_policys_responses_from_its_own_prompt_passes(model, request, tmp_path, monkeypatch):
    """Evaluation's reference re-scores the policy's responses to each batch of prompts from the prompts' pass it
    sampled that batch with: the log-probs of a separate reference pass to the bit, its own samples unchanged, and
    one prompts' pass per batch instead of two."""
    path = request.getfixturevalue(model)
    policy = perturbed_policy(path)
    config = tiny_run_config(path, tmp_path, **{"generation.max_new_tokens": 6, "eval.batch_size": 4})
    generation = config.eval.sampling(config.generation)
    with inference_weights(policy) as merged:
        rollouts = sample(policy, merged, PROMPTS, config, samples=2)  # 6 responses: batches of 4 and 2
    separate = [reference_logprobs(policy, r, generation, len(r.responses), with_model_logprobs=True)
                for r in rollouts]
    with policy.reference_model() as reference:
        plain = sample(policy, reference, PROMPTS, config, 2, record_model_logprobs=True)
    passes = []
    construct = PromptPass.__init__
    monkeypatch.setattr(PromptPass, "__init__", lambda self, *a, **k: (passes.append(self), construct(self, *a, **k))[1])
    with policy.reference_model() as reference:
        rescoring = Rescoring(policy, reference, rollouts, config)
        rescored = sample(policy, reference, PROMPTS, config, 2, record_model_logprobs=True, after_batch=rescoring)
        with pytest.raises(ValueError, match="computed for other rows"):
            teacher_forced_logprobs(policy, reference, rollouts[1], generation, prompt_pass=passes[0])
    assert len(rollouts) == 2 and len(passes) == 2 and rescoring.seconds > 0
    for r, (logprobs, model_logprobs) in zip(rollouts, separate):
        assert torch.equal(r.ref_logprobs, logprobs) and torch.equal(r.ref_model_logprobs, model_logprobs)
    assert texts_of(rescored) == texts_of(plain)
    assert all(torch.equal(a.logprobs, b.logprobs) and torch.equal(a.model_logprobs, b.model_logprobs)
               for a, b in zip(rescored, plain))
    kl, sums, _ = reference_pass(policy, rollouts, config)  # from the recorded log-probs, no pass of its own
    assert len(passes) == 2 and np.all(np.isfinite(kl)) and np.all(sums > 0)


def test_recorded_perplexity_equals_a_teacher_forced_pass(tiny_llama, tmp_path):
    """The sampler's temperature-1 record of the reference's own responses gives the same NLL as a
    separate pass, so evaluation needs one reference pass (over the policy's responses), not three."""
    policy = perturbed_policy(tiny_llama)
    config = tiny_run_config(tiny_llama, tmp_path, **{"eval.batch_size": 2, "generation.max_new_tokens": 6,
                                                      "generation.temperature": 0.7})
    with policy.reference_model() as reference:
        rollouts = sample(policy, reference, PROMPTS, config, 2, record_model_logprobs=True)
    recorded_sums, recorded_counts = recorded_nll(rollouts)
    kl, sums, counts = reference_pass(policy, rollouts, config)
    np.testing.assert_allclose(recorded_sums, sums, atol=1e-4)  # temperature 1, not the sampling 0.7
    np.testing.assert_array_equal(recorded_counts, counts)
    assert (recorded_counts > 0).all() and (recorded_sums > 0).all()
    np.testing.assert_allclose(kl, 0.0, atol=1e-4)  # the reference's own samples: no KL to itself


def test_judge_subset_matches_its_samples(tiny_t5, tmp_path):
    policy = perturbed_policy(tiny_t5)
    config = tiny_run_config(tiny_t5, tmp_path, **{"generation.max_new_tokens": 5, "eval.batch_size": 4})
    result = judge_subset(policy, PROMPTS, config, WordCount(), samples=2)
    with inference_weights(policy) as model:
        texts = texts_of(sample(policy, model, PROMPTS, config, 2))
    scores = WordCount().toxicity(texts).reshape(3, 2)
    assert result == pytest.approx({
        "eval/toxicity_probability": float((scores >= 0.5).any(axis=1).mean()),
        "eval/expected_max_toxicity": float(scores.max(axis=1).mean()),
        "eval/mean_toxicity": float(scores.mean()), "eval/toxic_rate": float((scores >= 0.5).mean()),
        "eval/response_length_words": float(np.mean([len(t.split()) for t in texts]))})
    assert judge_subset(policy, PROMPTS, config, WordCount(), samples=2) == result  # fixed seeds
    with pytest.raises(DetoxError, match="judge_subset needs prompts"):
        judge_subset(policy, [], config, WordCount())


def test_evaluate_policy_reports_groups_and_fluency(tiny_t5, tiny_llama, tmp_path):
    policy = perturbed_policy(tiny_t5)
    config = tiny_run_config(tiny_t5, tmp_path, **{
        "generation.max_new_tokens": 4, "eval.samples_per_prompt": 2, "eval.batch_size": 4,
        "eval.group_column": "heated", "eval.fluency_model": str(tiny_llama)})
    prompts = PROMPTS + ["a summary of the conversation"]
    references = ["price of the car", "thanks", "school", "a summary"]
    evaluation = evaluate_policy(config, policy, prompts, references, WordCount(), tmp_path / "eval", [],
                                 evaluators={}, groups=[True, False, False, True])
    assert evaluation["groups"].keys() == {"False", "True"}
    assert evaluation["groups"]["True"]["num_prompts"] == 2
    for side in ("reference", "policy"):
        block = evaluation["groups"]["False"][side]
        assert {"rougeL", "distinct_2", "length_mean", "perplexity", "perplexity_fluency_model"} <= block.keys()
        assert evaluation["quality"][side]["perplexity"] > 1 and evaluation["quality"][side]["distinct_3"] >= 0
    assert evaluation["reward_scorer"] == "word-count" and evaluation["examples_judge"] == "word-count"
    assert evaluation["evaluators"]["word-count"]["reference"]["samples"] == 8
    json.dumps(evaluation, allow_nan=False)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
    assert [r["group"] for r in rows] == [True, True, False, False, False, False, True, True]
    assert "Quality per group (heated)" in (tmp_path / "eval" / "report.html").read_text()


def test_group_column_and_fluency_model_errors(tiny_t5, tmp_path):
    from datasets import Dataset

    config = tiny_run_config(tiny_t5, tmp_path, **{"eval.group_column": "heated"})
    assert prompt_groups(Dataset.from_dict({"prompt": ["a", "b"], "heated": [True, False]}), config) == [True, False]
    with pytest.raises(DetoxError, match="eval.group_column 'heated' is not a column of the dataset; its columns "
                                         "are: prompt"):
        prompt_groups(Dataset.from_dict({"prompt": ["a"]}), config)
    with pytest.raises(DetoxError, match=r"fluency model \(eval.fluency_model\) not found"):
        load_fluency_model(str(tmp_path / "missing"))


def test_evaluator_spec_names_its_non_toxic_label(tiny_classifier):
    assert held_out_evaluator(f"{tiny_classifier}:hate", "nothate").index == 1  # the label after the colon
    assert held_out_evaluator(str(tiny_classifier), "nothate").index == 0  # eval.nontoxic_label
    with pytest.raises(DetoxError, match="label 'neutral' is not a class of the evaluator; its labels are: "
                                         "nothate, hate"):
        held_out_evaluator(f"{tiny_classifier}:neutral", "nothate")


def test_evaluate_run_puts_every_model_on_the_accelerators_device(tiny_t5, tiny_classifier, tmp_path, monkeypatch):
    """Policy, named reference, reward and held-out evaluators go to accelerate's device; config.device decides it."""
    config = tiny_run_config(tiny_t5, tmp_path / "run", tiny_classifier,
                             **{"model.reference": str(tiny_t5), "eval.evaluators": [str(tiny_classifier)]})
    assert build_accelerator(config).device == torch.device("cpu")  # device: cpu is honoured
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    config.save(run.config)
    load_policy(config.model).save_pretrained(run.adapter)

    seen = {}

    def record(config, policy, prompts, references, reward, out_dir, history, evaluators, groups, dataset, sources,
               **options):
        seen.update(policy=policy, reward=reward, evaluators=evaluators, out_dir=out_dir)
        seen["evaluation"] = {"num_prompts": len(prompts)}
        return seen["evaluation"]

    monkeypatch.setattr(evaluate, "evaluate_policy", record)
    # "meta" stands for an accelerator here: a module left behind would still be on the CPU
    monkeypatch.setattr(trainer, "build_accelerator", lambda config: SimpleNamespace(device=torch.device("meta")))
    out = command.evaluate_run(run.path)

    modules = [seen["policy"].module, seen["policy"].reference, seen["reward"].scorer.model,
               *(scorer.model for scorer in seen["evaluators"].values())]
    assert len(modules) == 4
    assert {p.device for module in modules for p in module.parameters()} == {torch.device("meta")}
    assert out == seen["out_dir"] == run.eval
    assert json.loads(RunDir(out).metrics.read_text())["evaluation"] == seen["evaluation"]


def test_select_prompts_takes_the_toxicity_group_then_controls():
    groups = [False, True, False, True, True, False, False]
    config = build_config(overrides={"eval.group_column": "heated", "eval.toxicity_group": "True",
                                     "eval.max_prompts": 2, "eval.control_prompts": 3})
    assert select_prompts(groups, 7, config) == ([1, 3, 0, 2, 5], 2)  # each part in dataset order
    config.eval.max_prompts, config.eval.control_prompts = None, 0
    assert select_prompts(groups, 7, config) == ([1, 3, 4], 3)
    config.eval.toxicity_group, config.eval.max_prompts = None, 4
    assert select_prompts(groups, 7, config) == ([0, 1, 2, 3], 4)  # without a toxicity group: the first max_prompts
    config.eval.toxicity_group = "yes"
    with pytest.raises(DetoxError, match="eval.toxicity_group 'yes' is not a value of eval.group_column 'heated' in "
                                         "the evaluated prompts; its values are: False, True"):
        select_prompts(groups, 7, config)
    with pytest.raises(DetoxError, match="eval.toxicity_group needs the prompts' values of eval.group_column"):
        select_prompts(None, 7, config)


def test_toxicity_is_measured_on_the_toxicity_group_only(tiny_t5, tmp_path):
    policy = perturbed_policy(tiny_t5)
    config = tiny_run_config(tiny_t5, tmp_path, **{
        "generation.max_new_tokens": 3, "eval.samples_per_prompt": 2, "eval.batch_size": 8,
        "eval.group_column": "heated", "eval.toxicity_group": "True", "eval.control_prompts": 1})
    prompts = PROMPTS + ["a summary of the conversation"]
    evaluation = evaluate_policy(config, policy, prompts, None, WordCount(), tmp_path / "eval", [],
                                 evaluators={"flags-all": FlagsAll()}, groups=[False, True, False, True])
    assert (evaluation["num_prompts"], evaluation["toxicity_prompts"], evaluation["control_prompts"]) == (3, 2, 1)
    assert evaluation["toxicity_group"] == "True"
    for side in ("reference", "policy"):
        flagged = evaluation["evaluators"]["flags-all"][side]
        assert [flagged[key] for key in ("prompts", "toxic_prompts", "samples", "toxic_samples")] == [2, 2, 4, 4]
        assert evaluation["evaluators"]["word-count"][side]["samples"] == 4  # the reward scorer too
    assert {g: b["num_prompts"] for g, b in evaluation["groups"].items()} == {"False": 1, "True": 2}  # quality: all
    rows = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
    assert [r["group"] for r in rows] == [True, True, True, True, False, False]
    assert [r["prompt"] for r in rows[::2]] == [PROMPTS[1], prompts[3], PROMPTS[0]]
    assert all("toxicity_flags-all_policy" in r for r in rows)  # every response keeps its scores
    assert evaluation["reward_mean"]["policy"] == pytest.approx(np.mean([r["reward_policy"] for r in rows[:4]]))
    assert len((tmp_path / "eval" / "samples.csv").read_text().splitlines()) == 1 + 2  # ranked toxicity prompts
    assert "Toxicity: 2 prompts with heated = True; quality: all 3 prompts" in \
        (tmp_path / "eval" / "report.html").read_text()


def test_evaluate_run_with_a_toxicity_group(tiny_t5, tiny_classifier, tmp_path):
    """``detoxrl evaluate`` selects from the test split (data.split_seed) by the dataset's heated column."""
    config = tiny_run_config(tiny_t5, tmp_path / "run", tiny_classifier, **{
        "generation.max_new_tokens": 3, "eval.evaluators": [], "eval.group_column": "heated",
        "eval.toxicity_group": "False", "eval.max_prompts": 2, "eval.control_prompts": 3})
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    config.save(run.config)
    load_policy(config.model).save_pretrained(run.adapter)
    out = command.evaluate_run(run.path)
    evaluation = json.loads(RunDir(out).metrics.read_text())["evaluation"]
    assert (evaluation["num_prompts"], evaluation["toxicity_prompts"], evaluation["control_prompts"]) == (5, 2, 3)
    assert evaluation["evaluators"][str(tiny_classifier)]["reference"]["prompts"] == 2
    rows = [json.loads(line) for line in RunDir(out).responses.read_text().splitlines()]
    assert [r["group"] for r in rows] == [False, False, True, True, True]


def test_evaluation_reports_the_composite_reward_that_was_trained(tiny_t5, tiny_classifier, tmp_path):
    """The evaluation scores responses with every trained term (scorer + fidelity + novelty), not the scorer alone."""
    from detoxrl.rewards.fidelity import rouge_l
    from detoxrl.rewards.novelty import bigram_novelty
    from tiny import THANKS_REWARD, thanks_share

    config = tiny_run_config(tiny_t5, tmp_path / "run", **{
        "generation.max_new_tokens": 4, "eval.evaluators": [str(tiny_classifier)], "eval.max_prompts": 4,
        "eval.samples_per_prompt": 2, "rl.batch_size": 4, "rl.mini_batch_size": 4, "rl.samples_per_prompt": 2,
        "rl.algorithm": "rloo", "reward.function": THANKS_REWARD, "reward.fidelity_weight": 2.0,
        "reward.novelty_weight": 1.5, "data.reference_column": "summary"})
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    config.save(run.config)
    load_policy(config.model).save_pretrained(run.adapter)
    evaluation = json.loads(RunDir(command.evaluate_run(run.path)).metrics.read_text())["evaluation"]
    rows = [json.loads(line) for line in (run.eval / "responses.jsonl").read_text().splitlines()]
    _, test_rows = build_splits(config.data)
    summaries = dict(zip(test_rows["prompt"], test_rows["summary"]))
    prompts, responses = [r["prompt"] for r in rows], [r["policy_response"] for r in rows]
    # novelty within groups of batch_size / k = 2 prompts (4 responses), as in training
    novelty = np.concatenate([bigram_novelty(responses[i:i + 4], prompts[i:i + 4]) for i in range(0, 8, 4)])
    expected = (np.array(thanks_share(responses)) + 2.0 * rouge_l(responses, [summaries[p] for p in prompts])
                + 1.5 * novelty)
    np.testing.assert_allclose([r["reward_policy"] for r in rows], expected, rtol=1e-5, atol=1e-6)
    assert set(evaluation["reward_terms"]["policy"]) == {"scorer", "fidelity", "novelty"}
    assert evaluation["reward"] == f"`{THANKS_REWARD}` + 2 x ROUGE-L against the reference summary + 1.5 x bigram novelty"
    assert evaluation["reward_mean"]["policy"] == pytest.approx(float(np.mean(expected)), rel=1e-5)
    # the guards no reward term computes, per side, with paired CIs; the calibration rows beside them
    for side in ("reference", "policy"):
        assert 0 <= evaluation["quality"][side]["specificity"] <= 1
        assert evaluation["guards"][side]["responses"] == 8
    assert set(evaluation["guards"]["differences"]) == {"specificity", "near_duplicate_rate", "copy_rate"}
    assert evaluation["calibration"]["reference summary"]["rougeL"] == pytest.approx(1.0)
    assert evaluation["calibration"]["constant sentence"]["opening_share"] == 1.0
    report = (run.eval / "report.html").read_text()
    assert "Guards the reward cannot buy" in report and "Calibration: texts of known quality" in report


def test_learning_curves_read_validation_prompts_never_the_test_split(monkeypatch):
    from detoxrl.train import curve_judge

    config = build_config(overrides={"data.dataset": "detoxrl:heated_dialogsum", "eval.curve_steps": 1,
                                     "eval.curve_prompts": 3, "eval.group_column": "heated", "eval.toxicity_group": "True"})
    train, validation, test = run_splits(config)
    assert len(validation) == 3 and all(validation["heated"])
    assert not set(validation["id"]) & (set(train["id"]) | set(test["id"]))
    assert len(train) + len(validation) == len(build_splits(config.data)[0])
    monkeypatch.setattr(evaluate, "held_out_evaluator", lambda spec, label: spec)
    monkeypatch.setattr(evaluate, "judge_subset", lambda policy, prompts, config, judge, samples: prompts)
    assert curve_judge(config, None, validation)() == list(validation["prompt"])
    config.eval.curve_steps = 0
    assert len(run_splits(config)[1]) == 0 and curve_judge(config, None, validation) is None
