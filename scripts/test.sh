#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the default test suite (slow tests excluded; add -m slow for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
