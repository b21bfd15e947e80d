#!/usr/bin/env bash
# Install, then run the test suite (no network needed beyond the package registries).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The report test renders the HTML in headless Chromium when it can be installed; otherwise it skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed; the browser test will be skipped"
fi
exec .venv/bin/python -m pytest -q "$@"
