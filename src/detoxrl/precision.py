"""The dtype of the frozen base weights (``model.dtype``), and what ``auto`` picks.

Only the frozen base is stored in a low precision: peft keeps the LoRA adapter in float32, the value
head is float32, and detoxrl.rl.logprobs upcasts the LM head's logits, so log-probabilities, KL and
losses are float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import check_model_dtype
from .errors import DetoxError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# x86 flags of the bf16 matrix instructions. Without them torch emulates bf16 matmuls, which is many
# times slower than float32 (pytorch/pytorch#146508), so ``auto`` keeps float32 there.
FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# What an explicit bfloat16 costs where the CPU only emulates it (docs/performance.md, "CPUs without bf16").
EMULATED_BF16_WARNING = (
    "model.dtype bfloat16: this CPU has no bf16 instructions (or torch may not use them), so torch emulates "
    "bf16: several times slower than float32, and the log-probs of sampling and training differ by up to ~0.01; "
    "use float32 or auto"
)


def cpu_has_fast_bf16(cpuinfo: str) -> bool:
    """Whether the ``flags`` lines of a /proc/cpuinfo text name AVX512-BF16 or AMX-BF16."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return any(flag in flags for flag in FAST_BF16_CPU_FLAGS)


def torch_may_use_avx512_bf16() -> bool:
    """Whether torch's kernels are allowed the instructions that make bf16 fast.

    ``ATEN_CPU_CAPABILITY=avx2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` restrict them (to test the path of an
    AVX2-only CPU on a bigger one); this follows them, so ``auto`` then picks what such a CPU gets.
    """
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and (mkldnn_bf16 is None or bool(mkldnn_bf16()))


def this_cpu_has_fast_bf16() -> bool:
    """:func:`cpu_has_fast_bf16` for this machine, as far as torch is allowed to use it."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and cpu_has_fast_bf16(cpuinfo.read_text()) and torch_may_use_avx512_bf16()


def choose_dtype(setting: str, on_gpu: bool, gpu_has_bf16: bool, cpu_has_bf16: bool) -> torch.dtype:
    """``model.dtype`` as a torch dtype: ``auto`` is bfloat16 where the device computes it fast, else float32.

    An explicit ``bfloat16`` on a CPU that only emulates it is allowed (it still halves the weights'
    memory) with a warning that says what it costs; on a GPU without bf16 arithmetic it is refused.
    """
    check_model_dtype(setting)
    if setting == "bfloat16" and on_gpu and not gpu_has_bf16:
        raise DetoxError("model.dtype bfloat16: this GPU has no bf16 arithmetic (it needs compute capability 8.0, "
                         "Ampere, or later); use float16 or auto (float32 here)")
    if setting == "bfloat16" and not on_gpu and not cpu_has_bf16:
        logger.warning(EMULATED_BF16_WARNING)
    if setting != "auto":
        return DTYPES[setting]
    return torch.bfloat16 if (gpu_has_bf16 if on_gpu else cpu_has_bf16) else torch.float32


def resolve_dtype(setting: str, device: str | None = None) -> torch.dtype:
    """:func:`choose_dtype` for this machine. ``device`` as in the ``device`` setting: None means
    a GPU when CUDA is available (accelerate's choice), else the CPU."""
    on_gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    return choose_dtype(
        setting,
        on_gpu,
        gpu_has_bf16=on_gpu and torch.cuda.is_bf16_supported(including_emulation=False),
        cpu_has_bf16=not on_gpu and setting in ("auto", "bfloat16") and this_cpu_has_fast_bf16(),
    )
