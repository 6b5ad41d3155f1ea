"""Merge time and peak memory of every ``umtam_jax.merging`` method, plus top-k selection.

Every method runs in a fresh subprocess (``--worker``), so its peak memory is its own: the
worker builds base, 4 experts and whatever the method needs (UMTAM statistics, Fisher
diagonals) for a GPT-2-shaped pytree (14 blocks at d = 768 ≈ 99M parameters; ``--quick``:
2 blocks ≈ 14M), then times the merge twice (first call: tracing + compilation of the
per-leaf kernels + run; second call: run only) and reports:

- parameters per second of the second call (base-sized parameters merged per second);
- peak resident memory: ``ru_maxrss`` of the process at the end and before the merge (the
  high-water mark of building the inputs), and the peak of the resident set sampled every
  2 ms by a thread during the merge calls (``psutil``), minus the resident set before;
  ``tracemalloc`` sees no XLA buffer, so it is not used;
- the input size, so the peak can be read as "inputs + N× one tensor".

Then a top-k study: keep masks of the k = 0.2 N largest scores of one tensor of N float32
entries, by ``jax.lax.top_k`` + scatter, a full ``jnp.sort`` threshold, ``jnp.partition``
threshold, and the library's exact radix select (``umtam_jax.merging._select.topk_mask``).

Usage::

    python -m benchmarks.merge_time            # ~99M parameters, 4 experts
    python -m benchmarks.merge_time --quick    # ~14M parameters
    python -m benchmarks.merge_time --only ties umtam --no-topk

Writes ``benchmarks/results/merge_time.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see step_time.py

from benchmarks._common import RESULTS_DIR, ROOT, environment, markdown_table  # noqa: E402
from benchmarks._merge_worker import DENSITY, EXPERTS, METHODS, worker  # noqa: E402
from benchmarks._records import write_results  # noqa: E402

# ----------------------------------------------------------------------------- top-k


def topk_study(sizes: list[int], reps: int, top_k_max: int) -> list[dict[str, Any]]:
    """Keep-mask of the k = 0.2 N largest of N float32 scores by four methods."""
    import jax
    import jax.numpy as jnp

    from umtam_jax.merging._select import topk_mask

    def by_top_k(x, k):
        _, idx = jax.lax.top_k(x, k)
        return jnp.zeros(x.shape, bool).at[idx].set(True)

    def by_sort(x, k):
        return x >= jnp.sort(x)[x.shape[0] - k]

    def by_partition(x, k):
        return x >= jnp.partition(x, x.shape[0] - k)[x.shape[0] - k]

    methods = {
        "lax.top_k + scatter": by_top_k,
        "jnp.sort threshold": by_sort,
        "jnp.partition threshold": by_partition,
        "radix select (topk_mask)": lambda x, k: topk_mask(x, k),
    }
    rows = []
    for n in sizes:
        x = jax.random.normal(jax.random.key(n), (n,), jnp.float32)
        k = max(1, int(DENSITY * n))
        for name, fn in methods.items():
            if name != "radix select (topk_mask)" and n > top_k_max:
                rows.append({"n": n, "k": k, "method": name, "skipped": f"n > {top_k_max}"})
                continue
            f = jax.jit(fn, static_argnums=1)
            t0 = time.perf_counter()
            mask = jax.block_until_ready(f(x, k))
            first = time.perf_counter() - t0
            count = int(mask.sum())
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, k))
                ts.append(time.perf_counter() - t0)
            rows.append(
                {
                    "n": n,
                    "k": k,
                    "method": name,
                    "first_call_s": round(first, 4),
                    "median_s": statistics.median(ts),
                    "min_s": min(ts),
                    "kept": count,
                    "exact_count": count == k,
                }
            )
            print(
                f"  top-k n={n:>10,} {name:26s} {statistics.median(ts):8.3f} s"
                f"  kept {count} (k={k})",
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------- driver


def _run_worker(method: str, blocks: int, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        __spec__.name,
        "--worker",
        method,
        "--blocks",
        str(blocks),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            "method": method,
            "error": f"exit {proc.returncode}",
            "stderr_tail": proc.stderr[-2000:],
        }
    out = json.loads(lines[-1])
    out["subprocess_wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def _gb(x: float) -> str:
    return f"{x / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks (~14M parameters)")
    parser.add_argument("--blocks", type=int, help="GPT-2 blocks (default 14 ≈ 99M)")
    parser.add_argument("--only", nargs="+", choices=METHODS, help="methods to run")
    parser.add_argument("--no-topk", action="store_true")
    parser.add_argument("--topk-sizes", type=int, nargs="+")
    parser.add_argument("--topk-reps", type=int, default=3)
    parser.add_argument(
        "--topk-max", type=int, default=10_000_000, help="largest N for the sort-based methods"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per method, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "merge_time.json")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    blocks = args.blocks or (2 if args.quick else 14)
    if args.worker:
        print(json.dumps(worker(args.worker, blocks)), flush=True)
        return 0

    env = environment()
    payload: dict[str, Any] = {"blocks": blocks, "methods": []}
    try:
        import psutil

        env["memory_total_bytes"] = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover
        pass
    rows = []
    for method in args.only or METHODS:
        print(f"[{method}] ...", flush=True)
        res = _run_worker(method, blocks, args.timeout)
        payload["methods"].append(res)
        if "error" in res:
            print(f"[{method}] failed: {res['error']}\n{res.get('stderr_tail', '')}", flush=True)
            continue
        rows.append(
            [
                method,
                f"{res['param_count'] / 1e6:.1f}M",
                f"{res['first_call_s']:.2f}",
                f"{res['second_call_s']:.2f}",
                f"{res['params_per_s'] / 1e6:.1f}M",
                _gb(res["input_bytes"]),
                _gb(res["peak_over_inputs_bytes"]),
                _gb(res["maxrss_end_bytes"]),
                _gb(res["device_peak_over_inputs_bytes"])
                if "device_peak_over_inputs_bytes" in res
                else "–",
            ]
        )
        print("  " + " | ".join(rows[-1]), flush=True)
    table = markdown_table(
        [
            "method",
            "params",
            "1st call s",
            "2nd call s",
            "params/s",
            "inputs GiB",
            "peak over inputs GiB",
            "max RSS GiB",
            "device peak over inputs GiB",
        ],
        rows,
    )
    heading = f"{EXPERTS} experts, density {DENSITY}, {blocks} GPT-2 blocks"
    print(f"\n{heading}\n\n{table}\n")
    markdown = [
        f"{heading}; each method in a fresh process, '2nd call' without compilation, peak "
        "memory = sampled resident set during the calls minus that before them.",
        "",
        table,
    ]
    if not args.no_topk:
        sizes = args.topk_sizes or (
            [1_000_000, 4_000_000] if args.quick else [1_000_000, 10_000_000, 38_597_376]
        )
        print("top-k selection (k = 0.2 N, float32):", flush=True)
        payload["topk"] = topk_study(sizes, args.topk_reps, args.topk_max)
        topk_rows = [
            [f"{r['n']:,}", r["method"]]
            + (
                [r["skipped"], "–"]
                if "skipped" in r
                else [f"{r['median_s']:.3f}", "yes" if r["exact_count"] else "no"]
            )
            for r in payload["topk"]
        ]
        markdown += [
            "",
            "Top-k keep mask, k = 0.2 N float32 scores, one tensor (median s):",
            "",
            markdown_table(["N", "method", "median s", "exactly k kept"], topk_rows),
        ]
    if not args.no_write:
        path = write_results(
            args.out.stem,
            payload,
            "\n".join(markdown),
            title="merge time and memory, 4 experts",
            results_dir=args.out.parent,
            env=env,
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
