#!/usr/bin/env bash
# Install, then run the main job on the embedded default (no network): train SmolLM2-135M-Instruct
# with RLOO + LoRA on detoxrl's heated-dialogue sample set, then compare it with the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/detoxrl train --preset smollm2-offline "$@"
