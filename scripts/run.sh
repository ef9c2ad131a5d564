#!/usr/bin/env bash
# Set up and run the whole stack locally: PostgreSQL (local, or --admin-dsn), the five databases, the services.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/singularity-stack up "$@"
