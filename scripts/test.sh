#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh), then lints and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
status=0
.venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
exit "$status"
