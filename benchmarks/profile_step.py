"""Where one optimizer update spends its time: XLA thunk time per kind of operation.

Runs ``jax.profiler`` around a few jitted, state-donating updates on the GPT-2-shaped
pytree of ``step_time.py`` and sums the duration of every XLA thunk over the runtime's
worker threads, grouped by what the thunk computes (from the compiled HLO):

- ``product m×n×r → m×r`` (sketches ``M̃ V``, thin ``Y W`` products), ``→ r×n``
  (projections ``Qᵀ M̃``), ``→ m×n`` (expansions ``U Σ Vᵀ``), ``small`` (r×r outputs);
- ``reduction`` (row/column sums of G², norms);
- ``elementwise`` passes, by number of m×n operands (e.g. the saliency update reads three);
- ``eigh`` / ``svd`` (the batched k×k linear algebra), and the rest.

Thread time is summed over the (here two) worker threads, so it exceeds the wall time
when both are busy. Prints a markdown table; nothing is written (``--keep-traces DIR``
keeps each profile and compiled HLO).

On a GPU or TPU it also prints, per optimizer, what the device did (:func:`device_summary`):
kernel time by kernel name, kernel launches and device-to-host copies per update, and the
device's busy time against the wall time (the rest is host work: launches, CUDA-graph
updates, conditionals). ``--apply`` profiles update + ``apply_updates`` with parameters and
state donated, as ``step_time.py --apply``.

Usage::

    .venv/bin/python benchmarks/profile_step.py                 # UMTAM default, lean, AdamW
    .venv/bin/python benchmarks/profile_step.py --only lean --blocks 12
    python3 benchmarks/profile_step.py --apply --keep-traces /tmp/traces   # on a GPU
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see step_time.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_INSTRUCTION = re.compile(r"^\s*%([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*?)\)(.*)$")


def _computations(hlo: str) -> dict[str, list[str]]:
    """Body lines of every computation of an HLO module text, by name."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            bodies[name].append(line)
    return bodies


def _dims(shape: str) -> tuple[int, ...]:
    inner = re.search(r"\[([\d,]*)\]", shape)
    if not inner or not inner.group(1):
        return ()
    return tuple(int(d) for d in inner.group(1).split(","))


def classify(hlo: str, rank: int) -> dict[str, str]:
    """Maps each instruction name of the entry computation (and of nested computations)
    to a category label."""
    bodies = _computations(hlo)
    instructions = [
        (line, match)
        for lines in bodies.values()
        for line in lines
        if (match := _INSTRUCTION.match(line))
    ]
    shapes = {match.group(1): _dims(match.group(2)) for _, match in instructions}
    labels = {}
    for line, match in instructions:
        name, shape, opcode, operands, rest = match.groups()
        dims = _dims(shape)
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = "\n".join(bodies.get(called.group(1), [])) if called else ""
        ops = set(re.findall(r"= \S+ (\w[\w\-]*)\(", body)) | {opcode}
        if opcode in ("custom-call",) or "eigh" in name or "svd" in name:
            labels[name] = (
                "eigh / svd / LAPACK" if re.search(r"eigh|svd|lapack|qr", line) else "custom call"
            )
        elif "dot" in ops or "convolution" in ops:
            if len(dims) == 2 and min(dims) > rank:
                labels[name] = "product → m×n (expansion)"
            elif len(dims) == 2 and dims[0] <= rank < dims[1]:
                labels[name] = "product → r×n (projection)"
            elif len(dims) >= 2 and dims[-1] <= rank < dims[-2]:
                labels[name] = "product → m×r (sketch, thin)"
            else:
                labels[name] = "product, small"
        elif "reduce" in ops and (len(dims) <= 1):
            labels[name] = "reduction"
        elif len(dims) == 2 and min(dims) > rank:
            names = re.findall(r"%([\w.\-]+)", operands)
            large = sum(1 for o in names if len(shapes.get(o, ())) == 2 and min(shapes[o]) > rank)
            labels[name] = f"elementwise m×n pass reading {large} m×n array(s)"
        else:
            labels[name] = "other (small)"
    return labels


