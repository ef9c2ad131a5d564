#!/usr/bin/env bash
# Set up and run the whole test suite: lint, then pytest against real PostgreSQL + pgmq.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# A real Kubernetes API server for the operator tests, built once per machine from Debian's source
# (about 5 minutes cold, cached outside the checkout); with it built, those tests must run, not skip.
scripts/build-kubernetes.sh
export SINGULARITY_REQUIRE_KUBE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
