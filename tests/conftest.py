import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_classifier, save_tiny_llama, save_tiny_t5  # noqa: E402


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("classifier"))


@pytest.fixture
def run_cli(capsys):
    """``run_cli(argv) -> (exit code, stdout, stderr)``: the ``detoxrl`` command line, in this process."""
    from detoxrl.cli import main

    def run(argv) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run


def pytest_report_header(config) -> str:
    """Which bf16 bounds the precision tests hold this machine to (tests/test_precision.py)."""
    import torch

    from detoxrl.precision import this_cpu_has_fast_bf16

    kind = "with bf16 instructions" if this_cpu_has_fast_bf16() else "bf16 emulated"
    return f"cpu: torch {torch.backends.cpu.get_cpu_capability()} kernels, {kind}"
