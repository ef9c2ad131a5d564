#!/usr/bin/env bash
# Set up and run the whole test suite: lint, then pytest against real PostgreSQL + pgmq.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
