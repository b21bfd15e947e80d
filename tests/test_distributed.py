"""Data parallel through accelerate, and checkpoints that survive SIGKILL.

Run as a script (under ``accelerate launch``) it is the worker of
test_every_algorithm_and_normalisation_updates_on_two_processes_as_on_one.
"""

import json
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from tiny import ThanksShare, run_child, subprocess_env, tiny_run_config, tiny_run_settings, write_yaml

from detoxrl.policy import load_policy
from detoxrl.rl.trainer import RLTrainer, end_processes

# Largest allowed difference between the LoRA weights of a 2-process and a 1-process run with the
# same global batch. Rollouts are identical by construction (per-sample seeds); what remains is
# float summation order in the gradient all-reduce and in differently padded batches.
TOLERANCE = 1e-5


def setup_run(tmp_path: Path, model: Path, **rl) -> Path:
    """A run rewarded by the share of "thanks", with a learning rate that visibly moves the adapter."""
    settings = tiny_run_settings(
        model, tmp_path / "run",
        **{"data.max_prompt_tokens": 32, "generation.max_new_tokens": 5, "threads": None,
           "rl": {"steps": 3, "batch_size": 8, "mini_batch_size": 8, "learning_rate": 0.01, **rl}},
    )
    return write_yaml(tmp_path / "config.yaml", settings)


def train_cmd(config: Path, out: Path, *extra: str, processes: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    head = launcher + ["-m", "detoxrl.cli"] if processes > 1 else [sys.executable, "-m", "detoxrl.cli"]
    return head + ["train", "--config", str(config), "--output_dir", str(out), *extra]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_t5):
    config = setup_run(tmp_path, tiny_t5)
    for name, processes in (("one", 1), ("two", 2)):
        done = run_child(train_cmd(config, tmp_path / name, processes=processes), cwd=tmp_path, env=subprocess_env())
        assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((tmp_path / "two" / "metrics.json").read_text())["run"]
    assert run["num_processes"] == 2
    assert run["rank_param_max_diff"] == 0.0  # both ranks end with identical parameters
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert max(float(t.abs().max()) for k, t in one.items() if "lora_B" in k) > 1e-3  # training moved
    assert max_difference(one, two) < TOLERANCE
    history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    for a, b in zip(history, reference):  # global statistics, not rank 0's half
        assert a["env/reward_mean"] == pytest.approx(b["env/reward_mean"], abs=1e-6)
        assert a["objective/kl"] == pytest.approx(b["objective/kl"], abs=1e-4)


SETTINGS = [(algorithm, normalization) for algorithm in ("ppo", "rloo", "grpo")
            for normalization in ("token", "sequence")]
PROMPTS = ["the person1 said thanks about work", "the meeting is good", "a car and a home", "school talk"]
# 1 to 4 words (2 to 5 tokens with EOS): the processes' and micro-batches' token counts differ.
RESPONSES = ["thanks", "the car and a home", "nice", "please talk about the", "good thanks", "a",
             "thanks thanks thanks", "home and school"]
REWARDS = [1.0, 0.0, 0.5, -1.0, 2.0, 0.0, 1.5, -0.5]


