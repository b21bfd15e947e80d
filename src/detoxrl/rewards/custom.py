"""A user's Python functions: a scorer ``module:function`` taking a list of texts, and the import of any
``module:function`` (also the TRL-style terms of reward.terms)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import numpy as np

from ..errors import DetoxError
from .base import Scorer


def import_function(spec: str, setting: str) -> Callable:
    """``module:function``, imported from the working directory or sys.path; ``setting`` names it in errors."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise DetoxError(f"{setting} must look like module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DetoxError(f"cannot import reward module {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DetoxError(f"{spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


class CallableScorer(Scorer):
    def __init__(self, spec: str):
        self.function = import_function(spec, "reward.function")
        self.name = spec

    def rewards(self, texts: list[str]) -> np.ndarray:
        result = self.function(list(texts))
        try:
            values = np.asarray(result, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise DetoxError(
                f"reward function {self.name!r} must return one number per text, got {str(result)[:80]}"
            ) from None
        if len(values) != len(texts):
            raise DetoxError(f"reward function {self.name!r} returned {len(values)} values for {len(texts)} texts")
        return values
