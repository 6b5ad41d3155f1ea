"""What one optimizer step compiles to on an NVIDIA H100, measured without a GPU.

XLA compiles for a GPU it is only described to (JAX's deviceless ahead-of-time
compilation: :func:`jax.experimental.topologies.get_topology_desc` with a target
description of the chip). This benchmark compiles the optimizer part of a training step,
update + ``apply_updates`` with parameters and state donated (as ``step_time.py --apply``
times it), on the GPT-2-shaped pytree, and reads the optimized program:

- ``kernels``, ``loops``, ``conditionals``: what one call launches
  (:func:`benchmarks._hlo.executable_ops`);
- ``bytes``: the device memory the kernels read and write, each kernel counted as its
  operands (the slices of those it only slices) plus its results (an upper bound on DRAM
  traffic: caches are ignored; kernels inside a conditional or a loop are not counted,
  and the default UMTAM step has none);
- ``floor``: the bytes no implementation can avoid, the step's inputs read once and its
  changed outputs written once;
- ``gflop``: the floating-point work of its matrix products.

A step whose kernels each stream their operands once runs in about ``bytes`` divided by
the memory bandwidth, so the ratio of ``bytes`` to AdamW's is what a bandwidth-bound
GPU step costs at best; time on a device (``step_time.py`` there) adds launch costs and
slow kernels, which this does not see. Without autotuning XLA keeps its default kernel
choices, so the products' implementations may differ from a GPU-compiled program.

Needs JAX's CUDA plugin (``pip install "jax[cuda13]==<installed jax version>"``), not a
GPU. Usage::

    python -m benchmarks.gpu_plan                     # scanned GPT-2 body, 12 blocks
    python -m benchmarks.gpu_plan --per-layer --blocks 4  # one leaf per layer
    python -m benchmarks.gpu_plan --quick                 # 2 blocks, AdamW and UMTAM

Writes ``benchmarks/results/gpu_plan.json`` (``--out`` to change, ``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks._common import RESULTS_DIR, environment, gpt2_params, markdown_table
from benchmarks._hlo import NO_KERNEL, executable_ops
from benchmarks._records import write_results
from benchmarks.step_time import apply_step, optimizers, scanned_params

# The fields XLA reads from an H100 SXM (80 GB HBM3), as ``jax.lib.xla_client.
# get_topology_for_devices(jax.devices()).target_config`` prints them on one.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 13 minor: 0 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
COMPARED = ("optax.adamw", "optax.adafactor", "umtam default", "umtam lean")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}
_BYTES |= {"f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_LINE = re.compile(r"^\s*(?:ROOT )?%([^\s=]+) = (.*?) ([a-z][a-z0-9-]*)\((.*?)\)(?:, |$)")
_DOT = re.compile(r"= (\w+)\[([\d,]*)\]\S* dot\(%([^\s,)]+), .*?lhs_contracting_dims=\{([\d,]*)\}")


def _array_bytes(shape_text: str) -> int:
    """Bytes of every array type named in ``shape_text`` (a shape or a tuple of shapes)."""
    return sum(
        _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(shape_text)
    )


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Lines of each computation of an HLO module, by name (the entry's as ``ENTRY``)."""
    comps: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY )?%?([^\s(]+) \(", line)
        if head and line.rstrip().endswith("{"):
            current = comps.setdefault("ENTRY" if head.group(1) else head.group(2), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(re.sub(r"/\*.*?\*/", "", line))  # /*index=5*/ in long tuples
    return comps


def _dot_flops(comps: dict[str, list[str]], name: str) -> int:
    """Floating-point operations of the products in computation ``name`` and those it calls."""
    lines = comps.get(name, [])
    shapes = {m.group(1): m.group(2) for m in map(_LINE.match, lines) if m}
    flops = 0
    for line in lines:
        dot = _DOT.search(line)
        if dot:
            lhs_dims = re.search(r"\[([\d,]*)\]", shapes.get(dot.group(3), "[]")).group(1)
            lhs = [int(d) for d in lhs_dims.split(",") if d]
            k = math.prod(lhs[int(i)] for i in dot.group(4).split(",") if i)
            flops += 2 * k * math.prod(int(d) for d in dot.group(2).split(",") if d)
        for called in re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", line):
            flops += _dot_flops(comps, called)
    return flops


def _sliced_parameters(lines: list[str]) -> dict[int, int]:
    """Bytes a fused computation reads of each parameter that it only slices (the slices'
    sizes), by parameter number; the other parameters are read whole."""
    numbers = {}
    for m in map(_LINE.match, lines):
        if m and m.group(3) == "parameter":
            numbers[m.group(1)] = int(re.search(r"parameter\((\d+)\)", m.group(0)).group(1))
    reads: dict[str, int] = {}
    whole: set[str] = set()
    for m in map(_LINE.match, lines):
        if not m or m.group(3) == "parameter":
            continue
        for used in re.findall(r"%([^\s,)]+)", m.group(4)):
            if used in numbers and m.group(3) == "slice":
                reads[used] = reads.get(used, 0) + _array_bytes(m.group(2))
            elif used in numbers:
                whole.add(used)
    return {numbers[p]: size for p, size in reads.items() if p not in whole}


def _entry_kernels(hlo_text: str) -> tuple[list[tuple[str, int, int]], int]:
    """Each kernel of the entry computation as ``(instruction line, bytes, flops)`` (see
    :func:`kernel_traffic`), and the floor."""
    comps = _computations(hlo_text)
    shapes: dict[str, str] = {}
    kernels = []
    params, root = [], ""
    for line in comps.get("ENTRY", []):
        m = _LINE.match(line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        shapes[name] = shape
        if op == "parameter":
            params.append(name)
        if line.lstrip().startswith("ROOT "):
            root = operands if op == "tuple" else f"%{name}"
        if op in NO_KERNEL or op in ("conditional", "while"):
            continue  # control flow: its operands are passed, not read
        named = re.findall(r"%([^\s,)]+)", operands)
        called = re.search(r"calls=%([\w.\-]+)", line)
        sliced = _sliced_parameters(comps.get(called.group(1), [])) if called else {}
        moved = _array_bytes(shape) + sum(
            sliced.get(i, _array_bytes(shapes.get(o, ""))) for i, o in enumerate(named)
        )
        flops = sum(
            _dot_flops(comps, c) for c in re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", line)
        )
        kernels.append((line, moved, flops))
    written = [o for o in re.findall(r"%([^\s,)]+)", root) if o in shapes and o not in params]
    floor = sum(_array_bytes(shapes[p]) for p in params) + sum(
        _array_bytes(shapes[o]) for o in written
    )
    return kernels, floor


def kernel_traffic(hlo_text: str) -> dict[str, int]:
    """Bytes moved and products' work of one call of a compiled executable, from its
    optimized HLO text (any backend).

    Args:
        hlo_text: ``jax.jit(f).lower(...).compile().as_text()``.

    Returns:
        ``bytes``: each kernel of the entry computation, its operands plus its results
        (of an operand the kernel only slices, the slices; the kernels inside
        conditionals and loops are not counted); ``floor``: the entry's parameters plus
        its results that are not a parameter passed through; ``flops``: of every
        ``dot``, inside fusions too.

    Example:
        >>> text = jax.jit(lambda x: 2 * x + 1).lower(jnp.ones(256)).compile().as_text()
        >>> kernel_traffic(text)
        {'bytes': 2048, 'floor': 2048, 'flops': 0}
    """
    kernels, floor = _entry_kernels(hlo_text)
    return {
        "bytes": sum(k[1] for k in kernels),
        "floor": floor,
        "flops": sum(k[2] for k in kernels),
    }


def _source_lines(hlo_text: str) -> dict[str, list[str]]:
    """Stack frame id → its call stack as ``file:line (function)``, innermost first, from
    the module's ``FileNames`` / ``FunctionNames`` / ``FileLocations`` / ``StackFrames``
    tables."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            current = None
        elif current is not None:
            key, _, value = line.partition(" ")
            current[key] = value
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    functions = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    places = {}
    for key, value in tables.get("FileLocations", {}).items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        file = files.get(fields.get("file_name_id", ""), "?")
        function = functions.get(fields.get("function_name_id", ""), "?")
        places[key] = f"{file}:{fields.get('line', '?')} ({function})"
    stacks: dict[str, list[str]] = {}
    frames = {
        k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables.get("StackFrames", {}).items()
    }
    for key in frames:
        stack, frame, seen = [], key, set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            stack.append(places.get(frames[frame].get("file_location_id", ""), "?"))
            frame = frames[frame].get("parent_frame_id", "")
        stacks[key] = stack
    return stacks


def kernel_sources(hlo_text: str, package: str = "umtam_jax", top: int = 12) -> list[dict]:
    """The source lines whose kernels move the most bytes, from the stack recorded with
    each kernel of the entry computation: the innermost frame in ``package`` (else the
    innermost frame), with ``kernels`` and ``bytes`` summed over its kernels. A fusion
    counts where its root instruction came from, with all the bytes it moves.

    Example:
        >>> text = jax.jit(lambda x: 2 * x + 1).lower(jnp.ones(256)).compile().as_text()
        >>> [(s["kernels"], s["bytes"]) for s in kernel_sources(text, package="nothing")]
        [(1, 2048)]
    """
    stacks = _source_lines(hlo_text)
    totals: dict[str, dict] = {}
    for line, moved, _ in _entry_kernels(hlo_text)[0]:
        frame = re.search(r"stack_frame_id=(\d+)", line)
        stack = stacks.get(frame.group(1), []) if frame else []
        mine = [place for place in stack if f"/{package}/" in place]
        source = (mine or stack or ["(no source recorded)"])[0]
        for root in (f"/{package}/", "/site-packages/"):
            source = source.split(root, 1)[-1]
        entry = totals.setdefault(source, {"source": source, "kernels": 0, "bytes": 0})
        entry["kernels"] += 1
        entry["bytes"] += moved
    return sorted(totals.values(), key=lambda e: -e["bytes"])[:top]


def _plugin_version() -> str | None:
    """The installed version of JAX's CUDA plugin (``jax-cuda13-plugin`` or the CUDA 12 one)."""
    from importlib import metadata

    for name in ("jax-cuda13-plugin", "jax-cuda12-plugin"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def h100_sharding() -> jax.sharding.Sharding:
    """A sharding on one H100 described to XLA (no device needed); a clear error without
    JAX's CUDA plugin."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            "h100", "cuda", target_config=H100_TARGET, topology="1x1x1"
        )
    except Exception as e:  # the plugin is absent or cannot describe a GPU
        raise SystemExit(
            f"gpu_plan: cannot compile for an H100 without JAX's CUDA plugin ({e}); install "
            f'it with: pip install "jax[cuda13]=={jax.__version__}"'
        ) from None
    return jax.sharding.SingleDeviceSharding(topology.devices[0])


def plan(opt: optax.GradientTransformation, params: Any, sharding: jax.sharding.Sharding) -> dict:
    """Compiles update + ``apply_updates`` (parameters and state donated: the step
    ``step_time.py --apply`` times, :func:`benchmarks.step_time.apply_step`) for
    ``sharding``'s device and reads the program: :func:`executable_ops`,
    :func:`kernel_traffic` and, in ``sources``, :func:`kernel_sources`."""

    def placed(tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
        )

    state = placed(jax.eval_shape(opt.init, params))
    lowered = apply_step(opt).lower(placed(params), state, placed(params))
    text = lowered.compile().as_text()
    return {**executable_ops(text), **kernel_traffic(text), "sources": kernel_sources(text)}


def run(blocks: int, *, scanned: bool, names: tuple[str, ...] = COMPARED) -> dict[str, Any]:
    """:func:`plan` of each optimizer in ``names`` on the GPT-2 body of ``blocks`` blocks."""
    sharding = h100_sharding()
    shaped = scanned_params(blocks) if scanned else gpt2_params(blocks)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), shaped)
    factories = optimizers(exact=False, extra=True, scanned=scanned)
    rows = {}
    for name in names:
        rows[name] = plan(factories[name](), params, sharding)
        print(f"[gpu_plan] {name}: {rows[name]}", flush=True)
    base = rows.get("optax.adamw")
    for row in rows.values():
        row["bytes_over_adamw"] = row["bytes"] / base["bytes"] if base else None
        row["ms_at_bandwidth"] = 1e3 * row["bytes"] / BANDWIDTH
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return {"blocks": blocks, "scanned": scanned, "parameters": n_params, "rows": rows}


def table(result: dict[str, Any]) -> str:
    """The markdown summary of :func:`run`'s result."""
    rows = [
        [
            name,
            f"{r['kernels']} / {r['loops']} / {r['conditionals']}",
            f"{r['bytes'] / 1e9:.2f}",
            f"{r['floor'] / 1e9:.2f}",
            f"{r['bytes_over_adamw']:.2f}×" if r["bytes_over_adamw"] else "—",
            f"{r['ms_at_bandwidth']:.2f}",
            f"{r['flops'] / 1e9:.1f}",
        ]
        for name, r in result["rows"].items()
    ]
    headers = ["optimizer", "kernels / loops / conds", "GB moved", "GB floor", "× AdamW"]
    headers += ["ms at 3.35 TB/s", "GFLOP"]
    layout = "layer-stacked" if result["scanned"] else "one leaf per layer"
    head = f"GPT-2 body, {result['blocks']} blocks ({layout}, {result['parameters'] / 1e6:.1f}M)"
    text = f"{head}, compiled for an H100 without a device:\n\n" + markdown_table(headers, rows)
    default = result["rows"].get("umtam default")
    if default and default.get("sources"):
        where = [[s["source"], s["kernels"], f"{s['bytes'] / 1e9:.2f}"] for s in default["sources"]]
        text += "\n\nWhere UMTAM default's bytes go (each kernel at the innermost `umtam_jax` "
        text += "line of its stack, else its innermost line; a fusion at its root's line):\n\n"
        text += markdown_table(["source", "kernels", "GB"], where)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--per-layer", action="store_true", help="one leaf per layer, not stacked")
    ap.add_argument("--only", nargs="+", default=list(COMPARED), choices=list(optimizers()))
    ap.add_argument("--quick", action="store_true", help="2 blocks, AdamW and UMTAM default")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_plan.json")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")  # the GPU is described, never opened
    env = environment()
    if args.quick:
        args.blocks, args.only, args.no_write = 2, ["optax.adamw", "umtam default"], True
    result = run(args.blocks, scanned=not args.per_layer, names=tuple(args.only))
    env["compiled_for"] = "NVIDIA H100 80GB HBM3 (described; no device)"
    env["cuda_plugin"] = _plugin_version()
    text = table(result)
    print(text)
    if not args.no_write:
        write_results(
            args.out.stem,
            result,
            text,
            title="GPU step plan (H100, compiled without a device)",
            results_dir=args.out.parent,
            env=env,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