def record_updates(model: Path, out: Path, accumulation: int) -> None:
    """For every algorithm and loss normalisation: 2 steps on this process's share of RESPONSES (global batch 8,
    one mini-batch), written by rank 0 as the gradient of each optimiser step and the trainable weights after."""
    out.mkdir(parents=True, exist_ok=True)
    for algorithm, normalization in SETTINGS:
        k = 1 if algorithm == "ppo" else 2
        torch.manual_seed(0)  # the same fresh LoRA and value head everywhere
        config = tiny_run_config(model, out / "unused", **{
            "generation.max_new_tokens": 5, "rl.algorithm": algorithm, "rl.samples_per_prompt": k,
            "rl.loss_normalization": normalization, "rl.batch_size": 8, "rl.mini_batch_size": 8,
            "rl.gradient_accumulation_steps": accumulation, "rl.learning_rate": 0.001, "rl.max_grad_norm": 1e9})
        trainer = RLTrainer(config, load_policy(config.model), ThanksShare(), PROMPTS)
        gradients = []
        trainer.optimizer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: gradients.append(
            torch.cat([p.grad.flatten() for group in optimizer.param_groups for p in group["params"]])))
        share = 8 // k // trainer.accelerator.num_processes  # prompts per process
        first = trainer.accelerator.process_index * share
        for _ in range(2):
            trainer.step((PROMPTS * 2)[first : first + share], RESPONSES[first * k : (first + share) * k],
                         REWARDS[first * k : (first + share) * k])
        if trainer.accelerator.is_main_process:
            tensors = {n: p.detach().contiguous() for n, p in trainer.policy.module.named_parameters()
                       if p.requires_grad}
            tensors.update({f"gradient-{i}": g for i, g in enumerate(gradients)})
            save_file(tensors, out / f"{algorithm}-{normalization}.safetensors")


@pytest.mark.slow
def test_every_algorithm_and_normalisation_updates_on_two_processes_as_on_one(tmp_path, tiny_t5):
    """One mini-batch split over 2 processes x 2 accumulated micro-batches gives the gradient and the weights of one
    process holding it whole, for ppo, rloo and grpo under token and sequence normalisation (one launch for all)."""
    done = run_child([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                      __file__, str(tiny_t5), str(tmp_path / "two")], cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    record_updates(tiny_t5, tmp_path / "one", accumulation=1)
    for algorithm, normalization in SETTINGS:
        name = f"{algorithm}-{normalization}.safetensors"
        one, two = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert one.keys() == two.keys() and "gradient-1" in one, name  # 2 optimiser steps
        for key, expected in one.items():
            if key.startswith("gradient-"):
                assert float((two[key] - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), (name, key)
            else:
                torch.testing.assert_close(two[key], expected, atol=1e-6, rtol=0, msg=f"{name} {key}")


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_t5):
    config = setup_run(tmp_path, tiny_t5, steps=10, mini_batch_size=4)
    extra = ["--save_steps", "1", "--save_total_limit", "2"]
    full = run_child(train_cmd(config, tmp_path / "full", *extra), cwd=tmp_path, env=subprocess_env())
    assert full.returncode == 0, full.stderr[-2000:]

    run = tmp_path / "killed"
    process = subprocess.Popen(train_cmd(config, run, *extra), cwd=tmp_path, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-0000004").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()  # nothing looks finished
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    # save_total_limit, plus one when the kill falls after a new checkpoint's rename and directory fsync but before
    # the rotation (older ones are deleted only once the new one is on disk); the next save rotates it away.
    assert len(kept) <= 3

    resumed = run_child([sys.executable, "-m", "detoxrl.cli", "train", "--output_dir", str(run), "--resume"],
                        cwd=tmp_path, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert max_difference(adapter(tmp_path / "full"), adapter(run)) == 0.0
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert len([p for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")]) == 2  # rotated again


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_t5):
    config = setup_run(tmp_path, tiny_t5, steps=2)
    run = tmp_path / "run"
    done = run_child(train_cmd(config, run, "--save_steps", "1"), cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    # pretend the run died after its step-1 checkpoint: no metrics, no adapter (saved only after the last step)
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "adapter")
    (run / "history.jsonl").write_text((run / "history.jsonl").read_text().splitlines(keepends=True)[0])
    (run / "checkpoints" / "step-0000001" / "optimizer.safetensors").write_bytes(b"not a tensor file")
    again = run_child([sys.executable, "-m", "detoxrl.cli", "train", "--output_dir", str(run), "--resume"],
                      cwd=tmp_path, env=subprocess_env())
    assert again.returncode == 2
    assert "checkpoint" in again.stderr and "is corrupt or incomplete" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on the test machine's cores
    record_updates(Path(sys.argv[1]), Path(sys.argv[2]), accumulation=2)
    # both ranks leave together and close the process group, as `detoxrl train` does: a rank that exits while the
    # other still writes can abort in the collective library's teardown
    end_processes(Accelerator())
