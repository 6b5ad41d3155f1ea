"""Optimizer update time and state size on GPT-2-shaped pytrees, measured side by side.

Every optimizer's ``update`` is jitted (the optimizer state donated, as in a training loop)
and timed interleaved in one process: after warm-up, each repetition runs one update of
every optimizer in turn (round-robin, ``block_until_ready`` on updates and state), and the
median over repetitions is reported, so a background load slows all optimizers alike.
Gradients are synthetic (fixed across steps; the update cost does not depend on values).

Usage::

    python -m benchmarks.step_time            # 4 blocks (28.4M parameters), 11 reps
    python -m benchmarks.step_time --large    # also 12 blocks (GPT-2 small body)
    python -m benchmarks.step_time --quick    # CI-size: no exact SVD, no variants
    python -m benchmarks.step_time --check    # exit 1 if a target is missed
    python -m benchmarks.step_time --keep-freed-memory  # no allocator page faults
    python -m benchmarks.step_time --blocks 4 12 --apply   # update + apply_updates (GPU)

(from the repository root, as every benchmark).

Writes ``benchmarks/results/step_time.json`` (``--out`` to change, ``--no-write`` to skip)
and prints a markdown table: wall ms per update (median, range), ratio to ``optax.adamw``,
process CPU ms per update (user + sys, from ``getrusage``: the total work, less sensitive
than wall time to other processes on a shared machine) and its ratio, the kernel's part of
that CPU time and the minor page faults per update, what the compiled step launches
(:func:`benchmarks._hlo.executable_ops`: kernels, ``while`` loops and conditionals, read
from its optimized HLO), state bytes ÷ parameter bytes. The targets are checked on the
wall-time ratio.

Page faults: glibc hands large freed blocks back to the kernel, so an update that writes a
fresh buffer (every optimizer's ``updates``) may pay a fault per touched page, depending on
the allocator's state. That varies between runs and between the optimizers of one run, and
moves the ratios by ±0.3×. ``--keep-freed-memory`` re-runs the command with glibc told to
keep freed memory (:data:`KEEP_FREED_MEMORY`), which removes this noise for all optimizers.

Targets (this 2-core CPU, see ``docs/performance.md``): ``umtam(1e-3)`` ≤ 2.5× AdamW; lean
(``error_decay=0.0, saliency="final"``) ≤ 1.2× AdamW; lean state ≤ 0.15× parameter bytes.

Hook for an end-to-end comparison (e.g. a MiniLM fine-tune step): :func:`optimizers` gives
the optimizer factories and :func:`benchmarks._timing.time_interleaved` the timing loop; a
caller passes its own jitted ``train_step`` closures to it.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

# jaxlib runs LAPACK (exact SVD, GaLore's projector SVD, UMTAM's QRs of small sketches)
# through SciPy's OpenBLAS, whose threads fight XLA's thread pool on a small shared CPU (a
# 768×3072 SVD measured at seconds instead of ~0.3 s). One OpenBLAS thread unless the caller
# chose otherwise; set before jax/scipy load. Recorded in the JSON.
if "--openblas-default" not in sys.argv:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import umtam_jax
from benchmarks._common import (
    LEAN_UMTAM,
    RESULTS_DIR,
    environment,
    gpt2_params,
    like,
    tree_bytes,
    tree_size,
)
from benchmarks._hlo import executable_ops
from benchmarks._records import write_results
from benchmarks._step_time_report import check_targets, report_lines
from benchmarks._timing import time_interleaved

LR = 1e-3


def _galore() -> optax.GradientTransformation | None:
    contrib = getattr(optax, "contrib", None)
    galore = getattr(contrib, "galore", None)
    if galore is None:
        return None
    # Rank 32 as UMTAM's; projector refresh (an SVD of the gradient) every 200 steps, so the
    # timed steps are the in-between ones, the cost GaLore's design amortises.
    return galore(LR, rank=32, update_proj_gap=200)


def optimizers(
    *, exact: bool = True, extra: bool = True, scanned: bool = False
) -> dict[str, Callable[[], Any]]:
    """Name → factory of the compared optimizers (``None`` factory result: unavailable).

    ``scanned``: the parameters are layer-stacked (:func:`scanned_params`); UMTAM treats
    their leading axis as a batch of matrices (``row_axes=umtam_jax.scanned("blocks")``).
    """
    scan = {"row_axes": umtam_jax.scanned("blocks")} if scanned else {}
    umtam = functools.partial(umtam_jax.umtam, LR, **scan)
    cases: dict[str, Callable[[], Any]] = {
        "optax.sgd": lambda: optax.sgd(LR),
        "optax.adamw": lambda: optax.adamw(LR),
        "optax.adafactor": lambda: optax.adafactor(LR),
        "optax.contrib.galore": _galore,
    }
    if exact:
        cases["umtam exact SVD"] = lambda: umtam(svd_method="exact")
    cases["umtam default"] = lambda: umtam()
    cases["umtam lean"] = lambda: umtam(**LEAN_UMTAM)
    if extra:
        cases["umtam default svd_every=4"] = lambda: umtam(svd_every=4)
        cases["umtam default bf16 M̃/S"] = lambda: umtam(buffer_dtype="bfloat16")
        grouped = {"group_leaves": True}
        cases["umtam default grouped"] = lambda: umtam(**grouped)
        cases["umtam lean grouped"] = lambda: umtam(**LEAN_UMTAM, **grouped)
        cases["umtam lean svd_every=4"] = lambda: umtam(svd_every=4, **LEAN_UMTAM)
        cases["umtam lean svd_every=16"] = lambda: umtam(svd_every=16, **LEAN_UMTAM)
        cases["umtam lean rank=8"] = lambda: umtam(rank=8, **LEAN_UMTAM)
        cases["umtam lean rank=8 svd_every=4"] = lambda: umtam(rank=8, svd_every=4, **LEAN_UMTAM)
    return cases


KEEP_FREED_MEMORY = {
    # glibc's largest mmap threshold on 64-bit (bigger values are ignored): blocks up to
    # 32 MiB come from the heap; the heap is never trimmed back to the kernel; one arena,
    # because per-thread arenas still unmap their emptied heaps (measured: ~10,000 faults
    # per UMTAM update remained without it).
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**36),
    "MALLOC_ARENA_MAX": "1",
}
"""``--keep-freed-memory``: the environment that stops glibc from handing freed buffers back
to the kernel, so that no update pays first-touch page faults on fresh memory (measured at
0 to ~18,000 faults and up to ~30 ms of kernel time per update here, varying between runs
and optimizers with the allocator's state)."""


def apply_step(opt: optax.GradientTransformation):
    """The optimizer part of a training step, jitted: ``(grads, state, params) → (state,
    params)`` with ``params ← optax.apply_updates(params, updates)``, state and parameters
    donated (every output reuses its input's buffer)."""

    def train(g, s, p):
        updates, s = opt.update(g, s, p)
        return s, optax.apply_updates(p, updates)

    return jax.jit(train, donate_argnums=(1, 2))


def update_step(opt: optax.GradientTransformation, params: Any, grads: Any, apply: bool = False):
    """A blocking closure running one jitted, state-donating update (``step.lower()`` lowers
    that update); plus the state bytes.

    With ``apply``, the step is the optimizer part of a training step: it also applies the
    update, ``params ← optax.apply_updates(params, updates)``, with parameters and state
    donated, so every output reuses its input's buffer (the update itself stays inside
    the step). On a GPU this is what a training loop sees: the isolated update writes fresh
    output buffers each call, which makes XLA re-record its CUDA graphs every step.
    """
    if apply:
        update = apply_step(opt)
        holder = {"state": opt.init(params), "params": jax.tree.map(jax.numpy.copy, params)}
    else:
        # Returns (state, updates): JAX pairs donated inputs with outputs of the same shape
        # in order, so state-first output lets every state buffer (UMTAM's unchanged W0
        # included) alias its own input, as in a train step returning (params, state).
        update = jax.jit(lambda g, s, p: opt.update(g, s, p)[::-1], donate_argnums=1)
        holder = {"state": opt.init(params), "params": params}
    state_bytes = tree_bytes(holder["state"])

    def step():
        holder["state"], out = update(grads, holder["state"], holder["params"])
        if apply:
            holder["params"] = out
        jax.block_until_ready((out, holder["state"]))

    # The step's own jitted update, lowered for its current state (e.g. to read its HLO).
    step.lower = lambda: update.lower(grads, holder["state"], holder["params"])
    return step, state_bytes


def _selected(name: str, only: list[str], names) -> bool:
    """``--only``: an entry that is a whole optimizer name selects that one; any other entry
    selects every name containing it."""
    return name in only or any(o in name for o in only if o not in names)


def scanned_params(blocks: int) -> dict[str, Any]:
    """The GPT-2 blocks of :func:`gpt2_params` stacked along a leading layer axis, as
    ``nnx.scan`` / ``linen.scan`` keep them: ``{"blocks": ..., "ln_f": ...}``."""
    flat = gpt2_params(blocks)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *(flat[f"h{i}"] for i in range(blocks)))
    return {"blocks": stacked, "ln_f": flat["ln_f"]}


