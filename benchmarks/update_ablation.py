"""Where UMTAM's update spends its time: the small linear algebra at a layer-stacked model's
shapes, and the update with one part changed at a time, beside AdamW in the same process.

Made for accelerators, where a step is bound by library calls and waits rather than by
its arithmetic; it runs on a CPU too. Usage (from the repository root)::

    python -m benchmarks.update_ablation              # scanned GPT-2 body, 12 blocks
    python -m benchmarks.update_ablation --quick      # 2 blocks, 7 repetitions

Part 1 times, each in its own jit (median of ``--reps`` calls): ``jnp.linalg.qr`` of a
stack of L thin m×32 sketches and of one (what a Householder QR of the sketches would
cost); batched 32×32 ``eigh`` and SVD (the Gram passes and the small SVD); and
``orthonormalize_many`` of four such stacks.

Part 2 times update + ``apply_updates`` (parameters and state donated, as
:mod:`benchmarks.step_time` ``--apply``) of AdamW and of ``umtam(1e-3,
row_axes=umtam_jax.scanned("blocks"))`` in variants, each compiled while one change is in
force (diagnostics, not settings: some give wrong results on inputs that need the parts
they remove):

- ``as shipped`` (on a GPU or TPU without any conditional on device data);
- ``CPU branches everywhere``: ``lax.platform_dependent`` takes its CPU branch (the
  overflow guards and the orthonormalisations' three-pass fallback as conditionals that
  skip work, two Gram passes otherwise): the cost of conditionals themselves
  (waits for the device, split CUDA graphs) when set beside ``as shipped``.

Writes ``benchmarks/results/update_ablation[_<backend>].json`` (``--out``, ``--no-write``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

from benchmarks.step_time import scanned_params, update_step  # isort: skip
from benchmarks._timing import time_interleaved  # isort: skip

import jax
import jax.numpy as jnp
import optax

import umtam_jax
from benchmarks._common import RESULTS_DIR, environment, like, markdown_table
from benchmarks._records import write_results
from umtam_jax.optimizer import _orthonormalize


def median_ms(fn: Callable, *args: Any, reps: int) -> float:
    """Median wall milliseconds of ``jax.jit(fn)(*args)`` after two warm-up calls.

    Example:
        >>> median_ms(jnp.sin, jnp.ones(4), reps=3) >= 0.0
        True
    """
    jitted = jax.jit(fn)
    timings = time_interleaved(
        {"call": lambda: jax.block_until_ready(jitted(*args))}, reps=reps, warmup=2
    )
    return statistics.median(timings.times["call"]) * 1e3


def linear_algebra(blocks: int, reps: int) -> dict[str, float]:
    """Part 1: milliseconds per call of the small linear algebra at the stack's shapes."""
    key = jax.random.key(0)
    out = {}
    for shape in [(blocks, 3072, 32), (blocks, 2304, 32), (blocks, 768, 32), (3072, 32)]:
        y = jax.random.normal(key, shape)
        out[f"qr {shape}"] = median_ms(lambda y: jnp.linalg.qr(y)[0], y, reps=reps)
    for n in (8 * blocks, 4 * blocks):
        a = jax.random.normal(key, (n, 32, 32))
        gram = a @ a.mT
        out[f"eigh ({n}, 32, 32)"] = median_ms(jnp.linalg.eigh, gram, reps=reps)
        out[f"svd ({n}, 32, 32)"] = median_ms(
            lambda a: jnp.linalg.svd(a, full_matrices=False), a, reps=reps
        )
    ys = [jax.random.normal(key, (blocks, m, 32)) for m in (3072, 768, 768, 768)]
    out[f"orthonormalize_many 4 × ({blocks}, m, 32)"] = median_ms(
        _orthonormalize.orthonormalize_many, ys, reps=reps
    )
    return out


#: Part 2's variants: the change in force while each one's update is traced.
VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "as shipped": contextlib.nullcontext,
    "CPU branches everywhere": lambda: patch.object(
        jax.lax,
        "platform_dependent",
        lambda *args, cpu=None, default=None, **_: (cpu or default)(*args),
    ),
}


def updates(blocks: int, reps: int) -> dict[str, dict[str, float]]:
    """Part 2: per variant, the median and range of milliseconds per update and its first
    call's seconds (compilation included), interleaved with AdamW's."""
    params = jax.tree.map(jnp.asarray, scanned_params(blocks))
    grads = jax.device_put(like(params, seed=1))
    steps = {"optax.adamw": update_step(optax.adamw(1e-3), params, grads, apply=True)[0]}
    compiled_s = {}
    for name, change in VARIANTS.items():
        opt = umtam_jax.umtam(1e-3, row_axes=umtam_jax.scanned("blocks"))
        step = update_step(opt, params, grads, apply=True)[0]
        t0 = time.perf_counter()
        with change():
            step()  # traced and compiled with the change in force
        compiled_s[f"umtam, {name}"] = time.perf_counter() - t0
        steps[f"umtam, {name}"] = step
    timings = time_interleaved(steps, reps=reps, warmup=2)
    times, first = timings.times, timings.first
    first.update(compiled_s)  # the UMTAM steps' first calls came before the timing loop
    adamw = statistics.median(times["optax.adamw"])
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_ms": med * 1e3,
            "min_ms": min(ts) * 1e3,
            "max_ms": max(ts) * 1e3,
            "over_adamw": med / adamw,
            "first_call_s": first[name],
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    """The two tables of a result."""
    parts = markdown_table(
        ["operation", "ms / call"], [[k, f"{v:.3f}"] for k, v in result["linalg_ms"].items()]
    )

    def spread(r: dict[str, Any]) -> str:
        return "—" if r["min_ms"] is None else f"{r['min_ms']:.2f}–{r['max_ms']:.2f}"

    rows = [
        [n, f"{r['median_ms']:.2f}", spread(r), f"{r['over_adamw']:.2f}×"]
        for n, r in result["updates"].items()
    ]
    return parts + "\n\n" + markdown_table(["update", "ms", "range", "× AdamW"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 blocks, 7 repetitions")
    ap.add_argument("--blocks", type=int, default=None, help="layers of the stack (12 / 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (15 / 7)")
    ap.add_argument("--out", default=None, help="results JSON path")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    blocks = args.blocks or (2 if args.quick else 12)
    reps = args.reps or (7 if args.quick else 15)
    backend = jax.default_backend()
    result = {
        "blocks": blocks,
        "reps": reps,
        "device_kind": jax.devices()[0].device_kind,
        "linalg_ms": linear_algebra(blocks, reps),
        "updates": updates(blocks, reps),
    }
    md = markdown(result)
    print(md, flush=True)
    if not args.no_write:
        name = "update_ablation" + ("" if backend == "cpu" else f"_{backend}")
        out = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
        write_results(out.stem, result, md, results_dir=out.parent, env=environment(),
                      title="where the update's time goes (ablation)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
