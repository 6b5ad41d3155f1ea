"""Design study: fused CPU kernels for UMTAM's update through the XLA FFI (not adopted).

Builds ``kernels.cc`` (three AVX-512 custom calls, see its header) with the system C++
compiler against jaxlib's FFI headers, checks each kernel against a float64 NumPy
reference on shapes with ragged tails, and times each against the XLA ops it would
replace on the 16 factored leaves of ``benchmarks/step_time.py``'s 4-block GPT-2 pytree
(rank 32, jitted, interleaved, median of ``--reps``). It runs with glibc keeping freed
memory (``step_time.KEEP_FREED_MEMORY``), as ``step_time.py --keep-freed-memory`` does.
Prints a markdown table; nothing is written. Results and the in-step measurement (made
with ``in_step.patch``): ``benchmarks/PERFORMANCE.md``, "Fused CPU kernels through the
XLA FFI".

Usage::

    .venv/bin/python benchmarks/design_fused_kernels/run.py
    .venv/bin/python benchmarks/design_fused_kernels/run.py --library /tmp/umtam_kernels.so
        # only builds the library (for in_step.patch, which reads UMTAM_FUSED_LIB)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


NAMES = (
    "ExpandPrecondition",
    "BuildSketch",
    "TransposedProduct",
    "SquareSums",
    "SquareSumsSketch",
    "ExpandPreconditionSaliency",
)
"""The custom calls of ``kernels.cc``, registered as ``umtam_<name>``."""


def cpu_supported() -> bool:
    """Whether this CPU has the instruction sets ``kernels.cc`` is compiled for."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    flags = set(cpuinfo.read_text().split())
    return {"avx512f", "avx512dq", "fma"} <= flags


def build(library: Path) -> Path:
    """Compiles ``kernels.cc`` into the shared library ``library``."""
    import jax

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise SystemExit("no C++ compiler found (set CXX)")
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wno-psabi"]
    command += ["-isystem", jax.ffi.include_dir(), str(HERE / "kernels.cc"), "-o", str(library)]
    subprocess.run(command, check=True)
    return library


def register(library: Path) -> None:
    import jax

    lib = ctypes.cdll.LoadLibrary(str(library))
    for name in NAMES:
        jax.ffi.register_ffi_target(
            f"umtam_{name}", jax.ffi.pycapsule(getattr(lib, name)), platform="cpu"
        )


