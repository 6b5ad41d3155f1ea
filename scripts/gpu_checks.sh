#!/usr/bin/env bash
# The optimizer's GPU measurements, prepared to run on a lent GPU machine whose image
# already holds JAX with CUDA, Optax, Flax, Orbax and chex, and that cannot download
# anything. Parts:
#
#   update      the optimizer update + apply_updates alone on the 12-block GPT-2 body as a
#               layer-stacked (scanned) model, against AdamW, Adafactor and GaLore, then
#               the 2-block one: times and the kernels each compiled step launches
#               (python -m benchmarks.step_time --apply --scanned --blocks 12 2)
#   throughput  end-to-end GPT training (88.4M parameters, batch 4 x 256): tokens/s and
#               peak memory of AdamW, Adafactor, UMTAM default and lean
#               (python -m benchmarks.train_throughput); each repeat is written as it
#               ends, so a part stopped at its time limit keeps the repeats it finished.
#               On an H200 compiling the six steps of `--grouped` took 290 s, so
#               group_leaves (which did not pay there) is left out
#   all         update, then throughput, within one ten-minute device call
#               (UPDATE_LIMIT_S, default 200 s, and THROUGHPUT_LIMIT_S, default 360 s)
#   ablation    where the update's time goes: the small linear algebra at the scanned
#               model's shapes and the update with one part changed at a time
#               (python -m benchmarks.update_ablation, ~2 minutes on an H200); part of
#               `diagnose`
#   profile     a trace of AdamW's and UMTAM's steps on the scanned 12-block body, summarised
#               kernel by kernel and host call by host call (python -m
#               benchmarks.update_profile), then the same with XLA's command buffers (CUDA
#               graphs) switched off; each run under PROFILE_LIMIT_S (default 250 s)
#   diagnose    ablation, then profile (both runs), within one ten-minute call
#               (ABLATION_LIMIT_S 200 s, PROFILE_LIMIT_S here 170 s each): what to run
#               first while the update's GPU time is not explained
#
# Before the call, on this machine: copy the LM token cache into the repository (the
# folder is ignored by git) and carry it:
#
#   mkdir -p .cache/umtam_jax && cp -r ~/.cache/umtam_jax/lm .cache/umtam_jax/
#
# then run, on the device, from the repository root (results go to $OUT as one archive per
# benchmark run, gpu-checks-<run>.tgz, e.g. gpu-checks-profile-no-graphs.tgz, plus the
# status lines printed at the end):
#
#   bash scripts/gpu_checks.sh diagnose     # first, while the update's GPU time is unexplained
#   bash scripts/gpu_checks.sh all          # then, if device time is left
#
# Extra arguments go to the benchmarks (e.g. `--quick` for a dry run on a CPU).
set -uo pipefail
part=${1:?usage: bash scripts/gpu_checks.sh update|throughput|all|ablation|profile|diagnose [options]}
shift
out=${OUT:-gpu-checks-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UMTAM_JAX_CACHE=${UMTAM_JAX_CACHE:-$PWD/.cache/umtam_jax}
py=${PYTHON:-python3}
{
    nvidia-smi -L 2>&1 || true
    "$py" -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())"
    # Where this JAX keeps shard_alike (without the public module the optimizer uses the
    # one under jax._src, if this JAX has it), for keep_like on Auto meshes.
    "$py" -c "
import importlib, jax
for name in ('jax.experimental.shard_alike', 'jax._src.shard_alike'):
    try:
        print(name, hasattr(importlib.import_module(name), 'shard_alike'))
    except ImportError as e:
        print(name, 'missing:', e)
print('jax.sharding:', [n for n in dir(jax.sharding) if 'alike' in n or 'reshard' in n])
print('jax.lax:', [n for n in dir(jax.lax) if 'alike' in n or 'shard' in n])
"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

# run_part NAME LIMIT_S ARGS...: one benchmark under a time limit, its log and results
# archived in $out/gpu-checks-NAME.tgz whether it finished or not.
run_part() {
    local name=$1 limit=$2 work
    shift 2
    work=$(mktemp -d)
    cp "$out/device.txt" "$work/"
    case "$name" in
        throughput)
            set -- -m benchmarks.train_throughput --repeats 4 \
                --workdir /tmp/gpu-checks-tt --results-dir "$work" "$@" ;;
        update)
            set -- -m benchmarks.step_time --apply --scanned --blocks 12 2 --reps 7 --no-exact \
                --no-extra --only optax.adamw optax.adafactor optax.contrib.galore \
                'umtam default' 'umtam lean' --out "$work/step_time_gpu_scanned.json" "$@" ;;
        ablation)
            set -- -m benchmarks.update_ablation --out "$work/update_ablation_gpu.json" "$@" ;;
        profile)
            set -- -m benchmarks.update_profile --out "$work/update_profile_gpu.json" "$@" ;;
        profile-no-graphs)
            export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
            set -- -m benchmarks.update_profile --label "(XLA command buffers off)" \
                --out "$work/update_profile_gpu_no_command_buffers.json" "$@" ;;
    esac
    timeout "$limit" "$py" "$@" 2>&1 | tee "$work/$name.log"
    local status=${PIPESTATUS[0]}
    tar -czf "$out/gpu-checks-$name.tgz" -C "$work" .
    echo "gpu_checks $name: exit $status; results in $out/gpu-checks-$name.tgz"
    return "$status"
}

case "$part" in
    update) run_part update 540 "$@" ;;
    throughput) run_part throughput 540 "$@" ;;
    ablation) run_part ablation 540 "$@" ;;
    profile)
        run_part profile "${PROFILE_LIMIT_S:-250}" "$@"
        first=$?
        (run_part profile-no-graphs "${PROFILE_LIMIT_S:-250}" "$@")
        second=$?
        exit $((first != 0 ? first : second)) ;;
    diagnose)
        run_part ablation "${ABLATION_LIMIT_S:-200}" "$@"
        first=$?
        run_part profile "${PROFILE_LIMIT_S:-170}" "$@"
        second=$?
        (run_part profile-no-graphs "${PROFILE_LIMIT_S:-170}" "$@")
        third=$?
        exit $((first != 0 ? first : second != 0 ? second : third)) ;;
    all)
        run_part update "${UPDATE_LIMIT_S:-200}" "$@"
        first=$?
        run_part throughput "${THROUGHPUT_LIMIT_S:-360}" "$@"
        second=$?
        exit $((first != 0 ? first : second)) ;;
    *)
        echo "unknown part '$part': use update, throughput, all, ablation, profile or diagnose" >&2
        exit 2 ;;
esac
