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
