"""The shared training loop: statistics, schedules, external rollouts, resume, and the algorithms' settings."""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tiny import ThanksShare, run_child, subprocess_env, tiny_run_config, tiny_run_settings, write_yaml

from detoxrl.errors import DetoxError
from detoxrl.policy import load_policy
from detoxrl.rewards import Scorer
from detoxrl.rl.trainer import RLTrainer

PROMPTS = ["the person1 said thanks about work", "the meeting is good", "a car and a home", "school talk"]
# Responses of 1 to 4 words (2 to 5 tokens with EOS), so that micro-batches hold different numbers of tokens.
RESPONSES = ["thanks", "the car and a home", "nice", "please talk about the", "good thanks", "a",
             "thanks thanks thanks", "home and school"]
REWARDS = [1.0, 0.0, 0.5, -1.0, 2.0, 0.0, 1.5, -0.5]


def make_trainer(model, tmp_path, references=None, **dotted) -> RLTrainer:
    torch.manual_seed(0)  # the fresh LoRA's initialisation, as train() seeds it
    config = tiny_run_config(model, tmp_path, **{"rl.batch_size": 8, "rl.mini_batch_size": 4,
                                                 "generation.max_new_tokens": 5, **dotted})
    return RLTrainer(config, load_policy(config.model), ThanksShare(), PROMPTS, references=references)


def test_entropy_is_finite_with_min_new_tokens(tiny_t5, tmp_path):
    trainer = make_trainer(tiny_t5, tmp_path, **{"generation.min_new_tokens": 2})
    stats = trainer.step(trainer.batch_prompts(0))
    assert math.isfinite(stats["objective/entropy"]) and stats["objective/entropy"] > 0


def test_python_api_trainer_accumulates_gradients_and_follows_the_schedule(tiny_llama, tmp_path):
    # 8 rollouts, optimiser steps of 4 made of 2 accumulated micro-batches of 2: 2 optimiser steps per step.
    trainer = make_trainer(tiny_llama, tmp_path, **{"rl.gradient_accumulation_steps": 2, "rl.steps": 2,
                                                    "rl.lr_scheduler": "linear", "rl.learning_rate": 0.01})
    assert trainer.accelerator.gradient_accumulation_steps == 2
    rates = [s["learning_rate"] for s in trainer.train()]
    # 4 optimiser steps planned in all: the linear schedule is at 1/2 after step 1 and at 0 after step 2.
    assert rates == pytest.approx([0.005, 0.0])


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_resume_from_a_checkpoint_continues_exactly(algorithm, tiny_t5, tmp_path):
    settings = {"rl.algorithm": algorithm, "rl.samples_per_prompt": 1 if algorithm == "ppo" else 2,
                "rl.steps": 4, "rl.learning_rate": 0.01, "save_total_limit": 1}
    straight = make_trainer(tiny_t5, tmp_path / "a", **settings)
    straight.train()

    first = make_trainer(tiny_t5, tmp_path / "b", **settings)
    for _ in range(2):
        first.history.append(first.step(first.batch_prompts(first.step_count)))
    saved = first.save_checkpoint()
    resumed = make_trainer(tiny_t5, tmp_path / "b", **settings)
    resumed.load_checkpoint(saved)
    resumed.train()

    assert resumed.step_count == 4 and [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    expected = dict(straight.policy.module.named_parameters())
    for name, param in resumed.policy.module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, expected[name], atol=0, rtol=0)
    assert json.loads((saved / "state.json").read_text())["algorithm"] == algorithm


