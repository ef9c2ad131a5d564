#!/usr/bin/env bash
# Set up and run the whole test suite: lint, pytest against real PostgreSQL + pgmq and a real Kubernetes
# API server (tests/), then the e2e suite on a real single-node Kubernetes built on this machine (e2e/).
#   scripts/test.sh               everything
#   scripts/test.sh PYTEST_ARGS   only pytest with these arguments (e.g. tests/test_contract.py -k invalid)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# Kubernetes 1.20.2 built once per machine from Debian's source (about 7 minutes cold, cached outside the
# checkout): the operator tests use its API server, the e2e suite the whole node. With it built, those
# tests must run, not skip.
scripts/build-kubernetes.sh
# apiextensions-apiserver 1.36 from Debian sid's Go sources (about 10 minutes cold, cached the same way): the
# CRD's CEL rules are tested on it (tests/test_crd_on_kubernetes_1_36.py).
scripts/build-apiextensions-apiserver.sh >/dev/null
export SINGULARITY_REQUIRE_KUBE=1
# nats-server comes with the test packages (scripts/debian-test-packages.txt): the NATS tests must run too.
export SINGULARITY_REQUIRE_NATS=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Types: mypy strict (pydantic plugin) over singularity_stack and singularity_operator, [tool.mypy] in pyproject.toml.
.venv/bin/mypy
# The layers (services independent, the operator on the shared foundation only, no test support in
# production code): the contracts in pyproject.toml's [tool.importlinter].
.venv/bin/lint-imports --no-cache
if [[ $# -gt 0 ]]; then
  exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
# The node needs root (kubelet, containerd, the host's network); scripts/build-images.sh builds the images
# with buildah on the first run (a few minutes), then from its layer cache.
if [[ $(id -u) -eq 0 ]]; then
  exec .venv/bin/python -m pytest e2e
fi
exec sudo --preserve-env=SINGULARITY_REQUIRE_KUBE .venv/bin/python -m pytest e2e
