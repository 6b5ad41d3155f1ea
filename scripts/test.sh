#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh), then lints and runs the whole test suite on
# two pytest-xdist workers, one test file per worker at a time (module fixtures run once);
# extra arguments go to pytest (e.g. `-n 0` runs it in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
status=0
.venv/bin/python -m pytest -p no:cacheprovider -n 2 --dist loadfile "$@" || status=$?
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
exit "$status"
