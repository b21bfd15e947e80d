#!/usr/bin/env bash
# The test suite as on a CPU with AVX2 only (no AVX-512, no bf16 instructions), on any x86 CPU: torch's
# kernels are restricted to AVX2, checked before the suite runs. Arguments go to pytest, as in test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
bash scripts/install.sh
.venv/bin/python - <<'PY'
import sys

import torch

from detoxrl.precision import resolve_dtype, torch_may_use_avx512_bf16

capability = torch.backends.cpu.get_cpu_capability()
if capability != "AVX2" or torch_may_use_avx512_bf16() or resolve_dtype("auto", "cpu") != torch.float32:
    sys.exit(f"the AVX2 restriction did not take effect: torch uses {capability} kernels")
print(f"torch restricted to {capability} kernels, no oneDNN bf16: model.dtype auto is float32")
PY
exec bash scripts/test.sh "$@"
