"""The scripts beside the package: each answers --help, the first thing anyone runs them with."""

import subprocess
import sys
from pathlib import Path

import pytest
from tiny import subprocess_env

ROOT = Path(__file__).parents[1]


def scripts() -> list[str]:
    """Every Python file with a main guard, so that a script without argparse fails here instead of being left
    out; hidden folders hold what the benchmarks install (benchmarks/.venvs), not scripts."""
    paths = (p.relative_to(ROOT) for folder in ("benchmarks", "scripts") for p in (ROOT / folder).rglob("*.py"))
    return sorted(str(p) for p in paths
                  if not any(part.startswith(".") for part in p.parts) and "__main__" in (ROOT / p).read_text())


SCRIPTS = scripts()


def test_the_scripts_are_found():
    assert {"benchmarks/run.py", "benchmarks/sides/detoxrl_side.py", "scripts/study.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(script):
    """In a child process: --help exits before the script does anything, even where it imports torch."""
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr[-2000:]


def test_the_flop_count_covers_every_pass(tmp_path):
    """``--count-flops`` on the quick causal setting: at least the linear layers' forward work of sampling, the
    reference pass and the training pass, and the backward of the last (8 x parameters x tokens), and not more
    than three times that with the LM head counted on every token."""
    import json

    from safetensors.torch import load_file

    sides, model = ROOT / "benchmarks" / "sides", tmp_path / "model"
    run = dict(cwd=sides, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    prepared = subprocess.run([sys.executable, "_common.py", "prepare", "--setting", "causal", "--quick",
                               "--out", str(model)], **run)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    result = subprocess.run([sys.executable, "detoxrl_side.py", "--setting", "causal", "--quick", "--model-dir",
                             str(model), "--count-flops"], **run)
    assert result.returncode == 0, result.stderr[-2000:]
    flops = json.loads(result.stdout.strip().splitlines()[-1])["extra"]["warmup_iteration_flops"]
    weights = load_file(model / "model.safetensors")
    body = sum(w.numel() for name, w in weights.items() if w.dim() == 2 and "embed" not in name)
    head = next(w.numel() for name, w in weights.items() if "embed" in name)
    tokens = 4 * (16 + 8)  # batch x (prompt + response), benchmarks/sides/_common.py SIZES["quick"]
    assert 8 * body * tokens <= flops <= 3 * 8 * (body + head) * tokens, (flops, body, head)


def test_the_matmul_rate_is_measured_in_both_dtypes():
    """The FLOP floor's denominator: one line per dtype, each a positive rate."""
    import re

    command = [sys.executable, "benchmarks/matmul_rate.py", "--repeats", "1", "--threads", "1", "--shapes"]
    run = dict(cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    result = subprocess.run([*command, "256x128x256,128x256x128"], **run)
    assert result.returncode == 0, result.stderr[-2000:]
    rates = dict(re.findall(r"^(float32|bfloat16)\s+median\s+(\d+) GFLOP/s \(256x128x256: \d+, 128x256x128: \d+\)",
                            result.stdout, re.M))
    assert set(rates) == {"float32", "bfloat16"} and all(int(r) > 0 for r in rates.values()), result.stdout
    refused = subprocess.run([*command, "256x128"], **run)
    assert refused.returncode == 2 and "shapes look like 4096x576x1536" in refused.stderr.splitlines()[-1]
