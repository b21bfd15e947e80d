"""What an algorithm is, and the one registry of them that validation, the command line and the trainer read.

An algorithm is a subclass of :class:`Algorithm` registered under its name. The built-in ones are
registered by "module:Class" and imported when first used, so that this module, ``detoxrl.config``
and ``detoxrl --help`` never import torch.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import DetoxError

if TYPE_CHECKING:
    import torch

    from ..config import RLConfig
    from .core import Reduce
    from .rollout import Rollout
    from .trainer import RLTrainer

# The settings of the value head, which only an algorithm with a critic has.
CRITIC_SETTINGS = ("gamma", "lam", "cliprange_value", "vf_coef", "value_head_lr_scale")


@dataclass(frozen=True)
class LossBatch:
    """Everything a micro-batch's loss may read; each algorithm takes what it needs."""

    logprobs: torch.Tensor  # [b, T] log pi of the sampled tokens under the policy being trained (with gradient)
    values: torch.Tensor | None  # [b, T] the critic's values (with gradient); None without a critic
    rollout: Rollout  # the micro-batch as sampled: mask, old log-probs and values, reference log-probs
    advantages: torch.Tensor  # [b, T]
    returns: torch.Tensor | None  # [b, T], from an algorithm that returns them (ppo)
    divisors: dict[str, torch.Tensor]  # aggregate_loss's divisor per rl.loss_normalization (core.loss_divisors)
    kl_coef: float


class Algorithm(ABC):
    """One algorithm on the shared loop: RLTrainer samples, scores and runs the reference pass, then calls
    ``extra_rollout``, ``advantages`` once per batch and ``loss`` once per micro-batch."""

    name: ClassVar[str]
    uses_critic: ClassVar[bool]  # whether the trainer builds, trains and saves a value head

    def __init__(self, config: RLConfig):
        self.config = config

    @classmethod
    def validate(cls, config: RLConfig) -> None:
        """Refuse settings this algorithm cannot use; Config.validate calls it before anything is loaded."""

    def extra_rollout(self, trainer: RLTrainer, prompts: list[str], references: list[str] | None,
                      batch: Rollout) -> None:
        """More samples, after sampling and scoring and before ``advantages`` (none by default).

        ``prompts`` (and their ``references``) are this process's, each once; ``batch`` holds their k responses
        each, prompt-major. ``trainer.score`` rewards extra responses as the batch's were.
        """

    @abstractmethod
    def advantages(self, batch: Rollout, kl_coef: float,
                   reduce: Reduce) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """(advantages [B, T], returns [B, T] or None, statistics to log) of the whole batch."""

    @abstractmethod
    def loss(self, batch: LossBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, statistics to log) of one micro-batch."""


ALGORITHMS: dict[str, type[Algorithm] | str] = {}


def register(name: str, algorithm: type[Algorithm] | str) -> None:
    """Make ``rl.algorithm: name`` train with ``algorithm``: the class, or "module:Class" imported on first use."""
    if name in ALGORITHMS:
        raise DetoxError(f"algorithm {name!r} is registered twice")
    ALGORITHMS[name] = algorithm


def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered as ``name`` (imported now if registered by location)."""
    algorithm = ALGORITHMS[name]
    if isinstance(algorithm, str):
        module, _, attribute = algorithm.partition(":")
        algorithm = getattr(importlib.import_module(module), attribute)
    if algorithm.name != name:
        raise DetoxError(f"algorithm {name!r} is registered as a class named {algorithm.name!r}")
    return algorithm


def require_groups(config: RLConfig) -> None:
    """A baseline made of the other responses to the same prompt needs at least two of them."""
    if config.samples_per_prompt < 2:
        raise DetoxError(f"rl.algorithm {config.algorithm} compares the responses to one prompt, so "
                         f"rl.samples_per_prompt must be at least 2, got {config.samples_per_prompt}")


def refuse_critic_settings(config: RLConfig) -> None:
    """A value-head setting given to an algorithm without a critic would silently do nothing."""
    defaults = type(config)()  # RLConfig's defaults, without importing detoxrl.config (which imports this module)
    given = [n for n in CRITIC_SETTINGS if getattr(config, n) != getattr(defaults, n)]
    if given:
        raise DetoxError(f"rl.{given[0]} configures the value head, which rl.algorithm {config.algorithm} does "
                         "not have; remove it or use rl.algorithm ppo")


register("ppo", "detoxrl.rl.ppo:PPO")
register("rloo", "detoxrl.rl.rloo:RLOO")
register("grpo", "detoxrl.rl.grpo:GRPO")
