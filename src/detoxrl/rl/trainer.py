"""The training loop shared by PPO, RLOO, GRPO and any registered algorithm: rollout, reward, reference
pass, then clipped policy updates over mini-batches.

The algorithms differ only in how advantages are computed, in their loss, and in any samples they add
to the batch (detoxrl.rl.algorithms: the protocol and the registry). accelerate owns devices, mixed
precision, gradient synchronisation and trackers. The global batch is split across processes with the
k responses of a prompt kept on one process, and statistics are reduced over all processes, so N
processes behave like one with the same global batch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from transformers import get_scheduler

from ..config import Config
from ..errors import DetoxError
from ..heap import release_freed_memory
from ..policy import Policy
from ..rewards import Scorer
from ..rewards.composite import Reward, term_log_key
from ..rundir import RunDir
from . import checkpoint
from .algorithms import LossBatch, algorithm_class
from .core import AdaptiveKLController, FixedKLController, loss_divisors, masked_mean, sequence_kl
from .logprobs import score_tokens
from .rollout import Rollout, generate, reference_logprobs, rollout_from_responses, sample_seeds

logger = logging.getLogger(__name__)


def build_accelerator(config: Config) -> Accelerator:
    """The one place an Accelerator is made: CLI and Python API get the same accumulation and precision.

    ``mixed_precision`` None leaves the choice to ``accelerate launch`` (its config file or flag, which
    reach accelerate as ACCELERATE_MIXED_PRECISION), else no autocast.
    """
    if config.device and config.device.startswith("cuda:"):
        torch.cuda.set_device(int(config.device.split(":")[1]))
    trackers = [t for t in config.report_to if t and t != "none"]
    return Accelerator(
        cpu=config.device == "cpu",
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.rl.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(RunDir(config.output_dir).logs),
    )


def end_processes(accelerator: Accelerator) -> None:
    """The processes' last barrier, then the end of trackers and process group (``end_training``).

    The barrier's handle outlives the group on purpose. Gloo's worker threads release a finished operation
    after its caller has moved on, and a release that frees tensors needs the GIL, which the group's
    destructor holds while it joins those threads: a hang seen at the end of 2-process runs. Held here, the
    barrier (and the operations it waited for) is freed by this thread once those threads have stopped.
    """
    if not torch.distributed.is_initialized():
        accelerator.end_training()
        return
    last_barrier = torch.distributed.barrier(async_op=True)
    last_barrier.wait()
    accelerator.end_training()
    del last_barrier


def shards_weights(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP or DeepSpeed ZeRO-3)."""
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)


def check_sharded_checkpointing(accelerator: Accelerator, config: Config) -> None:
    """Refuse ``save_steps`` under sharded weights: checkpoints gather full, unsharded state, so they cannot
    be written or resumed under FSDP or ZeRO-3."""
    if config.save_steps > 0 and shards_weights(accelerator):
        raise DetoxError(
            f"save_steps {config.save_steps}: checkpoint and resume are not supported when the weights are sharded "
            "(FSDP or DeepSpeed ZeRO-3); set save_steps 0, or use DDP or ZeRO-2"
        )