def device_summary(data, steps: int, wall_ms: float, top: int = 25) -> str:
    """What an accelerator spent one update on, from a profile's device planes.

    Kernel time by kernel name (largest first), the number of kernels and of
    device-to-host copies per update, and how much of the wall time the device was busy
    (union of its kernel and copy intervals): on a GPU the gap is host work (launches,
    CUDA-graph updates, and waits at conditionals, whose predicates are read on the host).
    """
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    intervals, lines_seen = [], collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            events = list(line.events)
            lines_seen[f"{plane.name} / {line.name}"] += len(events)
            if not re.search(r"stream|memcpy", line.name, re.I) or "XLA" in line.name:
                continue
            for event in events:
                entry = by_name[event.name[:90]]
                entry[0] += 1
                entry[1] += event.duration_ns / 1e6
                intervals.append((event.start_ns, event.end_ns))
    busy, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    kernels = sum(n for n, _ in by_name.values()) / steps
    to_host = re.compile(r"memcpy.*(dtoh|d2h)", re.I)
    copies = sum(n for name, (n, _) in by_name.items() if to_host.search(name))
    out = [
        f"device busy {busy / 1e6 / steps:.2f} ms of {wall_ms:.2f} ms wall per update; "
        f"{kernels:.0f} kernels/copies per update, {copies / steps:.0f} device-to-host copies",
        "",
        "| kernel | per update | ms per update |",
        "|---|---|---|",
    ]
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    out += [f"| `{name}` | {n / steps:.1f} | {ms / steps:.3f} |" for name, (n, ms) in ranked]
    out += ["", "events per device line: " + ", ".join(f"{k}: {v}" for k, v in lines_seen.items())]
    return "\n".join(out)


def profile(
    opt, params, grads, *, steps: int = 10, keep: Path | None = None, apply: bool = False
) -> dict:
    """Milliseconds of thunk time per category and step, plus ``wall`` (and ``device``, a
    summary of accelerator kernels, off CPU)."""
    import time

    import jax
    from jax._src.lib import _profile_data
    from step_time import _update_step

    step, _ = _update_step(opt, params, grads, apply=apply)
    for _ in range(3):
        step()
    hlo = step.lower().compile().as_text()
    if keep is not None:
        keep.with_suffix(".hlo.txt").write_text(hlo)
    labels = classify(hlo, rank=64)
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        trace = next(Path(folder).rglob("*.xplane.pb"))
        data = _profile_data.ProfileData.from_file(str(trace))
        if keep is not None:
            keep.write_bytes(trace.read_bytes())
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            if "Eigen" not in line.name and "XLA" not in line.name:
                continue
            for event in line.events:
                base = event.name.removeprefix("end: ")
                if base.startswith(("ThunkExecutor", "SlinkyThreadPool")) or " " in base:
                    continue
                label = labels.get(base) or labels.get(re.sub(r"\.\d+$", "", base), "other")
                totals[label] += event.duration_ns / 1e6 / steps
    totals = dict(totals)
    totals["wall"] = wall * 1e3
    if jax.default_backend() != "cpu":
        totals["device"] = device_summary(data, steps, wall * 1e3)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--only", nargs="+", default=None, help="substrings of names to run")
    parser.add_argument("--apply", action="store_true", help="as step_time.py --apply")
    parser.add_argument("--keep-traces", type=Path, default=None, help="folder for the traces")
    args = parser.parse_args(argv)

    import jax
    import optax
    from _common import gpt2_params, like

    import umtam_jax

    params = jax.device_put(gpt2_params(args.blocks))
    grads = jax.device_put(like(params, seed=1))
    cases = {
        "optax.adamw": lambda: optax.adamw(1e-3),
        "umtam default": lambda: umtam_jax.umtam(1e-3),
        "umtam lean": lambda: umtam_jax.umtam(1e-3, error_decay=0.0, saliency="final"),
    }
    results = {}
    for name, factory in cases.items():
        if args.only and not any(o in name for o in args.only):
            continue
        keep = None
        if args.keep_traces is not None:
            args.keep_traces.mkdir(parents=True, exist_ok=True)
            keep = args.keep_traces / (re.sub(r"\W+", "_", name) + ".xplane.pb")
        results[name] = profile(factory(), params, grads, keep=keep, apply=args.apply)
        if "device" in results[name]:
            print(f"\n## {name}\n\n{results[name].pop('device')}\n")
    names = list(results)
    categories = sorted(
        {c for r in results.values() for c in r if c != "wall"},
        key=lambda c: -max(r.get(c, 0.0) for r in results.values()),
    )
    print(f"{args.blocks} blocks, thunk time per update summed over worker threads (ms)\n")
    print("| category | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for category in categories:
        cells = [f"{results[n].get(category, 0.0):.1f}" for n in names]
        print(f"| {category} | " + " | ".join(cells) + " |")
    total = [f"**{sum(v for k, v in results[n].items() if k != 'wall'):.1f}**" for n in names]
    print("| **all thunks** | " + " | ".join(total) + " |")
    print(
        "| wall time per update | " + " | ".join(f"{results[n]['wall']:.1f}" for n in names) + " |"
    )
    print(f"\nload average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