def test_checkpoint_is_on_disk_before_it_replaces_the_previous_one(tiny_t5, tmp_path, monkeypatch):
    """Survives a power loss: every file and the staging directory are fsynced before the rename, and the parent
    directory (the rename itself) before the older checkpoint is deleted."""
    events = []
    real_fsync, real_rename, real_rmtree = os.fsync, Path.rename, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(self.resolve())))
        return real_rename(self, target)

    def rmtree(path, *args, **kwargs):
        if Path(path).exists():
            events.append(("rmtree", str(Path(path).resolve())))
        return real_rmtree(path, *args, **kwargs)

    trainer = make_trainer(tiny_t5, tmp_path, **{"save_total_limit": 1})
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    trainer.step_count = 1
    first = trainer.save_checkpoint().resolve()
    trainer.step_count = 2
    events.clear()
    second = trainer.save_checkpoint().resolve()

    def when(*event) -> int:
        """Where the last such event is in ``events``."""
        assert event in events, f"never happened: {event}"
        return len(events) - 1 - events[::-1].index(event)

    staging = second.parent / f".tmp-{second.name}"
    renamed, rotated = when("rename", str(staging)), when("rmtree", str(first))
    files = sorted(p.name for p in second.iterdir())
    assert {"state.json", "trainable.safetensors", "optimizer.safetensors", "rng-0.json"} <= set(files)
    for name in files:
        assert when("fsync", str(staging / name)) < renamed, name
    assert when("fsync", str(staging)) < renamed < when("fsync", str(second.parent)) < rotated
    assert not first.exists()


def test_step_takes_external_responses_and_rewards(tiny_t5, tmp_path):
    """The recipe's ppo_trainer.step(query, response, reward), with responses and rewards made elsewhere:
    each prompt once, its k responses (and their rewards) in a row."""
    trainer = make_trainer(tiny_t5, tmp_path, **{"rl.algorithm": "rloo", "rl.samples_per_prompt": 2,
                                                 "rl.batch_size": 4, "rl.mini_batch_size": 4, "rl.learning_rate": 0.05})
    prompts = ["school talk", "the meeting is good"]
    responses = ["thanks thanks", "the car", "thanks", "a home"]
    stats = trainer.step(prompts, responses, rewards=[1.0, 0.0, 1.0, 0.0])
    assert stats["env/reward_mean"] == pytest.approx(0.5)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts as a no-op
    with pytest.raises(DetoxError, match="rewards must be 4 finite numbers, one per response"):
        trainer.step(prompts, responses, rewards=[1.0, 0.0, float("nan"), 0.0])
    with pytest.raises(DetoxError, match=r"responses must be one per response: 2 prompt\(s\) x rl.samples_per_prompt "
                                         r"\(2\) = 4, got 2"):
        trainer.step(prompts, responses[:2], rewards=[1.0, 0.0])
    with pytest.raises(DetoxError, match=r"rewards must be one per response: .* = 4, got 2"):
        trainer.step(prompts, responses, rewards=[1.0, 0.0])


class RecordingScorer(Scorer):
    """ThanksShare that keeps the texts it was given."""

    name = "recording"

    def __init__(self):
        self.texts = []

    def rewards(self, texts):
        self.texts.extend(texts)
        return ThanksShare().rewards(texts)


def test_step_samples_k_responses_to_each_prompt_given_once(tiny_t5, tmp_path):
    torch.manual_seed(0)
    config = tiny_run_config(tiny_t5, tmp_path, **{"rl.algorithm": "rloo", "rl.samples_per_prompt": 2,
                                                   "rl.batch_size": 4, "rl.mini_batch_size": 4,
                                                   "generation.max_new_tokens": 5, "reward.score_query": True})
    scorer = RecordingScorer()
    trainer = RLTrainer(config, load_policy(config.model), scorer, PROMPTS)
    trainer.step(["school talk", "a car and a home"])
    # 2 responses to each prompt, in a row: the leave-one-out groups (rows 0-1, 2-3) each hold one prompt.
    assert len(scorer.texts) == 4
    assert [t.startswith("school talk ") for t in scorer.texts] == [True, True, False, False]
    assert [t.startswith("a car and a home ") for t in scorer.texts] == [False, False, True, True]
    # The training loop's batches are whole prompts, each once: step() makes the k copies.
    assert trainer.batch_prompts(0) == [PROMPTS[i] for i in trainer.batch_indices(0)]
    assert len(trainer.batch_prompts(0)) == 2