def run(
    blocks: int,
    *,
    reps: int,
    warmup: int,
    exact: bool,
    extra: bool,
    only,
    apply: bool = False,
    scanned: bool = False,
) -> dict:
    cases = optimizers(exact=exact, extra=extra, scanned=scanned)
    unmatched = [o for o in only or () if not any(_selected(n, [o], cases) for n in cases)]
    if unmatched:  # a renamed or misspelt optimizer would silently leave its row out
        raise SystemExit(f"--only {unmatched} selects no optimizer; the names: {list(cases)}")
    params = jax.device_put(scanned_params(blocks) if scanned else gpt2_params(blocks))
    grads = jax.device_put(like(params, seed=1))
    param_bytes = tree_bytes(params)
    steps, rows, notes = {}, {}, {}
    for name, factory in cases.items():
        if only and not _selected(name, only, cases):
            continue
        opt = factory()
        if opt is None:
            notes[name] = "not available in the installed optax"
            print(f"[{blocks} blocks] {name}: not available in optax {optax.__version__}")
            continue
        steps[name], state_bytes = update_step(opt, params, grads, apply=apply)
        rows[name] = {"state_bytes": state_bytes, "state_ratio": state_bytes / param_bytes}
    timings = time_interleaved(steps, reps=reps, warmup=warmup)
    times, first = timings.times, timings.first
    for name, step in steps.items():
        # After timing: the first call has compiled the step (its time includes that),
        # so this reads the cached executable instead of compiling it ahead of the call.
        rows[name].update(executable_ops(step.lower().compile().as_text()))
    cpu, sys_time, faults = timings.cpu, timings.sys, timings.faults
    adamw = statistics.median(times["optax.adamw"]) if "optax.adamw" in times else None
    adamw_cpu = statistics.median(cpu["optax.adamw"]) if "optax.adamw" in cpu else None
    for name, ts in times.items():
        median = statistics.median(ts)
        cpu_median = statistics.median(cpu[name])
        rows[name].update(
            median_ms=1e3 * median,
            min_ms=1e3 * min(ts),
            max_ms=1e3 * max(ts),
            times_ms=[round(1e3 * t, 3) for t in ts],
            cpu_median_ms=1e3 * cpu_median,
            sys_median_ms=1e3 * statistics.median(sys_time[name]),
            page_faults_median=statistics.median(faults[name]),
            first_call_s=round(first[name], 3),
            ratio_to_adamw=None if adamw is None else median / adamw,
            cpu_ratio_to_adamw=None if adamw_cpu is None else cpu_median / adamw_cpu,
        )
    return {
        "blocks": blocks,
        "scanned": scanned,
        "d": 768,
        "param_count": tree_size(params),
        "param_bytes": param_bytes,
        "reps": reps,
        "warmup": warmup,
        "results": rows,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="4 blocks, 7 reps, no exact SVD, no extra variants"
    )
    parser.add_argument("--large", action="store_true", help="also time 12 blocks (~85M)")
    parser.add_argument("--blocks", type=int, nargs="+", help="block counts (default 4)")
    parser.add_argument("--reps", type=int, help="timed repetitions (≥ 7; default 11)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-exact", action="store_true", help="skip UMTAM exact SVD")
    parser.add_argument("--no-extra", action="store_true", help="skip svd_every=4 variants")
    parser.add_argument("--only", nargs="+", help="optimizer names, or substrings of names, to run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "step_time.json")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--apply",
        action="store_true",
        help="time update + apply_updates with parameters and state donated (a training "
        "step's optimizer part; on GPU this avoids re-recording CUDA graphs every call)",
    )
    parser.add_argument(
        "--scanned",
        action="store_true",
        help="layer-stacked parameters ([L, ...] leaves, as nnx.scan keeps them); UMTAM with "
        "row_axes=umtam_jax.scanned('blocks')",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="re-run with glibc told to keep freed memory (no first-touch page faults)",
    )
    parser.add_argument(
        "--openblas-default",
        action="store_true",
        help="keep OpenBLAS's default thread count (default here: OPENBLAS_NUM_THREADS=1)",
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory and not all(k in os.environ for k in KEEP_FREED_MEMORY):
        # glibc reads these when the process starts: run this command again with them.
        env = {**os.environ, **KEEP_FREED_MEMORY}
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)

    reps = args.reps or (7 if args.quick else 11)
    if reps < 7:
        parser.error("--reps must be ≥ 7 (median of at least 7)")
    blocks = args.blocks or ([4, 12] if args.large and not args.quick else [4])
    exact = not (args.no_exact or args.quick)
    env = environment()
    env["openblas_num_threads"] = os.environ.get("OPENBLAS_NUM_THREADS")
    env["malloc"] = {k: os.environ[k] for k in KEEP_FREED_MEMORY if k in os.environ}
    kept = env["malloc"] == KEEP_FREED_MEMORY
    malloc_note = (
        f"glibc kept freed memory ({env['malloc']}). "
        if kept
        else f"glibc settings {env['malloc'] or 'default'} (page faults vary between runs; "
        "see --keep-freed-memory). "
    )
    title = (
        f"optimizer update time, interleaved with AdamW ({env['device_kind']}"
        + (", glibc keeping freed memory" if kept else "")
        + (", update + apply_updates" if args.apply else "")
        + ")"
    )
    payload: dict[str, Any] = {"apply": args.apply, "runs": []}
    report: list[str] = []  # the printed tables and target lines, also kept as markdown
    all_met = True
    for b in blocks:
        result = run(
            b,
            reps=reps,
            warmup=args.warmup,
            exact=exact,
            extra=not (args.no_extra or args.quick),
            only=args.only,
            apply=args.apply,
            scanned=args.scanned,
        )
        result["targets"] = check_targets(result)
        all_met &= all(v["time_met"] and v["state_met"] for v in result["targets"].values())
        payload["runs"].append(result)
        section = report_lines(result)
        print("\n".join(section) + "\n", flush=True)
        report += [*section, ""]
    markdown = (
        f"Device: {env['device_kind']} ({env['backend']}). "
        + (
            "Each step is update + apply_updates, parameters and state donated (--apply). "
            if args.apply
            else ""
        )
        + "Wall ms per update (median), "
        "ratio to optax.adamw in the same run, process CPU ms (and its kernel part), minor "
        "page faults per update, kernels / while loops / conditionals of the compiled step "
        "(from its optimized HLO), state bytes ÷ parameter bytes. "
        + malloc_note
        + "The end-to-end fine-tune step is in the efficiency section.\n\n"
        + "\n".join(report)
    )
    if not args.no_write:
        path = write_results(
            args.out.stem, payload, markdown, title=title, results_dir=args.out.parent, env=env
        )
        print(f"wrote {path}")
    return 0 if (all_met or not args.check) else 1


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
