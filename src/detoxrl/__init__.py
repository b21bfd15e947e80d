"""detoxrl: make language models less toxic with reinforcement learning on a LoRA adapter.

The public objects load on first use, so ``import detoxrl`` (and the command line's ``--help``)
does not pay for torch and transformers::

    import detoxrl

    config = detoxrl.build_config("smollm2-offline", overrides={"rl.steps": 5, "output_dir": "runs/a"})
    run_dir = detoxrl.train(config)
    run = detoxrl.load_run(run_dir)
"""

from __future__ import annotations

import sys
import types
from importlib import import_module, metadata

try:
    __version__ = metadata.version("detoxrl")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# public name -> (module, attribute)
_EXPORTS = {
    "Config": ("detoxrl.config", "Config"),
    "build_config": ("detoxrl.config", "build_config"),
    "DetoxError": ("detoxrl.errors", "DetoxError"),
    "train": ("detoxrl.train", "train"),
    "sft": ("detoxrl.sft", "sft"),
    "evaluate": ("detoxrl.evaluation.command", "evaluate_run"),
    "evaluate_model": ("detoxrl.evaluation.command", "evaluate_model"),
    "RLTrainer": ("detoxrl.rl.trainer", "RLTrainer"),
    "Scorer": ("detoxrl.rewards", "Scorer"),
    "build_reward": ("detoxrl.rewards", "build_reward"),
    "load_policy": ("detoxrl.policy", "load_policy"),
    "build_splits": ("detoxrl.data", "build_splits"),
    "load_run": ("detoxrl.rundir", "load_run"),
    "generate_responses": ("detoxrl.generate", "generate_responses"),
    "export_run": ("detoxrl.export", "export_run"),
    "write_model_card": ("detoxrl.modelcard", "write_model_card"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detoxrl' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """Keeps ``detoxrl.train`` and ``detoxrl.sft`` the functions once their modules are imported.

    The import system records every loaded submodule on its package under the module's name,
    which would replace the function of the same name; ``from detoxrl.train import ...`` still works.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
