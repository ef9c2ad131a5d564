#!/usr/bin/env bash
# Set up singularity-stack on Debian 12: Debian packages, then a virtualenv with the project.
#   scripts/setup.sh           what running the product needs
#   scripts/setup.sh --test    plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

extras=""
# PostgreSQL for the local stack; bubblewrap and the interpreters Genesis validates and runs jobs with.
packages=(python3-venv python3-pip postgresql bubblewrap nodejs elixir shellcheck util-linux)
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  mapfile -t -O "${#packages[@]}" packages < <(grep -v '^#' scripts/debian-test-packages.txt | grep .)
fi

install_packages "${packages[@]}"

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# One resolver run for everything: the pins in pyproject.toml are chosen to resolve together.
.venv/bin/python -m pip install -q -e ".${extras}"
