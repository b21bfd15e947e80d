"""Data parallel through accelerate, and checkpoints that survive SIGKILL."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import subprocess_env, tiny_run_settings, write_yaml

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
        done = subprocess.run(train_cmd(config, tmp_path / name, processes=processes), cwd=tmp_path,
                              env=subprocess_env(), capture_output=True, text=True, timeout=300)
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


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_t5):
    config = setup_run(tmp_path, tiny_t5, steps=10, mini_batch_size=4)
    extra = ["--save_steps", "1", "--save_total_limit", "2"]
    full = subprocess.run(train_cmd(config, tmp_path / "full", *extra), cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
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
    assert len(kept) <= 2  # save_total_limit

    resumed = subprocess.run(
        [sys.executable, "-m", "detoxrl.cli", "train", "--output_dir", str(run), "--resume"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert max_difference(adapter(tmp_path / "full"), adapter(run)) == 0.0
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_t5):
    config = setup_run(tmp_path, tiny_t5, steps=2)
    run = tmp_path / "run"
    done = subprocess.run(train_cmd(config, run, "--save_steps", "1"), cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run / "metrics.json").unlink()  # pretend the run died after its checkpoint
    (run / "checkpoints" / "step-0000001" / "optimizer.safetensors").write_bytes(b"not a tensor file")
    again = subprocess.run([sys.executable, "-m", "detoxrl.cli", "train", "--output_dir", str(run), "--resume"],
                           cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "checkpoint" in again.stderr and "is corrupt or incomplete" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
