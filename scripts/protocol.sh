#!/usr/bin/env bash
# The evaluation protocol end to end, then its results files: UMTAM-trained experts and
# every compared method, AdamW-trained experts (the alternative pipeline), every pair of
# tasks (conflict intensity), saliency vs magnitude pruning, and the claims table.
# Everything is cached in the work directories: rerun the same command to resume.
#
#   bash scripts/protocol.sh              # medium size: hours on a 2-core CPU
#   bash scripts/protocol.sh full         # full size: for a GPU machine
#   bash scripts/protocol.sh medium DIR   # work directories DIR and DIR-adamw
#
# ADAMW_METHODS="ties fisher" restricts the methods run on the AdamW experts (default:
# every method that needs no UMTAM statistics); MEMORY_MODES (default "umtam_lean
# umtam_bf16") are the memory modes whose experts are trained and merged too, in DIR-<mode>;
# CONFLICT_TASKS (default: the four protocol tasks and the distant-domain py_package) are
# the tasks whose pairs the conflict study merges. PYTHON selects the interpreter (default:
# the set-up's .venv/bin/python; run `bash scripts/setup.sh` first).
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-medium}"
root="${2:-protocol-$size}"
py="${PYTHON:-.venv/bin/python}"
adamw=()
if [[ -n "${ADAMW_METHODS:-}" ]]; then
  read -r -a methods <<< "$ADAMW_METHODS"
  adamw=(--adamw-methods "${methods[@]}")
fi
read -r -a modes <<< "${MEMORY_MODES-umtam_lean umtam_bf16}"
read -r -a pairs <<< "${CONFLICT_TASKS:-wn_defmatch kjv_section fortune_topic wn_supersense py_package}"
memory=()
if ((${#modes[@]})); then memory=(--memory-modes "${modes[@]}"); fi
"$py" -m benchmarks.merging --size "$size" --workdir "$root" \
  --adamw-workdir "$root-adamw" "${adamw[@]}" --conflict --conflict-tasks "${pairs[@]}" \
  "${memory[@]}"
"$py" -m benchmarks.pruning --size "$size" --workdir "$root"
"$py" -m umtam_jax.experiments.claims --out benchmarks/results/claims.md