def kernels():
    """``name → (fused, xla, reference, make_inputs, in_place)`` for the three kernels."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    f32 = jnp.float32

    def expand_fused(a, vt, row, col, eps):
        out = jax.ShapeDtypeStruct((a.shape[0], vt.shape[1]), f32)
        return jax.ffi.ffi_call("umtam_ExpandPrecondition", out)(a, vt, row, col, eps)

    def expand_xla(a, vt, row, col, eps):
        return (a @ vt) * jax.lax.rsqrt(row[:, None] * col[None, :] + eps)

    def expand_reference(a, vt, row, col, eps):
        return (a @ vt) / np.sqrt(row[:, None] * col[None, :] + eps)

    def expand_inputs(rng, m, n, r):
        return (
            rng.standard_normal((m, r)),
            rng.standard_normal((r, n)),
            rng.random(m) * 1e-6,
            rng.random(n),
            np.asarray(1e-8),
        )

    def sketch_fused(prev, g, v, coef):
        shapes = (
            jax.ShapeDtypeStruct(prev.shape, f32),
            jax.ShapeDtypeStruct((prev.shape[0], v.shape[1]), f32),
        )
        return jax.ffi.ffi_call("umtam_BuildSketch", shapes, input_output_aliases={0: 0})(
            prev, g, v, coef
        )

    def sketch_xla(prev, g, v, coef):
        momentum = coef[0] * prev + (coef[1] * g) * coef[2]
        return momentum, momentum @ v

    def sketch_reference(prev, g, v, coef):
        momentum = coef[0] * prev + coef[1] * coef[2] * g
        return momentum, momentum @ v

    def sketch_inputs(rng, m, n, r):
        r = 16 if r <= 16 else 32
        return (
            rng.standard_normal((m, n)),
            rng.standard_normal((m, n)),
            rng.standard_normal((n, r)),
            np.asarray([0.9, 0.1, 0.5]),
        )

    def tn_fused(q, a):
        return jax.ffi.ffi_call(
            "umtam_TransposedProduct", jax.ShapeDtypeStruct((q.shape[1], a.shape[1]), f32)
        )(q, a)

    def tn_xla(q, a):  # as umtam_jax.optimizer._lowrank._tn
        return jax.lax.optimization_barrier(q.T) @ a

    def tn_reference(q, a):
        return q.T @ a

    def tn_inputs(rng, m, n, r):
        return rng.standard_normal((m, r)), rng.standard_normal((m, n))

    def chunk_count(m):
        return -(-m // 48)  # kernels.cc's kRowsPerChunk

    def sums_fused(g):
        m, n = g.shape
        shapes = (jax.ShapeDtypeStruct((m,), f32), jax.ShapeDtypeStruct((chunk_count(m), n), f32))
        rows, cols = jax.ffi.ffi_call("umtam_SquareSums", shapes)(g)
        return rows, jnp.sum(cols, axis=0)

    def sums_xla(g):  # as umtam_jax.optimizer._transform._clipped_square_sums
        rows = jnp.sum(jnp.square(g), axis=1)
        return rows, jnp.sum(jnp.square(jax.lax.optimization_barrier(g)), axis=0)

    def sums_reference(g):
        return np.sum(g * g, axis=1), np.sum(g * g, axis=0)

    def sums_inputs(rng, m, n, r):
        return (rng.standard_normal((m, n)),)

    def sums_sketch_fused(g, v):
        m, n = g.shape
        shapes = (
            jax.ShapeDtypeStruct((m,), f32),
            jax.ShapeDtypeStruct((chunk_count(m), n), f32),
            jax.ShapeDtypeStruct((m, v.shape[1]), f32),
        )
        rows, cols, y = jax.ffi.ffi_call("umtam_SquareSumsSketch", shapes)(g, v)
        return rows, jnp.sum(cols, axis=0), y

    def sums_sketch_xla(g, v):
        return (*sums_xla(g), g @ v)

    def sums_sketch_reference(g, v):
        return (*sums_reference(g), g @ v)

    def sums_sketch_inputs(rng, m, n, r):
        return rng.standard_normal((m, n)), rng.standard_normal((n, 16 if r <= 16 else 32))

    def saliency_fused(s, a, vt, row, col, eps, w, w0, sr, sc, alpha):
        shapes = (jax.ShapeDtypeStruct(s.shape, f32), jax.ShapeDtypeStruct(s.shape, f32))
        out, s = jax.ffi.ffi_call(
            "umtam_ExpandPreconditionSaliency", shapes, input_output_aliases={5: 1}
        )(a, vt, row, col, eps, s, w, w0, sr, sc, alpha)
        return s, out

    def saliency_xla(s, a, vt, row, col, eps, w, w0, sr, sc, alpha):
        fresh = jnp.square(w - w0) * (sr[:, None] * sc[None, :])
        return alpha * s + (1 - alpha) * fresh, expand_xla(a, vt, row, col, eps)

    def saliency_reference(s, a, vt, row, col, eps, w, w0, sr, sc, alpha):
        fresh = (w - w0) ** 2 * np.outer(sr, sc)
        return alpha * s + (1 - alpha) * fresh, expand_reference(a, vt, row, col, eps)

    def saliency_inputs(rng, m, n, r):
        return (
            rng.random((m, n)),
            *expand_inputs(rng, m, n, r),
            rng.standard_normal((m, n)),
            rng.standard_normal((m, n)),
            rng.random(m),
            rng.random(n),
            np.asarray(0.9),
        )

    return {
        "expand U Σ Vᵀ + precondition (step 8)": (
            expand_fused,
            expand_xla,
            expand_reference,
            expand_inputs,
            False,
        ),
        "build M̃ + sketch M̃ V": (sketch_fused, sketch_xla, sketch_reference, sketch_inputs, True),
        "projection Qᵀ M̃": (tn_fused, tn_xla, tn_reference, tn_inputs, False),
        "row and column sums of G² (step 5)": (
            sums_fused,
            sums_xla,
            sums_reference,
            sums_inputs,
            False,
        ),
        "sums of G² + sketch G V (no error feedback)": (
            sums_sketch_fused,
            sums_sketch_xla,
            sums_sketch_reference,
            sums_sketch_inputs,
            False,
        ),
        "step 8 + saliency update (step 9)": (
            saliency_fused,
            saliency_xla,
            saliency_reference,
            saliency_inputs,
            True,
        ),
    }


def check(name, fused, reference, make_inputs) -> float:
    """Largest error of the kernel against the float64 reference, relative to its largest entry."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    worst = 0.0
    rng = np.random.default_rng(0)
    for m, n, r in [(13, 77, 13), (50, 130, 16), (97, 200, 32), (768, 768, 32)]:
        inputs = make_inputs(rng, m, n, r)
        want = jax.tree.leaves(reference(*inputs))
        got = jax.tree.leaves(jax.jit(fused)(*[jnp.asarray(x, jnp.float32) for x in inputs]))
        for w, g in zip(want, got, strict=True):
            error = float(np.max(np.abs(np.asarray(g, np.float64) - w)) / np.max(np.abs(w)))
            if not error <= 1e-5:
                raise SystemExit(f"{name}: error {error:.1e} at m, n, r = {m, n, r}")
            worst = max(worst, error)
    return worst


