"""The PPO loop: rollout, KL-penalised rewards, GAE, then PPO epochs over mini-batches.

accelerate owns devices, mixed precision, gradient synchronisation and trackers. The global
batch is split across processes; advantage whitening and the KL controller use statistics
gathered from all of them, so N processes behave like one with the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import get_scheduler

from ..config import Config
from ..errors import DetoxError
from ..policy import Policy
from ..rewards import Scorer
from . import checkpoint
from .core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_penalised_rewards,
    logprobs_from_logits,
    ppo_losses,
    sampling_logits,
)
from .rollout import Rollout, generate, reference_logprobs, sample_seeds, score

logger = logging.getLogger(__name__)


class RLTrainer:
    def __init__(
        self,
        config: Config,
        policy: Policy,
        scorer: Scorer,
        prompts: list[str],
        accelerator: Accelerator | None = None,
    ):
        config.validate()
        self.config, self.policy, self.scorer, self.prompts = config, policy, scorer, prompts
        p = config.rl
        self.accelerator = accelerator or Accelerator(cpu=config.device == "cpu")
        world = self.accelerator.num_processes
        if p.batch_size % world or p.mini_batch_size % (world * p.gradient_accumulation_steps):
            raise DetoxError(
                f"rl.batch_size ({p.batch_size}) and rl.mini_batch_size ({p.mini_batch_size}) must split evenly "
                f"over {world} process(es) x {p.gradient_accumulation_steps} accumulation step(s)"
            )
        if len(prompts) < 1:
            raise DetoxError("no training prompts")
        self.local_batch = p.batch_size // world
        self.micro_batch = p.mini_batch_size // (world * p.gradient_accumulation_steps)

        head_params = list(policy.module.value_head.parameters())
        lora_params = [q for q in policy.module.model.parameters() if q.requires_grad]
        optimizer = torch.optim.Adam(
            [
                {"params": lora_params, "lr": p.learning_rate},
                {"params": head_params, "lr": p.learning_rate * p.value_head_lr_scale},
            ]
        )
        updates_per_step = p.ppo_epochs * (p.batch_size // p.mini_batch_size)
        scheduler = get_scheduler(
            p.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=p.steps * updates_per_step
        )
        self.module, self.optimizer, self.scheduler = self.accelerator.prepare(policy.module, optimizer, scheduler)
        self.kl_ctl = (
            AdaptiveKLController(p.init_kl_coef, p.target_kl, p.kl_horizon)
            if p.adaptive_kl
            else FixedKLController(p.init_kl_coef)
        )
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        plugin = self.accelerator.state.deepspeed_plugin
        self.shards_weights = self.accelerator.distributed_type == DistributedType.FSDP or (
            plugin is not None and plugin.zero_stage == 3
        )

    # ----------------------------------------------------------------------------- data
    def batch_prompts(self, step: int) -> list[str]:
        """This process's share of global batch ``step``; the order depends only on seed and step."""
        p, n = self.config.rl, len(self.prompts)
        start = step * p.batch_size
        indices = []
        for position in range(start, start + p.batch_size):
            epoch, offset = divmod(position, n)
            order = np.random.default_rng(self.config.seed + epoch).permutation(n)
            indices.append(int(order[offset]))
        rank = self.accelerator.process_index
        local = indices[rank * self.local_batch : (rank + 1) * self.local_batch]
        return [self.prompts[i] for i in local]

    # ----------------------------------------------------------------------------- statistics
    def global_mean(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(x) if mask is None else mask
        totals = torch.stack([(x * mask).sum(), mask.sum()]).double()
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1)).to(x.dtype)

    def global_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mean = self.global_mean(x, mask)
        var = self.global_mean((x - mean) ** 2, mask)
        return (x - mean) * torch.rsqrt(var + 1e-8) * mask

    # ----------------------------------------------------------------------------- one step
    def rollout(self, prompts: list[str]) -> tuple[Rollout, dict[str, float]]:
        timings = {}
        tick = time.perf_counter()
        unwrapped = self.accelerator.unwrap_model(self.module)
        first = self.accelerator.process_index * self.local_batch
        seeds = sample_seeds(self.config.seed, self.step_count, count=self.config.rl.batch_size)
        with self.accelerator.autocast():
            batch = generate(
                self.policy, unwrapped.model, prompts, self.config.generation, self.config.data.max_prompt_tokens,
                seeds[first : first + len(prompts)], unwrapped.value_head, self.shards_weights,
            )
        timings["time/generation"] = time.perf_counter() - tick

        tick = time.perf_counter()
        batch.scores = score(self.scorer, prompts, batch.responses, self.config.reward.score_query).to(
            batch.mask.device
        )
        timings["time/reward"] = time.perf_counter() - tick

        tick = time.perf_counter()
        with self.accelerator.autocast():
            batch.ref_logprobs = reference_logprobs(self.policy, batch, self.config.generation, self.micro_batch)
        timings["time/reference"] = time.perf_counter() - tick
        return batch, timings

    def step(self, prompts: list[str]) -> dict[str, float]:
        """One PPO iteration on this process's prompts; returns the logged statistics."""
        p = self.config.rl
        tick = time.perf_counter()
        batch, stats = self.rollout(prompts)

        tick_opt = time.perf_counter()
        rewards, kl = kl_penalised_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, batch.mask, self.kl_ctl.value)
        advantages, returns = gae_advantages(rewards, batch.values, batch.mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = self.global_whiten(advantages, batch.mask)
        batch_stats = self.optimise(batch, advantages, returns)
        stats["time/optimisation"] = time.perf_counter() - tick_opt

        mean_kl = float(self.global_mean(kl.sum(dim=1)))
        stats.update(self.summarise(batch, rewards, advantages, returns, batch_stats, mean_kl))
        self.kl_ctl.update(mean_kl, p.batch_size)
        if mean_kl < -1e-3:
            logger.warning(
                "mean KL estimate is negative (%.4f): small values are sampling noise; large or persistent ones "
                "mean the log-probs do not come from the distribution that sampled",
                mean_kl,
            )
        stats["time/total"] = time.perf_counter() - tick
        self.step_count += 1
        stats["step"] = self.step_count
        return stats

    def optimise(self, batch: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        p, g = self.config.rl, self.config.generation
        eos = self.policy.eos_token_ids
        collected = []
        n = len(batch.responses)
        world = self.accelerator.num_processes
        for epoch in range(p.ppo_epochs):
            # Seeded by step and epoch, not by the RNG state, so a resumed run shuffles the same way.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 7919 * self.step_count + epoch))
            for start in range(0, n, self.micro_batch):
                index = order[start : start + self.micro_batch]
                mb = batch.select(index)
                T = mb.response_ids.shape[1]
                num_tokens = self.global_mean(mb.mask.sum()) if world > 1 else None
                with self.accelerator.accumulate(self.module), self.accelerator.autocast():
                    out = self.module(mb.query_ids, mb.query_mask, mb.response_ids)
                    logits = sampling_logits(out.logits, g.temperature, g.min_new_tokens, eos)
                    logprobs = logprobs_from_logits(logits, mb.response_ids)
                    losses = ppo_losses(
                        logprobs,
                        mb.logprobs,
                        out.values.float(),
                        mb.values,
                        advantages[index, :T],
                        returns[index, :T],
                        mb.mask,
                        p.cliprange,
                        p.cliprange_value,
                        p.vf_coef,
                        num_tokens,
                    )
                    self.accelerator.backward(losses.loss)
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.module.parameters(), p.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                with torch.no_grad():
                    entropy = (entropy_from_logits(logits.detach()) * mb.mask).sum() / mb.mask.sum().clamp(min=1)
                collected.append(
                    {
                        "ppo/loss/policy": losses.policy_loss,
                        "ppo/loss/value": losses.value_loss,
                        "ppo/policy/clipfrac": losses.clip_fraction,
                        "ppo/policy/approxkl": losses.approx_kl,
                        "ppo/val/clipfrac": losses.value_clip_fraction,
                        "objective/entropy": entropy,
                    }
                )
        return collected

    def summarise(
        self,
        batch: Rollout,
        rewards: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        batch_stats: list[dict[str, torch.Tensor]],
        mean_kl: float,
    ) -> dict[str, float]:
        mask = batch.mask
        stats = {
            "objective/kl": mean_kl,
            "objective/kl_coef": self.kl_ctl.value,
            "env/reward_mean": float(self.global_mean(batch.scores)),
            "env/reward_std": float(self.global_mean((batch.scores - self.global_mean(batch.scores)) ** 2)) ** 0.5,
            "env/response_length_mean": float(self.global_mean(mask.sum(dim=1))),
            "ppo/returns/mean": float(self.global_mean(returns, mask)),
            "ppo/policy/advantages_mean": float(self.global_mean(advantages, mask)),
            "ppo/val/mean": float(self.global_mean(batch.values, mask)),
            "ppo/val/explained_variance": explained_variance(batch.values, returns, mask),
            "ppo/learning_rate": self.scheduler.get_last_lr()[0],
        }
        for key in batch_stats[0]:
            stats[key] = float(self.global_mean(torch.stack([s[key] for s in batch_stats]).float()))
        return stats

    # ----------------------------------------------------------------------------- the loop
    def train(self, on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Run the remaining steps; checkpoint every ``save_steps``; return the per-step history."""
        cfg = self.config
        while self.step_count < cfg.rl.steps:
            stats = self.step(self.batch_prompts(self.step_count))
            self.history.append(stats)
            self.accelerator.log({k: v for k, v in stats.items() if k != "step"}, step=self.step_count)
            if on_step:
                on_step(stats)
            if cfg.save_steps and self.step_count % cfg.save_steps == 0 and self.step_count < cfg.rl.steps:
                self.save_checkpoint()
        return self.history

    def rank_divergence(self) -> float:
        """Largest difference between any process's trainable parameters and rank 0's (0 when in sync)."""
        module = self.accelerator.unwrap_model(self.module)
        flat = torch.cat([p.detach().float().reshape(-1) for p in module.parameters() if p.requires_grad])
        if self.accelerator.num_processes == 1:
            return 0.0
        gathered = self.accelerator.gather(flat.unsqueeze(0))
        return float((gathered - gathered[0]).abs().max())

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self, Path(self.config.output_dir) / "checkpoints", self.config.save_total_limit)

    def load_checkpoint(self, directory: str | Path) -> None:
        checkpoint.load(self, Path(directory))

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step_count, "kl_ctl": self.kl_ctl.state_dict(), "history": self.history}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.history = list(state["history"])


def finite_or_none(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Rewrite the per-step log through a temporary file, so a full disk never truncates it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({k: finite_or_none(v) for k, v in row.items()}) + "\n" for row in history))
    os.replace(tmp, path)
