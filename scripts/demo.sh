#!/usr/bin/env bash
# The main job: sets up (scripts/setup.sh), then fine-tunes four MiniLM experts with UMTAM on
# real offline data, merges them with every method and prints the results table.
# Extra arguments go to `umtam-demo` (e.g. --full for the full-size experiment).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/umtam-demo "$@"
