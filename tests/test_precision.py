"""model.dtype (frozen base in bf16, LoRA and losses in fp32), mixed_precision left to the launcher,
checkpointing refused under sharded weights, and gradient checkpointing.

The tests run on CUDA where it is available, else on the CPU.
"""

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from plain import plain_logits, plain_scores
from tiny import ThanksShare, tiny_run_config

from detoxrl.errors import DetoxError
from detoxrl.policy import forward_response, load_policy
from detoxrl.precision import (
    EMULATED_BF16_WARNING,
    choose_dtype,
    cpu_has_fast_bf16,
    this_cpu_has_fast_bf16,
)
from detoxrl.rl.rollout import generate, sample_seeds
from detoxrl.rl.trainer import RLTrainer, build_accelerator, check_sharded_checkpointing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = ["the person1 said thanks about work", "the meeting is good", "a car and a home", "school talk"]
# Where the bf16 matrix products run: a GPU, a CPU with bf16 instructions, or a CPU where torch emulates
# them (AVX2 only, or the instruction sets restricted: scripts/test-avx2.sh). The passes that sample and
# re-score a response agree exactly as far as the kernels they run do, so each kind has its own bound.
BF16_KIND = "cuda" if DEVICE == "cuda" else "native" if this_cpu_has_fast_bf16() else "emulated"
# Largest |log pi| difference of a sampled token between generation (KV cache, one token at a time) and the
# teacher-forced pass, bf16 base weights, tiny models. Measured (10 sampling seeds x 4 prompts per model):
# native 4.8e-7 (both passes run the same kernels), emulated 7.9e-3; cuda: 0.019 at the benchmark's 135M
# layout on an H100 (docs/performance.md), and these tests passed there at 0.03.
BF16_LOGPROB_TOLERANCE = {"native": 1e-5, "emulated": 0.02, "cuda": 0.03}[BF16_KIND]
# objective/kl of the first update at lr 1e-12: the sampled log-probs against the reference's re-scored ones.
# Measured over 10 seeds per model and algorithm: native [-4.0e-7, 1.1e-7], emulated [-2.6e-3, 4.6e-3]
# (an AVX2-only EPYC gave -1.4e-3 and 2.4e-3); cuda passed [-1e-6, 1e-3) on an H100.
BF16_FIRST_KL_RANGE = {"native": (-1e-6, 1e-3), "emulated": (-1e-2, 1e-2), "cuda": (-1e-6, 1e-3)}[BF16_KIND]


def config_for(model, tmp_path, **dotted):
    return tiny_run_config(model, tmp_path, **{"device": DEVICE, **dotted})


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 {extra}\nbugs\t\t: sysret_ss_attrs\n"


@pytest.mark.parametrize(
    "extra, fast",
    [("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512f", False), ("", False),
     ("avx512_bf16x", False)],
)
def test_cpu_bf16_flags_from_cpuinfo(extra, fast):
    assert cpu_has_fast_bf16(CPUINFO.format(extra=extra)) is fast


def test_auto_picks_bf16_only_where_it_is_fast():
    assert choose_dtype("auto", on_gpu=False, gpu_has_bf16=False, cpu_has_bf16=True) == torch.bfloat16
    assert choose_dtype("auto", on_gpu=False, gpu_has_bf16=True, cpu_has_bf16=False) == torch.float32  # AVX2 only
    assert choose_dtype("auto", on_gpu=True, gpu_has_bf16=True, cpu_has_bf16=False) == torch.bfloat16
    assert choose_dtype("auto", on_gpu=True, gpu_has_bf16=False, cpu_has_bf16=True) == torch.float32  # e.g. a T4
    for setting, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        assert choose_dtype(setting, on_gpu=False, gpu_has_bf16=False, cpu_has_bf16=False) == dtype
    with pytest.raises(DetoxError, match="model.dtype must be one of auto, float32, bfloat16, float16, got 'bf16'"):
        choose_dtype("bf16", on_gpu=False, gpu_has_bf16=False, cpu_has_bf16=False)


def test_bf16_on_a_gpu_without_bf16_arithmetic_is_refused_with_what_to_use():
    with pytest.raises(DetoxError,
                       match=r"^model.dtype bfloat16: this GPU has no bf16 arithmetic .*; use float16 or auto"):
        choose_dtype("bfloat16", on_gpu=True, gpu_has_bf16=False, cpu_has_bf16=True)
    assert choose_dtype("float16", on_gpu=True, gpu_has_bf16=False, cpu_has_bf16=False) == torch.float16


