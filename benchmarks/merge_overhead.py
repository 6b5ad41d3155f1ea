"""The out-of-core merge's cost per tensor: many small tensors against a few large ones.

A model of many small tensors (LoRA-style adapters, per-head weights, a deep model's
norms) pays the engine's fixed cost once per tensor: planning, the finiteness check,
dispatching each step to JAX and waiting for each expert's keep mask. This benchmark
writes a base and K experts as Hugging Face safetensors folders twice, with the same
number of parameters: ``--tensors`` tensors of 64 × 64 ("many"), and 4 tensors
("few"), and times ``engine.merge_checkpoints`` on each, in one process, after one
warm-up merge (compilation), ``--repeats`` times, the two models alternating. The cost
per tensor is ``(many − few) / tensors``.

Rows: task arithmetic (no selection), TIES (density 0.2: one top-k keep mask per expert
and tensor), and TIES with the radix select's 16-bit digits only (the select of every
size before 2026-12-07; it now takes 8-bit digits up to 2**18 scores), side by side.

Usage::

    python -m benchmarks.merge_overhead                 # 2000 tensors, 3 experts
    python -m benchmarks.merge_overhead --quick        # 200 tensors, 1 repeat

Writes ``benchmarks/results/merge_overhead.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import environment, markdown_table
from benchmarks._records import write_results

SIDE = 64
ROWS = {
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.5}, False),
    "ties": ("ties", {"density": 0.2}, False),
    "ties, 16-bit digits only": ("ties", {"density": 0.2}, True),
}


def write_models(root: Path, shapes: dict[str, tuple[int, ...]], experts: int) -> list[Path]:
    """Base and ``experts`` experts with leaves of ``shapes``; their folders."""
    from umtam_jax import checkpoint

    rng = np.random.default_rng(0)
    folders = []
    for name in ["base", *[f"expert{i}" for i in range(experts)]]:
        tree = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        folders.append(checkpoint.save_safetensors(root / name, tree))
    return folders


def time_merge(folders: list[Path], out: Path, row: str) -> float:
    """Seconds of one ``merge_checkpoints`` of ``row`` into the new folder ``out``."""
    from umtam_jax import engine

    method, kwargs, _ = ROWS[row]
    t0 = time.perf_counter()
    engine.merge_checkpoints(method, folders[0], folders[1:], out, progress=False, **kwargs)
    return time.perf_counter() - t0


def select_digits(wide_only: bool, narrow_up_to: int) -> None:
    """Sets how many scores the radix select takes 8-bit digits for (none: 16-bit only),
    dropping JAX's caches so that no selection traced with the other setting is reused."""
    import jax

    from umtam_jax.merging import _select

    _select._NARROW_DIGITS_UP_TO = 0 if wide_only else narrow_up_to
    jax.clear_caches()


def run(tensors: int, experts: int, repeats: int, workdir: str | None) -> dict[str, Any]:
    per_big = tensors * SIDE * SIDE // 4
    models = {
        "many": {f"t{i:05d}": (SIDE, SIDE) for i in range(tensors)},
        "few": {f"t{i}": (per_big,) for i in range(4)},
    }
    from umtam_jax.merging import _select

    narrow_up_to, rows = _select._NARROW_DIGITS_UP_TO, []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        folders = {m: write_models(root / m, s, experts) for m, s in models.items()}
        n = 0
        for row in ROWS:
            select_digits(ROWS[row][2], narrow_up_to)
            seconds: dict[str, list[float]] = {"many": [], "few": []}
            for r in range(repeats + 1):  # the first of each: compilation, not kept
                for model in ("many", "few"):
                    n += 1
                    t = time_merge(folders[model], root / f"out{n}", row)
                    if r:
                        seconds[model].append(t)
            many, few = statistics.median(seconds["many"]), statistics.median(seconds["few"])
            rows.append(
                {
                    "row": row,
                    "many_s": seconds["many"],
                    "few_s": seconds["few"],
                    "many_median_s": many,
                    "few_median_s": few,
                    "ms_per_tensor": 1e3 * (many - few) / tensors,
                }
            )
            print(rows[-1], flush=True)
        select_digits(False, narrow_up_to)
    return {"tensors": tensors, "side": SIDE, "experts": experts, "repeats": repeats,
            "parameters": tensors * SIDE * SIDE, "rows": rows}  # fmt: skip


def table(result: dict[str, Any]) -> str:
    body = [
        [
            r["row"],
            f"{r['many_median_s']:.2f}",
            f"{r['few_median_s']:.2f}",
            f"{r['ms_per_tensor']:.2f}",
        ]  # fmt: skip
        for r in result["rows"]
    ]
    head = [
        "method",
        f"{result['tensors']} tensors of {SIDE}×{SIDE}: s",
        "4 tensors, same parameters: s",
        "ms per tensor",
    ]
    return (
        f"{result['experts']} experts, {result['parameters'] / 1e6:.1f}M float32 parameters "
        f"each, safetensors in and out; median of {result['repeats']} after a warm-up.\n\n"
        + markdown_table(head, body)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="folder for the temporary models")
    parser.add_argument("--quick", action="store_true", help="200 tensors, 1 repeat")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.tensors, args.repeats = 200, 1
    if args.tensors < 4 or args.tensors % 4 or args.experts < 1 or args.repeats < 1:
        parser.error("--tensors: a multiple of 4, at least 4; --experts, --repeats: >= 1")
    env = environment()
    result = run(args.tensors, args.experts, args.repeats, args.workdir)
    text = table(result)
    print(text)
    if not args.no_write:
        name = "merge_overhead_quick" if args.quick else "merge_overhead"
        path = write_results(name, result, text, title="Merge cost per tensor", env=env)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