def time_both(fused, xla, make_inputs, reps: int, in_place: bool) -> tuple[float, float]:
    """Median ms of one jitted call over the 16 factored leaves, fused and XLA, interleaved.

    ``in_place``: the first output replaces the first input, which is donated (the momentum
    buffer of the state, as in the optimizer's donated update).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(1)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 4
    leaves = [[jnp.asarray(x, jnp.float32) for x in make_inputs(rng, m, n, 32)] for m, n in shapes]

    def update(leaves, f):
        outs = [f(*x) for x in leaves]
        if in_place:
            leaves = [[out[0], *x[1:]] for out, x in zip(outs, leaves, strict=True)]
        return leaves, outs

    steps = [
        jax.jit(update, static_argnums=1, donate_argnums=0 if in_place else ()) for _ in range(2)
    ]
    states = [leaves, [[jnp.array(x) for x in leaf] for leaf in leaves]]
    times: list[list[float]] = [[], []]
    for rep in range(reps + 2):
        for i, (step, f) in enumerate(zip(steps, (fused, xla), strict=True)):
            start = time.perf_counter()
            states[i], outs = jax.block_until_ready(step(states[i], f))
            del outs  # free the outputs before the next call, as a training loop would
            if rep >= 2:  # warm-up: compilation and first touches
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", type=Path, help="only build the shared library here")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    if args.library:
        build(args.library)
        return 0
    if not cpu_supported():
        raise SystemExit("these kernels need an x86-64 CPU with AVX-512 (F, DQ) and FMA")

    sys.path.insert(0, str(HERE.parent))  # benchmarks/: _common, step_time
    from _common import environment, markdown_table
    from step_time import KEEP_FREED_MEMORY

    if not all(k in os.environ for k in KEEP_FREED_MEMORY):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})

    with tempfile.TemporaryDirectory() as folder:
        register(build(Path(folder) / "umtam_kernels.so"))
        rows = []
        for name, (fused, xla, reference, make_inputs, in_place) in kernels().items():
            error = check(name, fused, reference, make_inputs)
            fused_ms, xla_ms = time_both(fused, xla, make_inputs, args.reps, in_place)
            rows.append(
                [
                    name,
                    f"{xla_ms:.1f}",
                    f"{fused_ms:.1f}",
                    f"{fused_ms / xla_ms:.2f}×",
                    f"{error:.1e}",
                ]
            )
    env = environment()
    print(
        f"16 factored leaves of the 4-block GPT-2 pytree, rank 32, median of {args.reps}; "
        f"jax {env.get('jax')}, load {os.getloadavg()[0]:.2f}\n"
    )
    print(
        markdown_table(
            ["kernel", "XLA ops (ms)", "fused (ms)", "fused ÷ XLA", "max rel. error vs float64"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
