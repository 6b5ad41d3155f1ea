#!/usr/bin/env bash
# The optimizer's GPU measurements, prepared to run on a lent GPU machine whose image
# already holds JAX with CUDA, Optax, Flax, Orbax and chex, and that cannot download
# anything. Two parts, each sized to finish within ten minutes on an H100/H200:
#
#   throughput  end-to-end GPT training (88.4M parameters, batch 4 x 256): tokens/s and
#               peak memory of AdamW, Adafactor, UMTAM default and lean, and both UMTAM
#               settings with group_leaves=True; 3 repeats x 5 rounds
#               (python -m benchmarks.train_throughput --grouped)
#   update      the optimizer update + apply_updates alone on the 12-block GPT-2 body as a
#               layer-stacked (scanned) model, against AdamW, Adafactor and GaLore, then
#               the 2-block one: times and the kernels each compiled step launches
#               (python -m benchmarks.step_time --apply --scanned --blocks 12 2)
#
# Before the call, on this machine: copy the LM token cache into the repository (the
# folder is ignored by git) and carry it:
#
#   mkdir -p .cache/umtam_jax && cp -r ~/.cache/umtam_jax/lm .cache/umtam_jax/
#
# then run, on the device, from the repository root (results go to $OUT as one archive,
# gpu-checks-<part>.tgz, plus the status lines printed at the end):
#
#   bash scripts/gpu_checks.sh throughput
#   bash scripts/gpu_checks.sh update
#
# Extra arguments go to the benchmark (e.g. `--quick` for a dry run on a CPU).
set -uo pipefail
part=${1:?usage: bash scripts/gpu_checks.sh throughput|update [benchmark options]}
shift
out=${OUT:-gpu-checks-out}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UMTAM_JAX_CACHE=${UMTAM_JAX_CACHE:-$PWD/.cache/umtam_jax}
py=${PYTHON:-python3}
{
    nvidia-smi -L 2>&1 || true
    "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$work/device.txt" 2>&1
cat "$work/device.txt"
case "$part" in
    throughput)
        cmd=(-m benchmarks.train_throughput --grouped --repeats 3 --workdir /tmp/gpu-checks-tt
             --results-dir "$work" "$@") ;;
    update)
        cmd=(-m benchmarks.step_time --apply --scanned --blocks 12 2 --reps 7 --no-exact
             --out "$work/step_time_gpu_scanned.json" "$@") ;;
    *)
        echo "unknown part '$part': use throughput or update" >&2
        exit 2 ;;
esac
timeout 540 "$py" "${cmd[@]}" 2>&1 | tee "$work/$part.log"
status=${PIPESTATUS[0]}
tar -czf "$out/gpu-checks-$part.tgz" -C "$work" .
echo "gpu_checks $part: exit $status; results in $out/gpu-checks-$part.tgz"
exit "$status"
