"""Peak host memory of out-of-core vs in-memory merging of umtam_jax checkpoints or
Hugging Face safetensors folders (``--format``).

Writes a base and K synthetic experts (GPT-2-medium-shaped float32 pytrees, d = 1024: 22
blocks plus a 32000 × 1024 embedding ≈ 310M parameters, 1.24 GB each; ``--quick``: 2
blocks plus 4096 × 1024 ≈ 29M) as Orbax checkpoints on disk, then runs ``umtam-merge`` on
them once per mode, each in a fresh subprocess that reports its own peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``streaming``: the default, out of core (``engine.merge_checkpoints``);
- ``in_memory``: ``umtam-merge --in-memory`` (restore base and experts whole, merge,
  save);
- ``floor``: a process that imports the same modules and runs one tiny merge (the
  interpreter + JAX + Orbax baseline, included in every other number).

Both merges must produce identical checkpoints (compared leaf by leaf at the end, with
partial restores). Target: streaming peak RSS ≤ 2 × one model's bytes.

Usage::

    python -m benchmarks.merge_memory            # 4 experts × ~310M params
    python -m benchmarks.merge_memory --quick    # 4 experts × ~29M params
    python -m benchmarks.merge_memory --scope global   # TIES with global trim
    python -m benchmarks.merge_memory --format safetensors  # HF folders
    python -m benchmarks.merge_memory --keep           # keep the checkpoints,
    python -m benchmarks.merge_memory --reuse DIR      # ... and measure again

The in-memory mode is skipped (and recorded as such) when ``MemAvailable`` is below about
(K + 4) model sizes + 1 GiB ((K + 8) for ``--scope global``), so as not to push a shared
machine into the OOM killer.

Writes ``benchmarks/results/merge_memory.json`` (``--no-write`` to skip; ``--quick``,
``--scope global``, ``--format safetensors`` and ``--vocab N`` add ``_quick``,
``_global``, ``_safetensors``, ``_vocabN`` to the name). The checkpoints go to a temporary
directory under ``--workdir`` (default: the system temporary directory), removed at the
end unless ``--keep``; the script stops first if that disk has less free space than the
run needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import ROOT
from benchmarks._memory import maxrss_bytes
from benchmarks._records import write_results

D = 1024


def model_shapes(quick: bool, vocab: int | None = None) -> dict[str, Any]:
    """Nested dict of leaf shapes (GPT-2-medium-like, d = 1024); ``vocab`` rows of the
    embedding (default 32000, 4096 with ``quick``)."""
    blocks, default_vocab = (2, 4096) if quick else (22, 32000)
    vocab = vocab or default_vocab

    def dense(i, o):
        return {"kernel": (i, o), "bias": (o,)}

    def norm():
        return {"scale": (D,), "bias": (D,)}

    shapes: dict[str, Any] = {"wte": {"embedding": (vocab, D)}, "ln_f": norm()}
    for b in range(blocks):
        shapes[f"h{b:02d}"] = {
            "ln_1": norm(),
            "attn": {"c_attn": dense(D, 3 * D), "c_proj": dense(D, D)},
            "ln_2": norm(),
            "mlp": {"c_fc": dense(D, 4 * D), "c_proj": dense(4 * D, D)},
        }
    return shapes


def _leaves(shapes: dict[str, Any]) -> list[tuple[int, ...]]:
    import jax

    return jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))


def n_params(shapes: dict[str, Any]) -> int:
    return sum(int(np.prod(s)) for s in _leaves(shapes))


# --------------------------------------------------------------------------- children


def child_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Writes base and experts one at a time (one model in memory)."""
    import jax

    from umtam_jax import checkpoint

    shapes = model_shapes(args.quick, args.vocab)
    rng = np.random.default_rng(0)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    base = jax.tree.map(
        lambda s: 0.02 * rng.standard_normal(s, np.float32), shapes, is_leaf=is_shape
    )
    work = Path(args.workdir)
    t0 = time.perf_counter()
    save = checkpoint.save_checkpoint
    if args.format == "safetensors":  # Hugging Face folders in 2 GB shards
        save = lambda path, tree: checkpoint.save_safetensors(path, tree, max_shard_size="2GB")  # noqa: E731
    save(work / "base", base)
    for i in range(args.experts):
        expert = jax.tree.map(lambda b: b + 1e-3 * rng.standard_normal(b.shape, np.float32), base)
        save(work / f"expert{i}", expert)
        del expert
    return {"setup_s": time.perf_counter() - t0}


def _cli_args(args: argparse.Namespace, output: str) -> list[str]:
    work = Path(args.workdir)
    cli = ["--method", args.method, "--base", str(work / "base"), "--no-progress"]
    for i in range(args.experts):
        cli += ["--expert", str(work / f"expert{i}")]
    cli += ["--param", f"density={args.density}", "--param", f"scope={args.scope}"]
    return [*cli, "-o", output]


