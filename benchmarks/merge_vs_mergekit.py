"""umtam_jax against mergekit: TIES and task arithmetic on identical float32 tensors.

A base and 4 experts (``base + N(0, 1e-3)``) of GPT-2-like float32 leaves (seeded NumPy:
3 blocks at d = 768 plus (2048, 768) and (1024, 768) embeddings, 23,624,448 parameters per
model; ``--quick``: 2 blocks at d = 256, 1,973,248) are saved once as ``.npz``; then each
library merges them in a fresh subprocess (so its peak memory is its own):

- umtam_jax: ``merging.merge(method, base, experts, ...)`` on the dict of ``jax.Array`` leaves;
- mergekit, run by the interpreter of a separate environment with mergekit and torch,
  given as ``--mergekit-python`` or the ``MERGEKIT_PYTHON`` variable (skipped with a note
  otherwise): its tensor-level ``mergekit.merge_methods.merge_tensors(
  [base, *experts], method, parameters=..., base_index=0)`` per leaf, under ``no_grad``.

Methods: ``ties`` (density 0.2, weights 1, normalize true, lambda 1) and
``task_arithmetic`` (weights 1, lambda 1, normalize false). A worker converts the arrays
(untimed), runs one warm-up merge (umtam_jax: compilation), then times 3. Reported: median
(min/max) wall seconds, parameters of one model per second, mergekit's median over
umtam_jax's, peak RSS (``ru_maxrss``) after loading and at the end, and, from the saved
outputs, the max abs difference and the fraction of entries that differ at all. Equal
magnitudes at the TIES top-k boundary may be trimmed differently (mergekit's ``argsort`` is
unstable; umtam_jax keeps the lower flat index): the (expert, leaf) pairs with such a tie
are counted.

Usage::

    python -m benchmarks.merge_vs_mergekit [--quick] [--mergekit-python PYTHON]

(from the repository root; the mergekit worker runs there as well).

Writes ``benchmarks/results/merge_vs_mergekit.json`` (``--no-write``: print only) and prints
a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS_DIR, ROOT, environment, gpt2_params, markdown_table
from benchmarks._memory import maxrss_bytes
from benchmarks._records import write_results

EXPERTS = 4
DENSITY = 0.2
REPS = 3
METHODS = ("ties", "task_arithmetic")
HEADERS = (
    "method|library|median s (min–max)|params/s|peak RSS GiB (after load)|mergekit/umtam_jax"
    "|max abs diff|differing fraction"
)
SIZES = {"default": (3, 768, 1024, 2048), "quick": (2, 256, 512, 1024)}  # blocks, d, pos, vocab
UMTAM_OPTIONS = {"ties": {"density": DENSITY, "scaling": 1.0}, "task_arithmetic": {"scaling": 1.0}}
MERGEKIT_PARAMETERS = {
    "ties": {"density": DENSITY, "weight": 1.0, "normalize": True, "lambda": 1.0},
    "task_arithmetic": {"weight": 1.0, "lambda": 1.0, "normalize": False},
}


def build_models(size: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Base then experts, each a flat ``{dotted leaf name: float32 array}``."""
    blocks, d, positions, vocab = SIZES[size]
    rng = np.random.default_rng(seed + 1)
    base: dict[str, np.ndarray] = {
        "wte.embedding": rng.standard_normal((vocab, d), np.float32) * np.float32(0.02),
        "wpe.embedding": rng.standard_normal((positions, d), np.float32) * np.float32(0.01),
    }

    def flatten(tree: dict, prefix: str) -> None:
        for k, v in tree.items():
            if isinstance(v, dict):
                flatten(v, f"{prefix}{k}.")
            else:
                base[prefix + k] = v

    flatten(gpt2_params(blocks, d, seed=seed), "")
    models = [base]
    for t in range(EXPERTS):
        er = np.random.default_rng(seed + 100 + t)
        noise = {
            k: er.standard_normal(b.shape, np.float32) * np.float32(1e-3) for k, b in base.items()
        }
        models.append({k: b + noise[k] for k, b in base.items()})
    return models


