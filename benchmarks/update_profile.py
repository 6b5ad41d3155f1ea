"""A device trace of the optimizer step, summarised: where each step's time goes, by kernel
and by host call, for AdamW and UMTAM on a layer-stacked model.

Made for accelerators, where the UMTAM update takes far longer than its arithmetic and its
kernel count explain; it runs on a CPU too. Usage (from the repository root)::

    python -m benchmarks.update_profile                 # scanned GPT-2 body, 12 blocks
    python -m benchmarks.update_profile --quick         # 2 blocks, 3 traced steps
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m benchmarks.update_profile \\
        --label "no command buffers"                    # XLA's CUDA graphs switched off

Each optimizer's step is update + ``apply_updates`` with parameters and state donated (as
:mod:`benchmarks.step_time` ``--apply``), compiled and run twice, then traced for
``--steps`` steps with ``jax.profiler.trace``. The summary gives, per optimizer, the wall
time per step, the time per step during which the device ran anything (the union of its
trace events) and the trace's largest device and host entries, per step.

Writes ``benchmarks/results/update_profile[_<backend>].json`` (``--out``, ``--no-write``)
after each optimizer, so a run stopped early keeps those it finished;
``--trace-dir`` keeps the raw traces (TensorBoard / Perfetto) instead of a temporary folder.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.step_time import scanned_params, update_step  # isort: skip

import jax
import jax.numpy as jnp
import optax

import umtam_jax
from benchmarks._common import LEAN_UMTAM, RESULTS_DIR, environment, like, markdown_table
from benchmarks._records import write_results

#: Longest event name kept (kernel names can run to hundreds of characters).
NAME_CHARS = 90
#: Names of device-to-host copies in CUDA and XLA traces.
_TO_HOST = re.compile(r"DtoH|D2H|DeviceToHost", re.IGNORECASE)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Milliseconds covered by ``(start_us, end_us)`` intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3


def summarize_trace(trace: dict[str, Any], steps: int, top: int = 15) -> dict[str, Any]:
    """Per process of a Chrome-format trace (``perfetto_trace.json``): the milliseconds per
    step during which it ran anything, and its ``top`` entries by total time per step.

    Entries are keyed ``thread: name`` (a device's streams and its "XLA Ops" line stay
    apart, the numbered threads of one pool are one thread); Python frames of the host
    (names starting with ``$``) are left out. The busy time and the event counts leave out
    the summary lines whose thread name starts with ``XLA `` ("XLA Modules", "XLA Ops":
    one span per module or op, over the kernels it launched), so that the gaps between a
    device's kernels stay visible and each kernel is counted once.

    Args:
        trace: The parsed trace, ``{"traceEvents": [...]}``.
        steps: How many steps the trace holds (times are divided by it).
        top: Entries kept per process.

    Returns:
        ``{process name: {"busy_ms": float, "events": float, "to_host": float, "top":
        [[entry, ms, calls], ...]}}``, per step: ``events`` counts its entries (on a GPU
        stream, kernels and copies), ``to_host`` the device-to-host copies among them
        (each a wait of the host, e.g. for a conditional's predicate).

    Example:
        >>> events = [
        ...     {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        ...     {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream"}},
        ...     {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 0.0, "dur": 300.0},
        ...     {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 200.0, "dur": 300.0},
        ...     {"ph": "X", "pid": 1, "tid": 7, "name": "eigh", "ts": 1000.0, "dur": 100.0},
        ...     {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8,
        ...      "args": {"name": "XLA Modules"}},
        ...     {"ph": "X", "pid": 1, "tid": 8, "name": "jit_step", "ts": 0.0, "dur": 1100.0},
        ... ]
        >>> summary = summarize_trace({"traceEvents": events}, steps=2)
        >>> summary["/device:GPU:0"]["busy_ms"]
        0.3
        >>> summary["/device:GPU:0"]["top"][:2]
        [['XLA Modules: jit_step', 0.55, 0.5], ['Stream: gemm', 0.3, 1.0]]
        >>> summary["/device:GPU:0"]["events"], summary["/device:GPU:0"]["to_host"]
        (1.5, 0.0)
    """
    events = trace["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e.get("tid")): re.sub(r"/-?\d+$", "", e["args"]["name"])
               for e in meta if e["name"] == "thread_name"}  # fmt: skip
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # events, to-host copies
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith("$"):
            continue
        process = processes.get(e["pid"], str(e["pid"]))
        thread = str(threads.get((e["pid"], e.get("tid")), e.get("tid")))
        start, dur = float(e["ts"]), float(e.get("dur", 0.0))
        if not thread.startswith("XLA "):
            spans[process].append((start, start + dur))
            counts[process][0] += 1
            counts[process][1] += bool(_TO_HOST.search(e["name"]))
        total = totals[process][f"{thread}: {e['name']}"]
        total[0] += dur / 1e3
        total[1] += 1
    out = {}
    for process, entries in totals.items():
        ranked = sorted(entries.items(), key=lambda kv: -kv[1][0])[:top]
        out[process] = {
            "busy_ms": round(_union_ms(spans[process]) / steps, 4),
            "events": counts[process][0] / steps,
            "to_host": counts[process][1] / steps,
            "top": [
                [name[:NAME_CHARS], round(ms / steps, 4), calls / steps]
                for name, (ms, calls) in ranked
            ],
        }
    return out


def traced(step, steps: int, trace_dir: Path) -> tuple[float, dict[str, Any]]:
    """Runs the compiled, warmed-up ``step`` ``steps`` times under ``jax.profiler.trace``;
    returns the wall milliseconds per step and the parsed trace."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    newest = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(newest, "rt") as f:
        return wall_ms, json.load(f)


def profile(
    blocks: int, steps: int, trace_root: Path, top: int, done: Callable[[dict], None]
) -> dict[str, Any]:
    """Traces AdamW, UMTAM default and lean on the ``blocks``-block scanned GPT-2 body;
    ``done(results so far)`` is called after each one (a run stopped early keeps them)."""
    params = jax.tree.map(jnp.asarray, scanned_params(blocks))
    grads = jax.device_put(like(params, seed=1))
    scanned = umtam_jax.scanned("blocks")
    optimizers = {
        "optax.adamw": optax.adamw(1e-3),
        "umtam default": umtam_jax.umtam(1e-3, row_axes=scanned),
        "umtam lean": umtam_jax.umtam(1e-3, row_axes=scanned, **LEAN_UMTAM),
    }
    out = {}
    for i, (name, opt) in enumerate(optimizers.items()):
        step = update_step(opt, params, grads, apply=True)[0]
        step()  # compiled here, outside the trace
        step()
        wall_ms, trace = traced(step, steps, trace_root / f"{i}")
        out[name] = {"wall_ms": round(wall_ms, 4), "processes": summarize_trace(trace, steps, top)}
        done(out)
    return out


def markdown(result: dict[str, Any]) -> str:
    """A table of wall and busy times per optimizer, then each one's largest entries."""
    rows = []
    for name, r in result["optimizers"].items():
        busy = {p: v["busy_ms"] for p, v in r["processes"].items()}
        busy_text = "; ".join(f"{p} {ms:.2f}" for p, ms in busy.items())
        counts = "; ".join(
            f"{p} {v['events']:g} / {v['to_host']:g}" for p, v in r["processes"].items()
        )
        rows.append([name, f"{r['wall_ms']:.2f}", busy_text, counts])
    headers = ["step", "wall ms", "busy ms per process", "events / to-host copies per step"]
    parts = [markdown_table(headers, rows)]
    for name, r in result["optimizers"].items():
        for process, v in r["processes"].items():
            table = [[f"`{e}`", f"{ms:.3f}", f"{calls:g}"] for e, ms, calls in v["top"][:10]]
            heading = f"**{name}, {process}**"
            entries = markdown_table(["entry", "ms / step", "calls / step"], table)
            parts.append(f"{heading}\n\n{entries}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 blocks, 3 traced steps")
    ap.add_argument("--blocks", type=int, default=None, help="layers of the stack (12 / 2)")
    ap.add_argument("--steps", type=int, default=None, help="traced steps (10 / 3)")
    ap.add_argument("--top", type=int, default=25, help="entries kept per process")
    ap.add_argument("--label", default="", help="what differs in this run (e.g. XLA flags)")
    ap.add_argument("--trace-dir", default=None, help="keep the raw traces here")
    ap.add_argument("--out", default=None, help="results JSON path")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    blocks = args.blocks or (2 if args.quick else 12)
    steps = args.steps or (3 if args.quick else 10)
    env = environment()
    result = {
        "blocks": blocks,
        "steps": steps,
        "label": args.label,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "device_kind": jax.devices()[0].device_kind,
        "optimizers": {},
    }

    def done(optimizers: dict[str, Any]) -> None:
        """Prints and writes the results so far."""
        result["optimizers"] = optimizers
        md = markdown(result)
        print(md, flush=True)
        if not args.no_write:
            backend = jax.default_backend()
            name = "update_profile" + ("" if backend == "cpu" else f"_{backend}")
            out = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
            title = f"where the step's time goes (trace) {args.label}".strip()
            write_results(out.stem, result, md, results_dir=out.parent, env=env, title=title)

    with tempfile.TemporaryDirectory() as tmp:
        trace_root = Path(args.trace_dir) if args.trace_dir else Path(tmp)
        profile(blocks, steps, trace_root, args.top, done)
    return result


if __name__ == "__main__":
    main()
