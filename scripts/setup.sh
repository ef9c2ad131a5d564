#!/usr/bin/env bash
# Set up singularity-stack on Debian 12: Debian packages, then a virtualenv with the project.
#   scripts/setup.sh           what running the product needs
#   scripts/setup.sh --test    plus what the test suite needs
# One progress line per stage on stderr. The pip install is skipped when nothing it depends on changed:
# .venv/.setup-stamp holds a hash of pyproject.toml and the extras of the last successful install (an
# install with the test extra also covers a later plain run). Delete that file to force a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

progress() { echo "setup: $*" >&2; }

extras=""
# PostgreSQL for the local stack; bubblewrap and the interpreters Genesis validates and runs jobs with.
packages=(python3-venv python3-pip postgresql bubblewrap nodejs elixir shellcheck util-linux)
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  mapfile -t -O "${#packages[@]}" packages < <(grep -v '^#' scripts/debian-test-packages.txt | grep .)
fi

progress "[1/3] Debian packages (${#packages[@]}; only missing ones are installed)"
install_packages "${packages[@]}"

if [[ ! -x .venv/bin/python ]]; then
  progress "[2/3] creating the virtualenv .venv"
  python3 -m venv .venv
else
  progress "[2/3] virtualenv .venv exists"
fi

stamp=.venv/.setup-stamp
digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f "$stamp" ]]; then
  read -r done_digest done_extras <"$stamp" || true
  if [[ "${done_digest:-}" == "$digest" && ("${done_extras:-}" == "${extras:-none}" || "${done_extras:-}" == "[test]") ]]; then
    progress "[3/3] Python packages up to date (pyproject.toml unchanged since the last install)"
    exit 0
  fi
fi
progress "[3/3] installing Python packages into .venv (about 4 minutes the first time, 15 s after a change)"
rm -f "$stamp"
# -qq: no pip notices and no build-backend banners (setuptools' "Editable installation"); errors still show.
.venv/bin/python -m pip install -qq --upgrade pip
# One resolver run for everything: the pins in pyproject.toml are chosen to resolve together.
.venv/bin/python -m pip install -qq -e ".${extras}"
if [[ -n "$extras" ]]; then
  # An older pgmq's SQL (pgmq 1.11.1, in the PyPI package 1.1.3), which tests/test_pgmq_upgrade.py upgrades from.
  .venv/bin/python -m pip download -qq --no-deps --dest .venv/share/old-pgmq pgmq==1.1.3
fi
echo "$digest ${extras:-none}" >"$stamp"
progress "done"