def test_explicit_bf16_warns_only_where_the_cpu_emulates_it(caplog):
    with caplog.at_level(logging.WARNING, logger="detoxrl.precision"):
        assert choose_dtype("bfloat16", on_gpu=False, gpu_has_bf16=False, cpu_has_bf16=False) == torch.bfloat16
    assert [r.getMessage() for r in caplog.records] == [EMULATED_BF16_WARNING]
    assert "use float32 or auto" in EMULATED_BF16_WARNING
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detoxrl.precision"):
        choose_dtype("bfloat16", on_gpu=False, gpu_has_bf16=False, cpu_has_bf16=True)
        choose_dtype("bfloat16", on_gpu=True, gpu_has_bf16=True, cpu_has_bf16=False)
        choose_dtype("auto", on_gpu=False, gpu_has_bf16=False, cpu_has_bf16=False)
    assert caplog.records == []


def test_restricted_instruction_sets_take_effect_and_auto_follows_them():
    """The restriction scripts/test-avx2.sh applies: torch runs its AVX2 kernels, oneDNN has no bf16, and
    ``auto`` picks float32 on any CPU, as it does on an AVX2-only one."""
    code = ("import torch; from detoxrl.precision import resolve_dtype, torch_may_use_avx512_bf16; "
            "print(torch.backends.cpu.get_cpu_capability(), torch_may_use_avx512_bf16(), resolve_dtype('auto', 'cpu'))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["AVX2", "False", "torch.float32"]


def test_validate_refuses_unknown_dtype_naming_the_one_meant(tiny_t5, tmp_path):
    with pytest.raises(DetoxError, match=r"^model.dtype must be one of auto, float32, bfloat16, float16, got 'half'; "
                                         r"use float16$"):
        tiny_run_config(tiny_t5, tmp_path, **{"model.dtype": "half"}).validate()
    with pytest.raises(DetoxError, match=r"got 'int8'$"):  # nothing it could mean
        tiny_run_config(tiny_t5, tmp_path, **{"model.dtype": "int8"}).validate()


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_bf16_base_with_fp32_adapter_and_value_head(model, request, tmp_path):
    config = config_for(request.getfixturevalue(model), tmp_path, **{"model.dtype": "bfloat16"})
    policy = load_policy(config.model)
    trainer = RLTrainer(config, policy, ThanksShare(), PROMPTS)
    trainable = {n: p.dtype for n, p in trainer.module.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in trainer.module.named_parameters() if not p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("value_head" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_bf16_generation_logprobs_match_teacher_forcing(model, request, tmp_path):
    config = config_for(request.getfixturevalue(model), tmp_path, **{"model.dtype": "bfloat16",
                                                                     "generation.max_new_tokens": 8})
    policy = load_policy(config.model)
    policy.module.to(DEVICE)
    batch = generate(policy, policy.model, PROMPTS, config.generation, 32, sample_seeds(0, 0, count=len(PROMPTS)))
    with torch.no_grad():
        out = forward_response(policy.model, batch.query_ids, batch.query_mask, batch.response_ids)
    forced = plain_scores(plain_logits(out.hidden, out.head), batch.response_ids, batch.mask,
                          config.generation.temperature, config.generation.min_new_tokens, policy.eos_token_ids)[0]
    assert batch.logprobs.dtype == forced.dtype == torch.float32
    assert batch.mask.sum() >= len(PROMPTS)
    assert (batch.logprobs - forced).abs().max() < BF16_LOGPROB_TOLERANCE


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_bf16_first_update_keeps_ratio_near_one(model, algorithm, request, tmp_path):
    """Old log-probs (generation) and new ones (training pass) come from the same weights; a learning rate of
    1e-12 keeps it so, so any ratio away from 1 would be bf16 error between the two passes."""
    config = config_for(request.getfixturevalue(model), tmp_path, **{
        "model.dtype": "bfloat16", "rl.algorithm": algorithm, "rl.learning_rate": 1e-12, "rl.batch_size": 8,
        "rl.mini_batch_size": 4, "rl.samples_per_prompt": 2 if algorithm == "rloo" else 1,
        "generation.max_new_tokens": 8})
    trainer = RLTrainer(config, load_policy(config.model), ThanksShare(), PROMPTS)
    stats = trainer.step(trainer.batch_prompts(0))
    assert stats["policy/clipfrac"] == 0
    assert 0 <= stats["policy/approxkl"] < 1e-4
    # The reference is the same base with the adapter off, and LoRA starts at zero: KL ~ 0, off only by rounding.
    low, high = BF16_FIRST_KL_RANGE
    assert low <= stats["objective/kl"] < high


def test_mixed_precision_unset_follows_the_launcher(tiny_t5, tmp_path, monkeypatch):
    """accelerate launch hands its mixed precision to the process as ACCELERATE_MIXED_PRECISION."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        assert build_accelerator(config_for(tiny_t5, tmp_path)).mixed_precision == "bf16"
        AcceleratorState._reset_state(reset_partial_state=True)
        explicit = config_for(tiny_t5, tmp_path, mixed_precision="no")
        assert build_accelerator(explicit).mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def fake_accelerator(distributed_type, zero_stage=None):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("accelerator", [fake_accelerator(DistributedType.FSDP),
                                         fake_accelerator(DistributedType.DEEPSPEED, zero_stage=3)])
def test_checkpoints_refused_under_sharded_weights(accelerator, tiny_t5, tmp_path):
    with pytest.raises(DetoxError, match="save_steps 2: checkpoint and resume are not supported when the weights "
                                         "are sharded"):
        check_sharded_checkpointing(accelerator, config_for(tiny_t5, tmp_path, save_steps=2))
    check_sharded_checkpointing(accelerator, config_for(tiny_t5, tmp_path, save_steps=0))


@pytest.mark.parametrize("accelerator", [fake_accelerator(DistributedType.MULTI_GPU),
                                         fake_accelerator(DistributedType.DEEPSPEED, zero_stage=2)])
def test_checkpoints_allowed_with_whole_weights(accelerator, tiny_t5, tmp_path):
    check_sharded_checkpointing(accelerator, config_for(tiny_t5, tmp_path, save_steps=2))


def one_ppo_step(model_path, tmp_path, setting: str, value: bool):
    """One PPO step of a tiny model with ``setting`` = ``value``: its statistics, LoRA weights, and whether
    gradients were on at each call of the first layer's attention (the encoder's, for T5)."""
    config = config_for(model_path, tmp_path, **{setting: value, "rl.learning_rate": 1e-2, "rl.batch_size": 4,
                                                 "generation.max_new_tokens": 6})
    torch.manual_seed(0)
    policy = load_policy(config.model)
    trainer = RLTrainer(config, policy, ThanksShare(), PROMPTS)
    attention = next(m for n, m in policy.model.named_modules() if n.endswith(("layer.0.SelfAttention",
                                                                                "layers.0.self_attn")))
    calls = []
    attention.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    stats = trainer.step(trainer.batch_prompts(0))
    lora = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    return stats, lora, calls


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_update(model, request, tmp_path):
    """One PPO step with and without it: same losses and LoRA weights (T5's dropout must stay off), and each
    layer's attention runs again in the backward pass."""
    path = request.getfixturevalue(model)
    plain, plain_lora, _ = one_ppo_step(path, tmp_path, "model.gradient_checkpointing", False)
    checkpointed, checkpointed_lora, checkpointed_calls = one_ppo_step(path, tmp_path,
                                                                       "model.gradient_checkpointing", True)
    # Recomputation shows as a second grad-enabled call of the layer's attention in each of the 2 mini-batches
    # (a checkpointed pass feeds prompt and response in one call; the plain one encodes prompts once, apart).
    assert checkpointed_calls.count(True) == 2 * 2
    for key in ("loss/policy", "loss/value", "policy/approxkl"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7)
    # Adam's first steps are ~lr * sign(gradient): a weight whose gradient is near 0 moves by rounding-level
    # differences of the two passes (up to 1.3e-6 measured on T5), far below the 1e-2 steps a difference in
    # the computation (dropout on, say) would make.
    for name, weights in plain_lora.items():
        torch.testing.assert_close(checkpointed_lora[name], weights, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_recomputed_prompts_give_the_same_update_to_the_bit(model, request, tmp_path):
    """One PPO step with model.recompute_prompts and without: the same statistics and LoRA weights to the bit,
    and the first prompt layer's attention runs once more with gradients in each of the 2 mini-batches."""
    path = request.getfixturevalue(model)
    plain, plain_lora, plain_calls = one_ppo_step(path, tmp_path, "model.recompute_prompts", False)
    recomputed, recomputed_lora, recomputed_calls = one_ppo_step(path, tmp_path, "model.recompute_prompts", True)
    assert recomputed_calls.count(True) == plain_calls.count(True) + 2
    untimed = lambda stats: {k: v for k, v in stats.items() if not k.startswith("time/")}  # noqa: E731
    assert untimed(recomputed) == untimed(plain)
    assert any(w.abs().sum() > 0 for n, w in recomputed_lora.items() if "lora_B" in n)  # B starts at 0: it moved
    for name, weights in plain_lora.items():
        assert torch.equal(recomputed_lora[name], weights), name