def boundary_ties(models: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """``expert/leaf`` -> the k-th largest ``|w - w0|``, where the (k+1)-th is equal to it."""
    out = {}
    for t, expert in enumerate(models[1:]):
        for name, b in models[0].items():
            mag = np.sort(np.abs(expert[name] - b).ravel())[::-1]
            k = max(1, int(DENSITY * mag.size))
            if k < mag.size and mag[k - 1] == mag[k]:
                out[f"{t}/{name}"] = float(mag[k - 1])
    return out


def worker(framework: str, method: str, data: Path, out: Path) -> dict[str, Any]:
    """Loads the saved models, times ``method`` in ``framework``, saves its last output."""

    def load(convert):  # one leaf at a time, so no second copy of the models coexists
        models = []
        for name in ["base", *(f"expert{t}" for t in range(EXPERTS))]:
            with np.load(data / f"{name}.npz") as z:
                models.append({k: convert(z[k]) for k in z.files})
        return models[0], models[1:], list(models[0])

    if framework == "umtam_jax":
        import jax
        import jax.numpy as jnp

        from umtam_jax import merging

        base, experts, names = load(jnp.asarray)
        jax.block_until_ready((base, experts))
        opts = UMTAM_OPTIONS[method]

        def run():
            return jax.block_until_ready(merging.merge(method, base, experts, **opts))

        def to_numpy(r):
            return {k: np.asarray(r[k]) for k in names}

        versions = {"jax": jax.__version__, "backend": jax.default_backend()}
    else:
        from importlib.metadata import version

        import torch
        from mergekit.merge_methods import merge_tensors

        base, experts, names = load(torch.from_numpy)
        params = MERGEKIT_PARAMETERS[method]

        def run():
            with torch.no_grad():
                return {
                    k: merge_tensors(
                        [base[k], *(e[k] for e in experts)], method, parameters=params, base_index=0
                    )
                    for k in names
                }

        def to_numpy(r):
            return {k: r[k].numpy() for k in names}

        versions = {
            "torch": torch.__version__,
            "mergekit": version("mergekit"),
            "torch_threads": torch.get_num_threads(),
        }
    maxrss_loaded = maxrss_bytes()
    t0 = time.perf_counter()
    result = run()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(REPS):
        result = None
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    maxrss_end = maxrss_bytes()
    np.savez(out, **to_numpy(result))
    return {
        "framework": framework,
        "method": method,
        "python": sys.executable,
        **versions,
        "warmup_s": warmup,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "maxrss_loaded_bytes": maxrss_loaded,
        "maxrss_end_bytes": maxrss_end,
        "loadavg_end": list(os.getloadavg()),
    }


def run_worker(python: str, framework: str, method: str, data: Path, timeout: float) -> dict:
    out = data / f"out_{framework}_{method}.npz"
    cmd = [python, "-m", __spec__.name, "--worker", framework, method, str(data), str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"framework": framework, "method": method, "error": f"timed out ({timeout} s)"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"framework": framework, "method": method, "error": proc.stderr[-2000:]}
    return {**json.loads(lines[-1]), "output": out}


def compare(a_path: Path, b_path: Path, data: Path, ties: dict[str, float]) -> dict[str, Any]:
    """Max abs difference and differing entries between two saved outputs; of the latter,
    how many lie where some expert's ``|w - w0|`` equals its tied top-k threshold."""
    max_abs, differ, at_ties, total, leaves = 0.0, 0, 0, 0, []
    with np.load(a_path) as a, np.load(b_path) as b:
        for k in a.files:
            x, y = a[k], b[k]
            assert x.shape == y.shape and x.dtype == y.dtype == np.float32, k
            max_abs = max(max_abs, float(np.abs(x.astype(np.float64) - y).max()))
            differs, total = x != y, total + x.size
            if differs.any():
                with np.load(data / "base.npz") as z:
                    w0 = z[k]
                tied = np.zeros(x.shape, bool)
                for t in range(EXPERTS):
                    if f"{t}/{k}" in ties:
                        with np.load(data / f"expert{t}.npz") as z:
                            tied |= np.abs(z[k] - w0) == ties[f"{t}/{k}"]
                differ, at_ties = differ + int(differs.sum()), at_ties + int((differs & tied).sum())
                leaves.append(f"{k} ({int(differs.sum())})")
    return {
        "max_abs_diff": max_abs,
        "differing_entries": differ,
        "differing_fraction": differ / total,
        "differing_at_boundary_ties": at_ties,
        "differing_leaves": leaves,
    }


def mergekit_python(arg: str | None) -> tuple[str | None, str]:
    """The interpreter to run mergekit with, or None and why not."""
    path = arg or os.environ.get("MERGEKIT_PYTHON")
    if not path:
        return None, "no --mergekit-python and no MERGEKIT_PYTHON: mergekit skipped"
    probe = subprocess.run([path, "-c", "import mergekit, torch"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"{path} cannot import mergekit and torch: mergekit skipped"
    return path, ""


def _row(r: dict[str, Any], c: dict[str, Any] | None, n: int) -> list[str]:
    if "error" in r:
        return [r["method"], r["framework"], "error"] + [""] * 5
    gib = 2**30
    cells = [
        r["method"],
        r["framework"],
        f"{r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f})",
    ]
    cells += [f"{n / r['median_s'] / 1e6:.1f}M"]
    cells += [f"{r['maxrss_end_bytes'] / gib:.2f} ({r['maxrss_loaded_bytes'] / gib:.2f})"]
    if c is None or r["framework"] != "mergekit":
        return cells + [""] * 3
    ratio, diff, frac = c["ratio_mergekit_over_umtam"], c["max_abs_diff"], c["differing_fraction"]
    return cells + [f"{ratio:.2f}", f"{diff:.2e}", f"{frac:.2e}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2M parameters per model")
    parser.add_argument(
        "--mergekit-python", help="interpreter with mergekit and torch (default: $MERGEKIT_PYTHON)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per worker, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "merge_vs_mergekit.json")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        framework, method, data, out = args.worker
        print(json.dumps(worker(framework, method, Path(data), Path(out))), flush=True)
        return 0

    size = "quick" if args.quick else "default"
    mk_python, note = mergekit_python(args.mergekit_python)
    env = environment()
    with tempfile.TemporaryDirectory(prefix="merge_vs_mergekit_") as tmp:
        data = Path(tmp)
        models = build_models(size)
        n = sum(int(v.size) for v in models[0].values())
        ties_at_boundary = boundary_ties(models)
        for name, m in zip(["base", *(f"expert{t}" for t in range(EXPERTS))], models, strict=True):
            np.savez(data / f"{name}.npz", **m)
        del models
        print(f"{n:,} parameters per model, {EXPERTS} experts, saved in {data}", flush=True)
        results, comparisons = [], {}
        for method in METHODS:
            runs = [run_worker(sys.executable, "umtam_jax", method, data, args.timeout)]
            if mk_python:
                runs.append(run_worker(mk_python, "mergekit", method, data, args.timeout))
            outputs = [r.pop("output", None) for r in runs]
            if len(runs) == 2 and None not in outputs:
                comparisons[method] = compare(
                    *outputs, data, ties_at_boundary if method == "ties" else {}
                )
                comparisons[method]["ratio_mergekit_over_umtam"] = (
                    runs[1]["median_s"] / runs[0]["median_s"]
                )
            for r in runs:
                print(json.dumps({k: v for k, v in r.items() if k != "times_s"}), flush=True)
            results += runs

    rows = [_row(r, comparisons.get(r["method"]), n) for r in results]
    table = markdown_table(HEADERS.split("|"), rows)
    notes = [
        f"{n:,} float32 parameters per model, {EXPERTS} experts, median of {REPS} runs after "
        f"a warm-up, each library in its own subprocess. TIES density {DENSITY}.",
        f"(expert, leaf) pairs with equal magnitudes at the TIES top-k boundary: "
        f"{len(ties_at_boundary)}.",
    ]
    for method, c in comparisons.items():
        if c["differing_entries"]:
            notes.append(
                f"{method}: {c['differing_entries']} differing entries, "
                f"{c['differing_at_boundary_ties']} of them where an expert's |w - w0| equals "
                f"its tied top-k threshold; leaves: {', '.join(c['differing_leaves'])}."
            )
    if note:
        notes.append(note)
    markdown = table + "\n\n" + "\n".join(f"- {x}" for x in notes)
    print(markdown)
    for r in results:
        if r["framework"] == "mergekit" and "error" not in r:
            env["mergekit_worker"] = {k: r[k] for k in ("python", "torch", "mergekit")}
    payload = {
        "size": size,
        "param_count": n,
        "experts": EXPERTS,
        "umtam_options": UMTAM_OPTIONS,
        "mergekit_parameters": MERGEKIT_PARAMETERS,
        "ties_boundary_ties": ties_at_boundary,
        "results": results,
        "comparisons": comparisons,
        "notes": notes,
    }
    if not args.no_write:
        path = write_results(
            args.out.stem,
            payload,
            markdown,
            title="umtam_jax vs mergekit: TIES and task arithmetic, identical tensors",
            results_dir=args.out.parent,
            env=env,
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