def child_merge(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    from umtam_jax.cli.merge import main

    cli = _cli_args(args, str(Path(args.workdir) / f"out_{mode}"))
    if mode == "in_memory":
        cli.append("--in-memory")
    t0 = time.perf_counter()
    rc = main(cli)
    if rc != 0:
        raise SystemExit(f"umtam-merge failed with status {rc}")
    return {"wall_s": time.perf_counter() - t0}


def child_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The same imports and one tiny merge: the process's fixed cost."""
    import jax.numpy as jnp

    from umtam_jax import checkpoint, engine, merging  # noqa: F401
    from umtam_jax.cli import merge  # noqa: F401

    base = {"w": jnp.zeros((8, 8))}
    merging.ties(base, [{"w": jnp.ones((8, 8))}], density=0.5)
    return {}


def child_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Leaf-by-leaf comparison of the two outputs (partial restores, little memory)."""
    from umtam_jax import checkpoint

    work = Path(args.workdir)
    if args.format == "safetensors":
        a = checkpoint.SafetensorsReader(work / "out_streaming")
        b = checkpoint.SafetensorsReader(work / "out_in_memory")
        paths = list(a.names)
        assert sorted(paths) == sorted(b.names)
        read = lambda r, p: r.read([p])[0]  # noqa: E731
    else:
        a = checkpoint.CheckpointReader(work / "out_streaming")
        b = checkpoint.CheckpointReader(work / "out_in_memory")
        paths = a.leaf_paths("params")
        assert paths == b.leaf_paths("params")
        read = lambda r, p: r.restore_arrays("params", [p])[0]  # noqa: E731
    differing = 0
    for p in paths:
        x, y = read(a, p), read(b, p)
        if x.dtype != y.dtype or not np.array_equal(x, y):
            differing += 1
    return {"leaves": len(paths), "differing_leaves": differing}


def run_child(args: argparse.Namespace, role: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", __spec__.name, "--child", role, "--workdir", args.workdir]
    cmd += ["--experts", str(args.experts), "--method", args.method]
    cmd += ["--density", str(args.density), "--scope", args.scope, "--format", args.format]
    if args.quick:
        cmd.append("--quick")
    if args.vocab:
        cmd += ["--vocab", str(args.vocab)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"child {role!r} failed with status {res.returncode}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- main


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~29M-parameter models")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="embedding rows (default 32000: a 131 MB embedding, 11%% of the model; 151936, "
        "Qwen2's, makes it 36%%, as in LLMs, where the largest tensor sets the peak)",
    )
    p.add_argument("--method", default="ties", choices=["ties", "task_arithmetic"])
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--scope", default="tensor", choices=["tensor", "global"])
    p.add_argument(
        "--format",
        default="orbax",
        choices=["orbax", "safetensors"],
        help="inputs and output as umtam_jax checkpoints or Hugging Face safetensors folders",
    )
    p.add_argument("--workdir", default=None, help="where the checkpoints are written")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument(
        "--reuse", default=None, help="checkpoints kept by an earlier --keep run (same sizes)"
    )
    p.add_argument("--no-write", action="store_true", help="do not write the result file")
    p.add_argument(
        "--skip-in-memory",
        default=None,
        metavar="REASON",
        help="measure the streaming mode only, recording REASON for the in-memory mode",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.method == "task_arithmetic":
        args.scope = "tensor"

    if args.child is not None:
        role = args.child
        if role == "setup":
            out = child_setup(args)
        elif role == "floor":
            out = child_floor(args)
        elif role == "compare":
            out = child_compare(args)
        else:
            out = child_merge(args, role)
        out["maxrss_bytes"] = maxrss_bytes()
        print(json.dumps(out))
        return 0

    shapes = model_shapes(args.quick, args.vocab)
    n = n_params(shapes)
    model_bytes = 4 * n
    k = args.experts
    config = {"parameters": n, "experts": k, "format": args.format}
    if args.reuse is not None:
        work = Path(args.reuse)
        try:
            saved = json.loads((work / "config.json").read_text())
        except OSError:
            saved = None
        if saved != config:
            raise SystemExit(f"{work} holds no checkpoints of this size ({saved} != {config})")
        for mode in ("streaming", "in_memory"):
            shutil.rmtree(work / f"out_{mode}", ignore_errors=True)
        args.keep = True
    else:
        parent = Path(args.workdir or tempfile.gettempdir())
        need_disk = int((k + 3) * model_bytes * 1.1)
        free = shutil.disk_usage(parent).free
        if free < need_disk:
            raise SystemExit(
                f"{parent} has {free / 1e9:.1f} GB free; this run needs about "
                f"{need_disk / 1e9:.1f} GB (use --quick, fewer --experts or another --workdir)"
            )
        work = Path(tempfile.mkdtemp(prefix="umtam_merge_memory_", dir=parent))
    args.workdir = str(work.resolve())  # the children run in the repository root
    gb = 1e9
    print(
        f"{n / 1e6:.1f}M parameters ({model_bytes / gb:.2f} GB float32) per model, "
        f"{k} experts, {args.method} density={args.density} scope={args.scope}; "
        f"checkpoints in {work}",
        flush=True,
    )
    try:
        if args.reuse is None:
            setup = run_child(args, "setup")
            (work / "config.json").write_text(json.dumps(config))
            print(f"setup: {setup['setup_s']:.0f} s", flush=True)
        rows: dict[str, Any] = {"floor": run_child(args, "floor")}
        rows["streaming"] = run_child(args, "streaming")
        print(f"streaming: {rows['streaming']['maxrss_bytes'] / gb:.2f} GB", flush=True)
        available = _mem_available()
        # Measured (tensor scope): the in-memory path peaks near floor + (K + 3.5) models;
        # the global trim concatenates an expert's scores, keys and masks on top.
        need = (k + 4 + (4 if args.scope == "global" else 0)) * model_bytes + 2**30
        if args.skip_in_memory is not None:
            rows["in_memory"] = {"skipped": args.skip_in_memory}
        elif available is not None and available < need:
            rows["in_memory"] = {
                "skipped": f"MemAvailable {available / gb:.1f} GB < {need / gb:.1f} GB needed"
            }
        else:
            rows["in_memory"] = run_child(args, "in_memory")
            print(f"in memory: {rows['in_memory']['maxrss_bytes'] / gb:.2f} GB", flush=True)
            rows["comparison"] = run_child(args, "compare")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"checkpoints kept in {work}", flush=True)

    for name in ("floor", "streaming", "in_memory"):
        r = rows[name]
        if "maxrss_bytes" in r:
            r["maxrss_gb"] = r["maxrss_bytes"] / gb
            r["maxrss_over_model"] = r["maxrss_bytes"] / model_bytes
    streaming_ratio = rows["streaming"]["maxrss_over_model"]
    largest, compared = 4 * max(int(np.prod(s)) for s in _leaves(shapes)), rows.get("comparison")
    payload = {
        "quick": args.quick,
        "parameters_per_model": n,
        "model_bytes": model_bytes,
        "experts": k,
        "method": args.method,
        "density": args.density,
        "scope": args.scope,
        "format": args.format,
        "leaves_per_model": len(_leaves(shapes)),
        "largest_leaf_bytes": largest,
        # What the merge holds above the process's floor, in units of its largest tensor
        # (all inputs' copies of it, the output's, the method's temporaries).
        "streaming_above_floor_over_largest_leaf": (
            rows["streaming"]["maxrss_bytes"] - rows["floor"]["maxrss_bytes"]
        )
        / largest,
        "modes": rows,
        "target": "streaming peak RSS <= 2 x model bytes",
        # The target is for the ~300M-parameter run; at --quick size the process's fixed
        # cost (interpreter, JAX, Orbax, compiled kernels) alone exceeds 2 models.
        "target_met": None if args.quick else streaming_ratio <= 2.0,
        "identical_outputs": None if compared is None else compared["differing_leaves"] == 0,
        "available_memory_bytes_before_in_memory": _mem_available(),
    }
    lines = [
        f"{args.method} (density {args.density}, scope {args.scope}) of {k} experts of "
        f"{n / 1e6:.1f}M float32 parameters ({model_bytes / gb:.2f} GB per model, {args.format}, "
        f"{payload['leaves_per_model']} leaves, largest {payload['largest_leaf_bytes'] / 1e6:.0f}"
        " MB) through `umtam-merge`; peak RSS of a fresh process per mode.",
        "",
        "| mode | peak RSS (GB) | ÷ model bytes | wall (s) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("floor", "streaming", "in_memory"):
        r = rows[name]
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | |")
            continue
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else ""
        lines.append(f"| {name} | {r['maxrss_gb']:.2f} | {r['maxrss_over_model']:.2f} | {wall} |")
    lines += [
        "",
        "Target streaming ≤ 2 × model bytes (for ~300M parameters): "
        + {True: "met", False: "MISSED", None: "not applicable at --quick size"}[
            payload["target_met"]
        ]
        + f" ({streaming_ratio:.2f}×). Outputs identical: {payload['identical_outputs']}.",
        "Above the floor the merge held "
        f"{payload['streaming_above_floor_over_largest_leaf']:.1f} × its largest tensor.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        name = "merge_memory_quick" if args.quick else "merge_memory"
        name += ("_global" if args.scope == "global" else "") + (
            "_safetensors" if args.format == "safetensors" else ""
        )
        if args.vocab:
            name += f"_vocab{args.vocab}"
        path = write_results(name, payload, table, title=f"Merge peak memory ({name})")
        print(f"wrote {path}")
    return 1 if payload["target_met"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