def recorded_update(trainer: RLTrainer) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One step on RESPONSES and REWARDS: the gradient at every optimiser step, and the trainable weights after."""
    gradients = []
    trainer.optimizer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: gradients.append(
        torch.cat([p.grad.flatten() for group in optimizer.param_groups for p in group["params"]])))
    k = trainer.config.rl.samples_per_prompt
    trainer.step((PROMPTS * 2)[: len(RESPONSES) // k], RESPONSES, REWARDS)
    return gradients, {n: p.detach().clone() for n, p in trainer.policy.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("normalization", ["token", "sequence"])
@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_gradient_accumulation_gives_the_update_of_the_whole_mini_batch(algorithm, normalization, tiny_t5, tmp_path):
    """Mini-batches of 4 in 2 accumulated micro-batches of 2 update as mini-batches of 4 at once. The gradients are
    compared unclipped, as Adam and clipping would hide a wrong scale (not a wrong weighting of tokens); the small
    learning rate keeps Adam's amplified rounding in barely-moved coordinates under the weights' 5e-6 (1.4e-6 seen
    with AVX2 kernels, where the chunked log-probs sum in another order)."""
    settings = {"rl.algorithm": algorithm, "rl.samples_per_prompt": 1 if algorithm == "ppo" else 2,
                "rl.loss_normalization": normalization, "rl.learning_rate": 0.001, "rl.max_grad_norm": 1e9}
    whole = recorded_update(make_trainer(tiny_t5, tmp_path / "whole", **settings))
    split = recorded_update(make_trainer(tiny_t5, tmp_path / "split", **settings,
                                         **{"rl.gradient_accumulation_steps": 2}))
    assert len(whole[0]) == len(split[0]) == 2  # 8 rollouts, optimiser steps of 4
    for a, b in zip(split[0], whole[0]):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    for name, weight in whole[1].items():
        torch.testing.assert_close(split[1][name], weight, atol=5e-6, rtol=0)


def test_a_non_finite_loss_stops_before_the_optimiser_step(tiny_t5, tmp_path):
    trainer = make_trainer(tiny_t5, tmp_path, **{"rl.algorithm": "grpo", "rl.samples_per_prompt": 2,
                                                 "rl.learning_rate": 0.05})
    real_loss = trainer.algorithm.loss

    def nan_kl(*args):
        loss, stats = real_loss(*args)
        return loss * np.nan, {**stats, "loss/kl": stats["loss/kl"] * np.nan}

    trainer.algorithm.loss = nan_kl
    before = {n: p.detach().clone() for n, p in trainer.policy.module.named_parameters() if p.requires_grad}
    with pytest.raises(DetoxError, match=r"^step 1: the loss is not finite \(loss/kl\); stopped before the optimiser"):
        trainer.step(PROMPTS[:2], RESPONSES[:4], REWARDS[:4])
    for name, param in trainer.policy.module.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, before[name]), name


def test_an_accelerator_that_accumulates_differently_is_refused(tiny_t5, tmp_path):
    config = tiny_run_config(tiny_t5, tmp_path)
    with pytest.raises(DetoxError, match="accumulates 2 micro-batch.* but rl.gradient_accumulation_steps is 1"):
        RLTrainer(config, load_policy(config.model), ThanksShare(), PROMPTS,
                  accelerator=Accelerator(cpu=True, gradient_accumulation_steps=2))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rl.algorithm": "a2c"}, "rl.algorithm must be one of ppo, rloo, grpo, got 'a2c'"),
        ({"rl.algorithm": "rloo", "rl.samples_per_prompt": 1}, "rl.samples_per_prompt must be at least 2, got 1"),
        ({"rl.algorithm": "grpo", "rl.samples_per_prompt": 3, "rl.batch_size": 8},
         "rl.batch_size (8) must be divisible by rl.samples_per_prompt (3)"),
        ({"rl.algorithm": "rloo", "rl.samples_per_prompt": 2, "rl.vf_coef": 0.5},
         "rl.vf_coef configures the value head, which rl.algorithm rloo does not have"),
        ({"rl.loss_normalization": "per-word"}, "rl.loss_normalization must be token or sequence"),
        ({"reward.novelty_weight": -1.0}, "reward.novelty_weight must be 0 or more (a finite number), got -1.0"),
    ],
    ids=["unknown-algorithm", "k-below-2", "batch-not-divisible-by-k", "value-head-setting", "normalization",
         "negative-novelty-weight"],
)
def test_bad_algorithm_settings_are_one_line_errors(settings, message, tiny_t5, tmp_path, run_cli):
    config = write_yaml(tmp_path / "config.yaml", tiny_run_settings(tiny_t5, tmp_path / "run", **settings))
    code, _, err = run_cli(["train", "--config", config])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.slow
def test_two_process_rloo_matches_one_process_and_its_schedule(tiny_t5, tmp_path):
    """k responses of a prompt stay on one process; the learning rate follows the same schedule on 2 processes."""
    settings = tiny_run_settings(
        tiny_t5, tmp_path / "unused", **{"threads": 1, "generation.max_new_tokens": 5, "data.max_prompt_tokens": 32,
                                         "rl": {"algorithm": "rloo", "samples_per_prompt": 2, "steps": 3,
                                                "batch_size": 8, "mini_batch_size": 8, "learning_rate": 0.01,
                                                "lr_scheduler": "linear"},
                                         "reward.novelty_weight": 1.0})
    config = write_yaml(tmp_path / "config.yaml", settings)
    histories = {}  # the novelty term compares responses across processes: it must score as on one process
    for name, processes in (("one", 1), ("two", 2)):
        launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
                    if processes > 1 else [sys.executable])
        done = run_child(launcher + ["-m", "detoxrl.cli", "train", "--config", str(config), "--output_dir",
                                     str(tmp_path / name)], cwd=tmp_path, env=subprocess_env())
        assert done.returncode == 0, done.stderr[-2000:]
        histories[name] = [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
    for one, two in zip(histories["one"], histories["two"]):
        assert two["learning_rate"] == pytest.approx(one["learning_rate"], rel=1e-9)
        assert two["env/reward_mean"] == pytest.approx(one["env/reward_mean"], abs=1e-6)
        assert two["objective/kl"] == pytest.approx(one["objective/kl"], abs=1e-4)
        assert two["env/novelty_mean"] == pytest.approx(one["env/novelty_mean"], abs=1e-6)
    assert histories["one"][-1]["learning_rate"] == 0.0


def test_novelty_weight_adds_bigram_novelty_across_prompts(tiny_t5, tmp_path):
    trainer = make_trainer(tiny_t5, tmp_path, **{"reward.novelty_weight": 2.0, "rl.batch_size": 2,
                                                 "rl.mini_batch_size": 2})
    stats = trainer.step(["school talk", "the meeting is good"], ["thanks a lot", "thanks a bunch of cars"])
    # ThanksShare: 1/3 and 1/5; "thanks a" is shared by the two prompts: novelty 1/2 and 3/4.
    assert stats["env/novelty_mean"] == pytest.approx(0.625)
    assert stats["env/reward_mean"] == pytest.approx((1 / 3 + 1 / 5) / 2 + 2.0 * 0.625)


def test_fidelity_weight_adds_rouge_l_against_the_reference(tiny_t5, tmp_path):
    trainer = make_trainer(tiny_t5, tmp_path, references=["thanks"] * len(PROMPTS),
                           **{"reward.fidelity_weight": 2.0, "rl.batch_size": 2, "rl.mini_batch_size": 2})
    prompts, references = ["school talk", "the meeting is good"], ["thanks a lot", "the car"]
    stats = trainer.step(prompts, ["thanks", "the car"], references=references)
    # ThanksShare gives 1 and 0; ROUGE-L F1: "thanks" vs "thanks a lot" = 2*(1*1/3)/(1+1/3) = 0.5; exact match = 1.
    assert stats["env/scorer_reward_mean"] == pytest.approx(0.5)
    assert stats["env/fidelity_mean"] == pytest.approx(0.75)
    assert stats["env/reward_mean"] == pytest.approx(0.5 + 2.0 * 0.75)
    with pytest.raises(DetoxError, match="fidelity_weight needs the reference response of every training prompt"):
        RLTrainer(trainer.config, trainer.policy, ThanksShare(), PROMPTS)


TERM_LEARNING = {"rl.algorithm": "rloo", "rl.samples_per_prompt": 4, "rl.learning_rate": 1e-2, "rl.steps": 16,
                 "rl.batch_size": 16, "rl.mini_batch_size": 4, "rl.init_kl_coef": 0.01, "rl.adaptive_kl": False,
                 "model.lora_r": 8, "generation.max_new_tokens": 6, "reward.scorer": "callable",
                 "reward.function": "tiny:no_reward"}


def assert_term_learned_and_recorded(run: Path, name: str, weight: float) -> None:
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    means = [row[f"env/{name}_mean"] for row in history]
    assert np.mean(means[-4:]) > 2 * np.mean(means[:2]) + 0.05, means  # the term alone pays, and it is learned
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["reward_weights"] == {"scorer": 1.0, name: weight}
    assert f"{weight:g} x `{name}`" in metrics["run"]["reward"] == metrics["evaluation"]["reward"]
    assert name in metrics["evaluation"]["reward_terms"]["policy"]
    assert f"{weight:g} x `{name}`" in (run / "report.html").read_text()
    assert f"{weight:g} x `{name}`" in (run / "adapter" / "README.md").read_text()


def test_a_trl_reward_function_trains_from_the_command_line(tiny_llama, tiny_classifier, tmp_path, run_cli,
                                                            monkeypatch):
    monkeypatch.setattr(sys, "path", [str(Path(__file__).parent), *sys.path])
    settings = tiny_run_settings(tiny_llama, tmp_path / "run", **{
        **TERM_LEARNING, "eval.enabled": True, "eval.evaluators": [str(tiny_classifier)], "eval.max_prompts": 2})
    code, _, err = run_cli(["train", "--config", write_yaml(tmp_path / "config.yaml", settings),
                            "--reward.terms", "tiny:trl_thanks=2"])
    assert code == 0, err
    assert_term_learned_and_recorded(tmp_path / "run", "tiny:trl_thanks", 2.0)


def test_a_trl_reward_function_trains_from_the_python_api(tiny_llama, tiny_classifier, tmp_path):
    import detoxrl
    from tiny import trl_thanks

    config = tiny_run_config(tiny_llama, tmp_path / "run", **{
        **TERM_LEARNING, "eval.enabled": True, "eval.evaluators": [str(tiny_classifier)], "eval.max_prompts": 2})
    reward = detoxrl.build_reward(config.reward).with_term(trl_thanks, weight=2.0)
    assert_term_learned_and_recorded(detoxrl.train(config, reward=reward), "trl_thanks", 2.0)


def test_learning_curve_points_are_written_to_the_history(tiny_t5, tmp_path, run_cli):
    settings = tiny_run_settings(tiny_t5, tmp_path / "run", **{"rl.steps": 2, "eval.curve_steps": 1,
                                                                 "eval.curve_prompts": 3, "eval.curve_samples": 2,
                                                                 "eval.evaluators": ["profanity-check"]})
    code, _, err = run_cli(["train", "--config", write_yaml(tmp_path / "config.yaml", settings)])
    assert code == 0, err
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    for row in history:
        assert 0.0 <= row["eval/toxicity_probability"] <= 1.0
        assert 0.0 <= row["eval/expected_max_toxicity"] <= 1.0
