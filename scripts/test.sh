#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh), then lints, type-checks (mypy, configured in
# pyproject.toml) and runs the whole test suite on two pytest-xdist workers, one test file
# per worker at a time (module fixtures run once);
# extra arguments go to pytest (e.g. `-n 0` runs it in one process). A worker that crashes
# is not replaced: pytest-xdist's file scheduling waits forever for a replacement worker, so
# a crash ends the run at once, red, naming the test it was running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
status=0
.venv/bin/python -m pytest -p no:cacheprovider -n 2 --dist loadfile --max-worker-restart=0 "$@" || status=$?
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
exit "$status"