class RLTrainer:
    """Trains ``policy``'s LoRA adapter to maximise ``reward`` on ``prompts``.

    ``step(prompts)`` runs one iteration; ``train()`` runs ``rl.steps`` of them over the prompts.
    """

    def __init__(
        self,
        config: Config,
        policy: Policy,
        reward: Reward | Scorer,
        prompts: list[str],
        accelerator: Accelerator | None = None,
        references: list[str] | None = None,
    ):
        """``reward`` is the composite reward (detoxrl.build_reward), or a scorer that the config's reward
        terms are added to. ``references`` (one per prompt) are needed only by reward.fidelity_weight."""
        config.validate()
        if isinstance(reward, Scorer):
            reward = Reward.from_config(reward, config.reward, config.data.reference_column or "reference")
        self.config, self.policy, self.reward, self.prompts = config, policy, reward, prompts
        if references is not None and len(references) != len(prompts):
            raise DetoxError(f"{len(prompts)} prompts but {len(references)} references")
        if config.reward.fidelity_weight and references is None:
            raise DetoxError("reward.fidelity_weight needs the reference response of every training prompt")
        self.references = references
        p = config.rl
        self.algorithm = algorithm_class(p.algorithm)(p)
        self.accelerator = accelerator or build_accelerator(config)
        check_sharded_checkpointing(self.accelerator, config)
        world = self.accelerator.num_processes
        if p.batch_size % (world * p.samples_per_prompt) or p.mini_batch_size % (world * p.gradient_accumulation_steps):
            raise DetoxError(
                f"rl.batch_size ({p.batch_size}) must split into whole prompts of rl.samples_per_prompt "
                f"({p.samples_per_prompt}) responses over {world} process(es), and rl.mini_batch_size "
                f"({p.mini_batch_size}) over {world} process(es) x {p.gradient_accumulation_steps} accumulation step(s)"
            )
        if self.accelerator.gradient_accumulation_steps != p.gradient_accumulation_steps:
            raise DetoxError(
                f"the accelerator accumulates {self.accelerator.gradient_accumulation_steps} micro-batch(es) per "
                f"optimiser step but rl.gradient_accumulation_steps is {p.gradient_accumulation_steps}; make them equal"
            )
        if len(prompts) < 1:
            raise DetoxError("no training prompts")
        self.local_batch = p.batch_size // world
        self.micro_batch = p.mini_batch_size // (world * p.gradient_accumulation_steps)

        if self.algorithm.uses_critic:
            policy.add_value_head()
        elif policy.module.value_head is not None:
            policy.module.value_head = None  # a critic restored with the adapter is neither trained nor saved
        groups = [{"params": [q for q in policy.model.parameters() if q.requires_grad], "lr": p.learning_rate}]
        if policy.module.value_head is not None:
            groups.append({"params": list(policy.module.value_head.parameters()),
                           "lr": p.learning_rate * p.value_head_lr_scale})
        optimizer = torch.optim.Adam(groups)
        # accelerate steps a prepared scheduler once per process for every optimiser step
        # (split_batches=False), so the schedule's length counts all processes' steps.
        optimiser_steps = p.steps * p.update_epochs * (p.batch_size // p.mini_batch_size)
        scheduler = get_scheduler(
            p.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=optimiser_steps * world
        )
        self.module, self.optimizer, self.scheduler = self.accelerator.prepare(policy.module, optimizer, scheduler)
        if policy.reference is not None:  # a separately named reference is frozen: placed, never prepared
            policy.reference.to(self.accelerator.device)
        self.kl_ctl = (
            AdaptiveKLController(p.init_kl_coef, p.target_kl, p.kl_horizon)
            if p.adaptive_kl
            else FixedKLController(p.init_kl_coef)
        )
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        self.shards_weights = shards_weights(self.accelerator)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over processes: the ``reduce`` of the math in detoxrl.rl.core."""
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    # ----------------------------------------------------------------------------- data
    def batch_prompts(self, step: int) -> list[str]:
        """This process's share of global batch ``step``: its rl.batch_size / k prompts, each once
        (step() samples the k responses to each).

        The order depends only on seed and step, never on the number of processes.
        """
        return [self.prompts[i] for i in self.batch_indices(step)]

    def batch_references(self, step: int) -> list[str] | None:
        """The reference responses of ``batch_prompts(step)`` (None without references)."""
        return None if self.references is None else [self.references[i] for i in self.batch_indices(step)]

    def batch_indices(self, step: int) -> list[int]:
        p, n = self.config.rl, len(self.prompts)
        k = p.samples_per_prompt
        per_step = p.batch_size // k
        indices = []
        for position in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(position, n)
            order = np.random.default_rng(self.config.seed + epoch).permutation(n)
            indices.append(int(order[offset]))
        local = self.local_batch // k
        rank = self.accelerator.process_index
        return indices[rank * local : (rank + 1) * local]

    def reward_context(self, prompts: list[str], responses: list[str]) -> dict[str, Any]:
        """The whole batch over all processes (gathered in rank order, so that 2 processes score as 1 does) and
        where this process's responses start in it: for terms that compare a response with the others."""
        everyone = gather_object(list(zip(prompts, responses)))
        return {"prompts": [p for p, _ in everyone], "completions": [r for _, r in everyone],
                "offset": self.accelerator.process_index * len(prompts)}

    def score(
        self, prompts: list[str], responses: list[str], references: list[str] | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The reward of each response (one prompt and reference each) and each term's mean over all processes:
        the rollout's, and that of the extra responses an algorithm samples (Algorithm.extra_rollout)."""
        values, terms = self.reward(prompts, responses, references=references,
                                    batch=self.reward_context(prompts, responses))
        means = {term_log_key(name): float(masked_mean(torch.from_numpy(v), reduce=self.reduce))
                 for name, v in terms.items()}
        return torch.from_numpy(values), means

    # ----------------------------------------------------------------------------- one step
    def rollout(
        self, prompts: list[str], responses: list[str] | None, rewards: Any, references: list[str] | None
    ) -> tuple[Rollout, dict[str, float]]:
        cfg, stats = self.config, {}
        tick = time.perf_counter()
        unwrapped = self.accelerator.unwrap_model(self.module)
        with self.accelerator.autocast():
            if responses is None:
                first = self.accelerator.process_index * len(prompts)
                seeds = sample_seeds(cfg.seed, self.step_count, count=first + len(prompts))[first:]
                batch = generate(self.policy, unwrapped.model, prompts, cfg.generation, cfg.data.max_prompt_tokens,
                                 seeds, unwrapped.value_head, self.shards_weights)
            else:
                batch = rollout_from_responses(self.policy, prompts, responses, cfg.generation,
                                               cfg.data.max_prompt_tokens)
        stats["time/generation"] = time.perf_counter() - tick
        release_freed_memory()  # the sampling's cache, before the passes that keep activations for backward

        tick = time.perf_counter()
        if rewards is None:
            batch.scores, term_stats = self.score(prompts, batch.responses, references)
            stats.update(term_stats)
        else:
            batch.scores = torch.as_tensor(np.asarray([float(r) for r in rewards], dtype=np.float32))
            if not torch.isfinite(batch.scores).all():
                raise DetoxError(f"rewards must be {len(prompts)} finite numbers, one per response")
        batch.scores = batch.scores.to(batch.mask.device)
        stats["time/reward"] = time.perf_counter() - tick

        tick = time.perf_counter()
        with self.accelerator.autocast():
            batch.ref_logprobs = reference_logprobs(self.policy, batch, cfg.generation, self.micro_batch)
        stats["time/reference"] = time.perf_counter() - tick
        return batch, stats

    def step(
        self, prompts: list[str], responses: list[str] | None = None, rewards: Any = None,
        references: list[str] | None = None,
    ) -> dict[str, float]:
        """One iteration on this process's prompts; returns the logged statistics.

        Each prompt is given once: step() repeats it ``rl.samples_per_prompt`` (k) times in a row, so
        that it gets k responses and rloo's and grpo's baselines compare only responses to the same
        prompt. By default the policy samples the responses and the scorer rewards them.
        ``responses`` (strings made elsewhere) and ``rewards`` (numbers) replace either step, as in
        the recipe's ``ppo_trainer.step(query, response, reward)``; both are one per response,
        ``len(prompts) * k`` of them, the k responses to ``prompts[i]`` at ``i * k`` to ``i * k + k - 1``.
        ``references`` (one per prompt) feed the reward's fidelity term.
        """
        p, k = self.config.rl, self.config.rl.samples_per_prompt
        if not prompts:
            raise DetoxError("step() needs at least one prompt")
        for name, given in (("responses", responses), ("rewards", rewards)):
            if given is not None and len(given) != len(prompts) * k:
                raise DetoxError(f"{name} must be one per response: {len(prompts)} prompt(s) x rl.samples_per_prompt "
                                 f"({k}) = {len(prompts) * k}, got {len(given)}")
        if references is not None and len(references) != len(prompts):
            raise DetoxError(f"references must be one per prompt: {len(prompts)}, got {len(references)}")
        tick = time.perf_counter()
        batch, stats = self.rollout([x for x in prompts for _ in range(k)], responses, rewards,
                                    None if references is None else [x for x in references for _ in range(k)])
        self.algorithm.extra_rollout(self, prompts, references, batch)

        tick_opt = time.perf_counter()
        kl_coef = self.kl_ctl.value
        advantages, returns, algorithm_stats = self.algorithm.advantages(batch, kl_coef, self.reduce)
        update_stats = self.optimise(batch, advantages, returns, kl_coef)
        stats["time/optimisation"] = time.perf_counter() - tick_opt

        mean_kl = float(masked_mean(sequence_kl(batch.logprobs, batch.ref_logprobs, batch.mask), reduce=self.reduce))
        stats.update(self.summarise(batch, advantages, update_stats, mean_kl))
        stats.update(algorithm_stats)
        self.kl_ctl.update(mean_kl, p.batch_size)
        if mean_kl < -1e-3:
            logger.warning(
                "mean KL estimate is negative (%.4f): small values are sampling noise; large or persistent ones "
                "mean the log-probs do not come from the distribution that sampled",
                mean_kl,
            )
        release_freed_memory()  # the step's activations and gradients, also for callers of step() itself
        stats["time/total"] = time.perf_counter() - tick
        self.step_count += 1
        stats["step"] = self.step_count
        return stats

    def optimise(
        self, batch: Rollout, advantages: torch.Tensor, returns: torch.Tensor | None, kl_coef: float
    ) -> list[dict[str, torch.Tensor]]:
        """Clipped updates, one per mini-batch: each process's share of it in micro-batches whose losses
        are divided by the mini-batch's count over all processes (loss_divisors), so the update is the
        whole mini-batch's whatever the processes and accumulation steps."""
        collected = []
        n = len(batch.responses)
        accumulation = self.accelerator.gradient_accumulation_steps
        shares = self.accelerator.num_processes * accumulation
        for epoch in range(self.config.rl.update_epochs):
            # Seeded by step and epoch, not by the RNG state, so a resumed run shuffles the same way.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 7919 * self.step_count + epoch))
            for rows in order.split(self.micro_batch * accumulation):
                divisors = loss_divisors(batch.mask[rows], shares, self.reduce)
                for index in rows.split(self.micro_batch):
                    collected.append(self.micro_step(batch, index, advantages, returns, divisors, kl_coef))
        return collected

    def micro_step(
        self, batch: Rollout, index: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor | None,
        divisors: dict[str, torch.Tensor], kl_coef: float,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of rows ``index``; the optimiser steps after the last micro-batch of a mini-batch."""
        p, g = self.config.rl, self.config.generation
        mb = batch.select(index)
        T = mb.response_ids.shape[1]
        with self.accelerator.accumulate(self.module), self.accelerator.autocast():
            out = self.module(mb.query_ids, mb.query_mask, mb.response_ids)
            scores = score_tokens(out.hidden, out.head, mb.response_ids, mb.mask, g.temperature, g.min_new_tokens,
                                  self.policy.eos_token_ids)
            values = out.values.float() if out.values is not None else None
            loss, stats = self.algorithm.loss(LossBatch(
                logprobs=scores.logprobs, values=values, rollout=mb, advantages=advantages[index, :T],
                returns=returns[index, :T] if returns is not None else None, divisors=divisors, kl_coef=kl_coef,
            ))
            self.check_finite(loss, stats)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.module.parameters(), p.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        stats["objective/entropy"] = masked_mean(scores.entropy, mb.mask)
        return stats

    def check_finite(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Stop before a NaN or infinite loss reaches backward, which would spread it to every adapter weight.

        The verdict is reduced over processes, so that all stop together and none waits in backward.
        """
        if self.reduce((~torch.isfinite(loss.detach())).float().reshape(1)).item():
            terms = ", ".join(k for k, v in stats.items() if k.startswith("loss/") and not torch.isfinite(v).all())
            raise DetoxError(f"step {self.step_count + 1}: the loss is not finite ({terms or 'on another process'}); "
                             "stopped before the optimiser step, so it never reached the adapter")

    def summarise(
        self, batch: Rollout, advantages: torch.Tensor, update_stats: list[dict[str, torch.Tensor]], mean_kl: float
    ) -> dict[str, float]:
        mean = lambda x, mask=None: float(masked_mean(x, mask, reduce=self.reduce))  # noqa: E731
        reward_mean = mean(batch.scores)
        stats = {
            "objective/kl": mean_kl,
            "objective/kl_coef": self.kl_ctl.value,
            "env/reward_mean": reward_mean,
            "env/reward_std": mean((batch.scores - reward_mean) ** 2) ** 0.5,
            "env/response_length_mean": mean(batch.mask.sum(dim=1)),
            "policy/advantages_mean": mean(advantages, batch.mask),
            "learning_rate": self.scheduler.get_last_lr()[0],
        }
        for key in update_stats[0]:
            stats[key] = mean(torch.stack([s[key] for s in update_stats]).float())
        return stats

    # ----------------------------------------------------------------------------- the loop
    def train(self, on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Run the remaining steps; checkpoint every ``save_steps``; return the per-step history."""
        cfg = self.config
        while self.step_count < cfg.rl.steps:
            stats = self.step(self.batch_prompts(self.step_count), references=self.batch_references(self.step_count))
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

    def close(self) -> None:
        """Ends the processes' work together (:func:`end_processes`); the trainer cannot step after this.

        The distributed wrapper goes first: its reducer would otherwise keep the process group alive past
        its end, and free it later at an unsafe moment.
        """
        self.module = self.accelerator.unwrap_model(self.module)
        self.accelerator.free_memory()  # the accelerator's own references to the wrapper
        end_processes(self.accelerator)

    def save_checkpoint(self) -> Path:
        return checkpoint.save(
            RunDir(self.config.output_dir).checkpoints, self.config.save_total_limit, self.accelerator,
            self.module, self.optimizer, self.scheduler, self.trainer_state(),
        )

    def load_checkpoint(self, directory: str | Path) -> None:
        state = checkpoint.load(Path(directory), self.accelerator, self.module, self.optimizer, self.scheduler)
        self.step_count = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.history = list(state["history"])

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step_count, "kl_ctl": self.kl_ctl.state_dict(), "history": self.history,
                "algorithm": self.algorithm.name}
