#!/usr/bin/env bash
# The tests: set up, lint, then every test (fast and slow; slow ones fetch SmolLM2-135M).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
